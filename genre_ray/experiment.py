"""The main job, end to end: features -> Ray -> one Tuner over every pair -> exports
-> test scores, leaderboard, plots (and a W&B summary run).

`run(Options)` is what `tune_main.py` calls after parsing its flags. Everything a user
can get wrong (names, paths, search-space files) is checked before Ray starts.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genre_ray import export, report, tuning
from genre_ray.errors import UserError
from genre_ray.features import FeatureSet, build_features, canonical_feature
from genre_ray.models import count_parameters
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
    shared_storage: bool
    name: str | None
    split: str
    wandb: str
    wandb_project: str
    seed: int
    output_dir: Path
    search_spaces: Path
    env_file: Path


@dataclass
class RunSummary:
    """Per-pair results (leaderboard rows), and how busy the Tuner kept its trial slots."""

    pairs: list[report.PairResult]
    run_dir: Path
    tuning_s: float
    slots: int
    utilisation: float


def run(opts: Options) -> RunSummary:
    """Tune every (model, feature) pair of `opts`, export the best model of each, score the
    exports on the test split, and write the leaderboard and plots."""
    import optuna

    from genre_ray.tracking import log_summary, resolve_mode, sync_hint

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial
    start = time.perf_counter()
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
    grid, tuned = _tune(opts, sets, pairs, spaces, run_dir, mode)
    results = [_pair_result(grid, m, sets[f], output_dir, run_dir, opts) for m, f in pairs]
    fs = next(iter(sets.values()))
    ctx = report.context(data_dir, opts.split, opts.seed, _sizes(fs), tuned["hardware"],
                         time.perf_counter() - start)
    files = report.write_leaderboard(run_dir, results, ctx)
    files += report.write_plots(run_dir, results, fs.classes, _trials(grid, opts.max_epochs),
                                opts.max_epochs)
    if mode is not None:
        log_summary(mode, project=opts.wandb_project, run_dir=run_dir, name=name,
                    columns=report.COLUMNS, rows=[r.row() for r in report.ranked(results)],
                    files=files)
    if mode == "offline":
        print(sync_hint(run_dir))
    return RunSummary(results, run_dir, tuned["seconds"], tuned["slots"],
                      tuning.utilisation(grid, tuned["seconds"], tuned["slots"]))


def _tune(opts: Options, sets: dict[str, FeatureSet], pairs: list[tuple[str, str]],
          spaces: dict, run_dir: Path, mode: str | None) -> tuple[Any, dict[str, Any]]:
    """Ray up, one Tuner over every pair, Ray down: (ResultGrid, {seconds, slots, hardware})."""
    import ray

    from genre_ray.tracking import wandb_callback

    # absent --address: a new local Ray, never a cluster an earlier `ray start` left running
    ray.init(address=opts.address or "local", include_dashboard=False, configure_logging=False)
    try:
        _require_shared_storage(opts)
        refs = {f: ray.put(fs) for f, fs in sets.items()}  # once per run, shared by all trials
        searcher, scheduler = tuning.build_search(pairs, spaces, tuning.SearchSettings(
            run_name=run_dir.name, storage=tuning.optuna_storage(run_dir),
            num_samples=opts.num_samples, max_epochs=opts.max_epochs,
            grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
            n_startup_trials=opts.n_startup_trials, seed=opts.seed))
        callbacks = wandb_callback(mode, project=opts.wandb_project, run_dir=run_dir,
                                   classes=next(iter(sets.values())).classes)
        slots, start = _slots(opts), time.perf_counter()
        grid = tuning.fit(refs, searcher, scheduler, storage_path=str(run_dir.parent),
                          name=run_dir.name, num_trials=opts.num_samples * len(pairs),
                          cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
                          max_concurrent=slots, callbacks=callbacks)
        return grid, {"seconds": time.perf_counter() - start, "slots": slots,
                      "hardware": report.hardware(ray.cluster_resources())}
    finally:
        ray.shutdown()


def _pair_result(grid, model: str, fs: FeatureSet, output_dir: Path, run_dir: Path,
                 opts: Options) -> report.PairResult:
    """Export the pair's best checkpoint, with its test scores, and describe its search."""
    pair = tuning.pair_name(model, fs.feature)
    results = [r for r in grid if r.config.get("pair") == pair]
    epochs = [int(r.metrics.get("training_iteration", 0)) for r in results if not r.error]
    pruned = sum(e < opts.max_epochs for e in epochs)
    seconds = tuning.busy_seconds(results)
    row = report.PairResult(pair, len(epochs) - pruned, pruned, seconds * opts.cpus_per_trial,
                            seconds * opts.gpus_per_trial)
    best = export.best_of_pair(results, load_trial_state)
    if best is None:
        return row
    payload = export.payload(best, fs, {k: v for k, v in best.config.items() if k not in TRIAL_KEYS})
    net = export.rebuild(payload)
    row.test = report.test_scores(net, fs.splits["test"], len(fs.classes))
    name = export.export_name(model, fs.feature)
    export.save({**payload, "test": row.test.summary()},
                [output_dir / name, run_dir / "best_models" / name])
    trial = next(r for r in results if r.metrics.get("trial_id") == best.trial_id)
    row.export_path = output_dir / name
    row.val_loss, row.val_acc = best.metrics["val_loss"], best.metrics["val_acc"]
    row.params, row.config, row.trial_id = count_parameters(net), payload["config"], best.trial_id
    row.epochs = int(trial.metrics.get("training_iteration", 0))
    row.history = trial.metrics_dataframe[["epoch", "train_loss", "val_loss", "val_acc"]] \
        .to_dict("records")
    return row


