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

import tempfile
import time
from pathlib import Path

from bench import harness
from genre_ray import config, tuning
from genre_ray.tracking import wandb_callback

SEARCH_KEYS = ("num_samples", "max_epochs", "grace_period", "reduction_factor", "n_startup_trials")
SMOKE = {"models": ["MLP"], "features": ["spectrogram"], "num_samples": 2, "max_epochs": 1}


def tune(pairs: list[tuple[str, str]], refs: dict, classes: list[str], cfg: config.Config,
         folder: Path, name: str, slots: int) -> tuple[float, float]:
    """(busy trial-seconds, wall seconds) of one Tuner over `pairs`."""
    start = time.perf_counter()
    grid = harness.tune(pairs, refs, cfg, folder, name, slots, callbacks=wandb_callback(
        "offline", project="bench", run_dir=folder / name, classes=classes))
    return tuning.busy_seconds(grid), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    default = config.load()
    parser = harness.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=default.run.models)
    parser.add_argument("--features", nargs="+", default=default.run.features)
    for key in SEARCH_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(default.search, key))
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    values = {f"search.{key}": getattr(args, key) for key in SEARCH_KEYS}
    cfg = config.replaced(default, {**values, "run.seed": 0})
    pairs = [(m, f) for m in args.models for f in args.features]
    with harness.local_ray() as slots, tempfile.TemporaryDirectory() as tmp:
        print(harness.context())
        sets, refs = harness.shared_features(pairs, cfg, harness.dataset(args.smoke))
        classes = next(iter(sets.values())).classes
        busy, wall = tune(pairs, refs, classes, cfg, Path(tmp), "together", slots)
        seq = [tune([pair], refs, classes, cfg, Path(tmp), f"seq-{i}", slots)
               for i, pair in enumerate(pairs)]
    together = busy / (wall * slots)
    in_sequence = sum(b for b, _ in seq) / (sum(w for _, w in seq) * slots)
    print(f"{len(pairs)} pairs x {args.num_samples} trials, up to {args.max_epochs} epochs, "
          f"{slots} slots")
    print(f"one Tuner: {wall:.0f} s wall, utilisation {together:.0%} (goal >= 85%)")
    print(f"pairs in sequence: {sum(w for _, w in seq):.0f} s wall, utilisation {in_sequence:.0%}")
    print(harness.ratio(together / in_sequence, "utilisation, one Tuner over pairs in sequence"))


if __name__ == "__main__":
    main()
