"""Slot utilisation: one Tuner over every pair (what tune_main.py runs) over pairs in sequence.

    python -m bench.utilisation [--models ...] [--features ...] [--num-samples N] [--max-epochs N]

Utilisation = busy trial-seconds / (tuning wall x trial slots), busy meaning inside the
trainable (`genre_ray.tuning.busy_seconds`). Both sides tune the same pairs with the same
searchers, schedulers, seeds and W&B (offline, into a temporary folder) on the same
cached features; the baseline runs one Tuner per pair, one after another, so each
search's tail (its last trials, fewer than the slots) leaves slots idle. Defaults: the
default run's (defaults.yaml `run` and `search`). Goal: >= 0.85 for the one-Tuner run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from bench.common import context
from genre_ray import config, tuning
from genre_ray.checks import feature_variants
from genre_ray.features import build_variants
from genre_ray.search_space import load_space
from genre_ray.synthetic import embedded_dataset
from genre_ray.tracking import wandb_callback
from genre_ray.trainable import share

SEARCH_KEYS = ("num_samples", "max_epochs", "grace_period", "reduction_factor", "n_startup_trials")


def tune(pairs: list[tuple[str, str]], refs: dict, classes: list[str], cfg: config.Config,
         run_dir: Path, slots: int) -> tuple[float, float]:
    """(busy trial-seconds, wall seconds) of one Tuner over `pairs`."""
    spaces = {model: load_space(model) for model, _ in pairs}
    searcher, scheduler = tuning.build_search(pairs, spaces, cfg, run_dir.name,
                                              tuning.optuna_storage(run_dir))
    start = time.perf_counter()
    grid = tuning.fit(refs, searcher, scheduler, cfg, storage_path=str(run_dir.parent),
                      name=run_dir.name, num_trials=cfg.search.num_samples * len(pairs),
                      cpus_per_trial=1, gpus_per_trial=0, max_concurrent=slots, verbose=0,
                      callbacks=wandb_callback("offline", project="bench", run_dir=run_dir,
                                               classes=classes))
    wall = time.perf_counter() - start
    return tuning.busy_seconds(grid), wall


def main() -> None:
    default = config.load()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=default.run.models)
    parser.add_argument("--features", nargs="+", default=default.run.features)
    for key in SEARCH_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(default.search, key))
    args = parser.parse_args()
    values = {f"search.{key}": getattr(args, key) for key in SEARCH_KEYS}
    cfg = config.replaced(default, {**values, "run.seed": 0})
    pairs = [(m, f) for m in args.models for f in args.features]
    spaces = {model: load_space(model) for model in args.models}
    sets = build_variants(embedded_dataset(), feature_variants(pairs, spaces, cfg), cfg)
    classes = next(iter(sets.values())).classes
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    print(context())
    try:
        slots = int(ray.cluster_resources()["CPU"])
        refs = {fs.variant: share(fs) for fs in sets.values()}
        with tempfile.TemporaryDirectory() as tmp:
            busy, wall = tune(pairs, refs, classes, cfg, Path(tmp) / "together", slots)
            seq = [tune([pair], refs, classes, cfg, Path(tmp) / f"seq-{i}", slots)
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
