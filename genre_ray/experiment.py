"""The main job, end to end: features -> Ray -> one Tuner over every pair -> exports.

`run(Options)` is what `tune_main.py` calls after parsing its flags. Everything a user
can get wrong (names, paths, search-space files) is checked before Ray starts.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

from genre_ray import export, tuning
from genre_ray.errors import UserError
from genre_ray.features import FeatureSet, build_features, canonical_feature
from genre_ray.search_space import load_space
from genre_ray.trainable import TRIAL_KEYS, load_trial_state


@dataclass
class Options:
    """One run's settings: tune_main.py's flags (defaults: defaults.yaml `tune`)."""

    data_dir: Path | None
    models: list[str]
    features: list[str]
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    n_startup_trials: int
    cpus_per_trial: float
    gpus_per_trial: float
    address: str | None
    storage_path: str
    name: str | None
    split: str
    wandb: str
    wandb_project: str
    seed: int
    output_dir: Path
    search_spaces: Path
    env_file: Path


@dataclass
class PairSummary:
    pair: str
    val_loss: float
    val_acc: float
    finished: int
    pruned: int
    export_path: Path | None


@dataclass
class RunSummary:
    """Per-pair results, and how busy the Tuner kept its trial slots."""

    pairs: list[PairSummary]
    tuning_s: float
    slots: int
    utilisation: float


def run(opts: Options) -> RunSummary:
    """Tune every (model, feature) pair of `opts` and export the best model of each."""
    import optuna
    import ray

    from genre_ray.tracking import resolve_mode, sync_hint, wandb_callback

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial

    spaces = {model: load_space(model, opts.search_spaces) for model in opts.models}
    features = [canonical_feature(f) for f in opts.features]
    _require_positive(opts)
    output_dir = _writable(opts.output_dir)
    mode = resolve_mode(opts.wandb, opts.env_file)
    data_dir = opts.data_dir or _embedded()
    sets = {f: build_features(data_dir, f, split=opts.split, seed=opts.seed) for f in features}
    name = opts.name or datetime.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
    run_dir = Path(opts.storage_path).expanduser().resolve() / name
    pairs = [(m, f) for m in opts.models for f in features]
    ray.init(address=opts.address, include_dashboard=False, configure_logging=False)
    try:
        refs = {f: ray.put(fs) for f, fs in sets.items()}  # once per run, shared by all trials
        searcher, scheduler = tuning.build_search(pairs, spaces, tuning.SearchSettings(
            run_name=name, storage=tuning.optuna_storage(run_dir), num_samples=opts.num_samples,
            max_epochs=opts.max_epochs, grace_period=opts.grace_period,
            reduction_factor=opts.reduction_factor, n_startup_trials=opts.n_startup_trials,
            seed=opts.seed))
        callbacks = wandb_callback(mode, project=opts.wandb_project, run_dir=run_dir,
                                   classes=next(iter(sets.values())).classes)
        slots, start = _slots(opts), time.perf_counter()
        grid = tuning.fit(refs, searcher, scheduler, storage_path=str(run_dir.parent), name=name,
                          num_trials=opts.num_samples * len(pairs),
                          cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
                          max_concurrent=slots, callbacks=callbacks)
        tuning_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    summaries = [_export_pair(grid, m, sets[f], output_dir, run_dir, opts.max_epochs)
                 for m, f in pairs]
    if mode == "offline":
        print(sync_hint(run_dir))
    return RunSummary(summaries, tuning_s, slots, tuning.utilisation(grid, tuning_s, slots))


def _export_pair(grid, model: str, fs: FeatureSet, output_dir: Path, run_dir: Path,
                 max_epochs: int) -> PairSummary:
    pair = tuning.pair_name(model, fs.feature)
    results = [r for r in grid if r.config.get("pair") == pair]
    epochs = [int(r.metrics.get("training_iteration", 0)) for r in results if not r.error]
    pruned = sum(e < max_epochs for e in epochs)
    best = export.best_of_pair(results, load_trial_state)
    if best is None:
        return PairSummary(pair, float("nan"), float("nan"), len(epochs) - pruned, pruned, None)
    hyper = {k: v for k, v in best.config.items() if k not in TRIAL_KEYS}
    name = export.export_name(model, fs.feature)
    export.export_model(best, fs, hyper, [output_dir / name, run_dir / "best_models" / name])
    return PairSummary(pair, best.metrics["val_loss"], best.metrics["val_acc"],
                       len(epochs) - pruned, pruned, output_dir / name)


def summary_table(summary: RunSummary) -> str:
    """The per-pair summary printed at the end of a run."""
    lines = [f"{'pair':<22}{'val_acc':>8}{'val_loss':>9}{'finished':>9}{'pruned':>7}  export"]
    lines += [f"{r.pair:<22}{r.val_acc:>8.3f}{r.val_loss:>9.3f}{r.finished:>9}{r.pruned:>7}  "
              f"{r.export_path or 'none (no trial finished an epoch)'}" for r in summary.pairs]
    lines.append(f"tuning took {summary.tuning_s:.0f} s on {summary.slots} trial slots, "
                 f"busy {summary.utilisation:.0%} of the time")
    return "\n".join(lines)


def _require_positive(opts: Options) -> None:
    for flag in ("num_samples", "max_epochs", "cpus_per_trial"):
        if getattr(opts, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(opts, flag)}")
    if opts.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {opts.gpus_per_trial}")


def _writable(folder: Path) -> Path:
    """`folder`, created if needed; UserError before any tuning if it cannot be written."""
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {folder} ({err.strerror}); "
                        "pass a writable --output-dir") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; pass a writable --output-dir")
    return folder


def _slots(opts: Options) -> int:
    """Trials to run at once: as many as the cluster's CPUs (and GPUs) allow."""
    import ray

    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) // opts.cpus_per_trial
    if opts.gpus_per_trial:
        slots = min(slots, resources.get("GPU", 0) // opts.gpus_per_trial)
    return max(1, int(slots))


def _embedded() -> Path:
    from genre_ray.synthetic import embedded_dataset

    return embedded_dataset()