def _trials(grid, max_epochs: int) -> list[dict[str, Any]]:
    """Every trial's validation loss by epoch, for plots.search_view."""
    return [{"pair": r.config["pair"], "trial_id": r.metrics.get("trial_id", ""),
             "epochs": r.metrics_dataframe["epoch"].tolist(),
             "val_loss": r.metrics_dataframe["val_loss"].tolist(),
             "stopped": not r.error and len(r.metrics_dataframe) < max_epochs}
            for r in grid if r.metrics_dataframe is not None and len(r.metrics_dataframe)]


def _sizes(fs: FeatureSet) -> dict[str, tuple[int, int]]:
    """Split -> (tracks, segments); training segments include the augmented copies."""
    return {name: (len(part.track_ids), len(part.x)) for name, part in fs.splits.items()}


def summary_table(summary: RunSummary) -> str:
    """What tune_main.py prints at the end of a run: the leaderboard, exports, utilisation."""
    lines = [report.table(summary.pairs), ""]
    lines += [f"{r.pair:<22}{r.export_path or 'no export: no trial finished an epoch'}"
              for r in summary.pairs]
    lines.append(f"leaderboard, plots: {summary.run_dir / 'leaderboard.md'}, "
                 f"{summary.run_dir / 'plots'}/")
    lines.append(f"tuning took {summary.tuning_s:.0f} s on {summary.slots} trial slots, "
                 f"busy {summary.utilisation:.0%} of the time")
    return "\n".join(lines)


def _require_positive(opts: Options) -> None:
    for flag in ("num_samples", "max_epochs", "cpus_per_trial"):
        if getattr(opts, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(opts, flag)}")
    if opts.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {opts.gpus_per_trial}")


def _require_shared_storage(opts: Options) -> None:
    """On a cluster of more than one node, every node saves its trials' checkpoints to the
    storage path: a path only this machine has would lose them. UserError before any trial."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and not opts.shared_storage:
        raise UserError(
            f"the Ray cluster has {nodes} nodes but --storage-path {opts.storage_path} may be "
            "a path on this machine only: trials on other nodes could not save their "
            "checkpoints there. Pass a path every node mounts (NFS) and add --shared-storage")


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
