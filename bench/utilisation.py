"""Slot utilisation: one Tuner over every pair (what tune_main.py runs) over pairs in sequence.

    python -m bench.utilisation [--models ...] [--features ...] [--num-samples N] [--max-epochs N]

Utilisation = busy trial-seconds / (tuning wall x trial slots), busy meaning inside the
trainable (`genre_ray.tuning.busy_seconds`). Both sides tune the same pairs with the same
searchers, schedulers, seeds and W&B (offline, into a temporary folder) on the same
cached features; the baseline runs one Tuner per pair, one after another, so each
search's tail (its last trials, fewer than the slots) leaves slots idle. Defaults: the
default run's (defaults.yaml `tune`). Goal: >= 0.85 for the one-Tuner run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from bench.common import context
from genre_ray import tuning
from genre_ray.config import defaults
from genre_ray.features import build_features
from genre_ray.search_space import load_space
from genre_ray.synthetic import embedded_dataset
from genre_ray.tracking import wandb_callback
from genre_ray.trainable import share


def tune(pairs: list[tuple[str, str]], refs: dict, classes: list[str], args, run_dir: Path,
         slots: int) -> tuple[float, float]:
    """(busy trial-seconds, wall seconds) of one Tuner over `pairs`."""
    spaces = {model: load_space(model) for model, _ in pairs}
    searcher, scheduler = tuning.build_search(pairs, spaces, tuning.SearchSettings(
        run_name=run_dir.name, storage=tuning.optuna_storage(run_dir),
        num_samples=args.num_samples, max_epochs=args.max_epochs,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        n_startup_trials=args.n_startup_trials, seed=0))
    start = time.perf_counter()
    grid = tuning.fit(refs, searcher, scheduler, storage_path=str(run_dir.parent),
                      name=run_dir.name, num_trials=args.num_samples * len(pairs),
                      cpus_per_trial=1, gpus_per_trial=0, max_concurrent=slots, verbose=0,
                      callbacks=wandb_callback("offline", project="bench", run_dir=run_dir,
                                               classes=classes))
    wall = time.perf_counter() - start
    return tuning.busy_seconds(grid), wall


def main() -> None:
    d = defaults("tune")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=d["models"])
    parser.add_argument("--features", nargs="+", default=d["features"])
    for key in ("num_samples", "max_epochs", "grace_period", "reduction_factor", "n_startup_trials"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=d[key])
    args = parser.parse_args()
    sets = {f: build_features(embedded_dataset(), f) for f in args.features}
    classes = next(iter(sets.values())).classes
    pairs = [(m, f) for m in args.models for f in args.features]
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    print(context())
    try:
        slots = int(ray.cluster_resources()["CPU"])
        refs = {f: share(fs) for f, fs in sets.items()}
        with tempfile.TemporaryDirectory() as tmp:
            busy, wall = tune(pairs, refs, classes, args, Path(tmp) / "together", slots)
            seq = [tune([pair], refs, classes, args, Path(tmp) / f"seq-{i}", slots)
                   for i, pair in enumerate(pairs)]
    finally:
        ray.shutdown()
    together = busy / (wall * slots)
    in_sequence = sum(b for b, _ in seq) / (sum(w for _, w in seq) * slots)
    print(f"{len(pairs)} pairs x {args.num_samples} trials, up to {args.max_epochs} epochs, "
          f"{slots} slots")
    print(f"one Tuner: {wall:.0f} s wall, utilisation {together:.0%} (goal >= 85%)")
    print(f"pairs in sequence: {sum(w for _, w in seq):.0f} s wall, utilisation {in_sequence:.0%}")
    print(f"ratio {together / in_sequence:.2f} (utilisation, one Tuner over pairs in sequence)")


if __name__ == "__main__":
    main()
