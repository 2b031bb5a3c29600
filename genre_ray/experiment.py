"""The main job, top to bottom: check -> features -> tune -> export -> report.

`run(Config, Session)` is what `tune_main.py` calls after building the configuration.
Everything a user can get wrong is checked before Ray starts (checks.prepared). Which
run it starts or continues (after Ctrl-C, through Tuner.restore) is `runs.choose`'s
answer, from the whole configuration the run saved. Tune's results become plain trial
records once (tuning.records); export and report read only those.
"""
from __future__ import annotations

import time

from genre_ray import capacity, checks, cluster, export, onnx_export, report, runs, tuning
from genre_ray.checks import Checked
from genre_ray.config import Config
from genre_ray.data import describe_notes
from genre_ray.features import FeatureSet, build_variants, probe_segments
from genre_ray.trainable import load_trial_state
from genre_ray.trials import TrialRecord, of_pair


def run(cfg: Config, session: runs.Session = runs.Session()) -> report.RunSummary:
    """Tune every (model, feature) pair of `cfg`, export the best model of each, score the
    exports on the test split, and write the leaderboard and plots. Interrupted: Ctrl-C.

    Order: which run (read-only), flags, files, data and the cluster are checked before
    the run's folder is claimed, so a mistake leaves no trace of a run."""
    start = time.perf_counter()
    store, chosen, cfg, checked = checks.prepared(cfg, session.name, session.resume,
                                                  session.more_samples)
    address = cluster.cluster_address(session.address)
    with cluster.ray_for(cfg, address, session.shared_storage, store, checked.need) as slots:
        sets = _feature_sets(cfg, checked)
        with runs.claimed(store, chosen) as run_:
            _say_which(run_)
            try:
                summary = _run(cfg, checked, sets, slots, run_, start)
            except runs.Interrupted:  # Ctrl-C while tuning: its record says interrupted
                raise
            except KeyboardInterrupt:  # Ctrl-C after tuning: the same command exports again
                runs.write_record(run_, "interrupted")
                raise
            except Exception as err:  # say why it ended
                runs.write_record(run_, "failed", f"{type(err).__name__}: {err}".splitlines()[0])
                raise
            runs.write_record(run_, "finished")
    summary.copied_to = store.tune_path(run_.name) if store.remote else None
    return summary


def check(cfg: Config, session: runs.Session = runs.Session()) -> str:
    """What `run` checks before it starts Ray, and nothing else: which run, the flags and
    files, the data, the memory the features need, and that --address answers. A line
    saying what would run; UserError for the first problem. Writes nothing."""
    cluster.require_reachable(cluster.cluster_address(session.address))  # first: a moment
    store, chosen, cfg, checked = checks.prepared(cfg, session.name, session.resume,
                                                  session.more_samples)
    pairs = len(cfg.run.models) * len(cfg.run.features)
    what = (f"continue run {chosen.name!r}" if chosen.resume else
            f"start run {chosen.name!r}" if chosen.name else "start a new run")
    data_gb, trial_gb = sum(checked.need.data.values()) / capacity.GB, checked.need.trial / capacity.GB
    return (f"ok: would {what} under {store.uri}: {pairs} pair(s) x {cfg.search.num_samples} "
            f"trial(s) of up to {cfg.search.max_epochs} epochs on {checked.data_dir}; features "
            f"{data_gb:.2f} GB (train + val), {trial_gb:.1f} GB per trial")


def _say_which(run_: runs.Run) -> None:
    if run_.resume:
        ended = "failed" if run_.seen["status"] == "failed" else "interrupted"
        print(f"continuing {ended} run {run_.name!r} ({run_.dir}); pass --name NEW "
              "to start a new run instead")
    elif run_.round:
        print(f"growing run {run_.name!r} ({run_.dir}) by {run_.rounds[-1]} trial(s) "
              f"per pair, after its {sum(run_.rounds[:-1])}; its exports, leaderboard "
              "and plots are rebuilt over every trial")


def _feature_sets(cfg: Config, checked: Checked) -> dict[str, FeatureSet]:
    """Every feature variant of the run (variant_name -> its set; computed once, cached),
    and what loading left out."""
    sets = build_variants(checked.data_dir, checked.variants, cfg)
    notes = next(iter(sets.values())).report  # files skipped, padded or ignored
    if any(notes.values()):
        print("\n".join([f"data {checked.data_dir}:", *describe_notes(notes)]))
    return sets


def _run(cfg: Config, checked: Checked, sets: dict[str, FeatureSet], slots: int,
         run_: runs.Run, start: float) -> report.RunSummary:
    """Tune, export and report, once the run is claimed."""
    pairs = [(m, f) for m in cfg.run.models for f in cfg.run.features]
    names = [tuning.pair_name(m, f) for m, f in pairs]
    runs.write_record(run_, "running")
    grid, tuned = tuning.tune_round(cfg, sets, pairs, checked.spaces, run_, checked.mode, slots,
                                    checked.need.trial)
    if tuning.interrupted(run_.folder.store.tune_path(runs.round_name(run_.name, run_.round)),
                          run_.rounds[-1] * len(pairs), grid):
        runs.write_record(run_, "interrupted")
        raise runs.Interrupted(f"run {run_.name!r} was interrupted; its trials, checkpoints and "
                               "Optuna studies are saved. Run the same command again, or add "
                               f"--resume --name {run_.name}, to continue it")
    records = tuning.records([*tuning.earlier_rounds(run_), *grid], cfg.search.max_epochs)
    studies = tuning.optuna_storage(run_.folder)  # read once: a journal is replayed when opened
    tuning.settle(studies, run_.name, records)
    exports = _export(records, names, cfg, checked, sets, run_)
    results, costs = report.pair_results(
        names, records, exports,
        {tuning.pair_name(m, f): checked.spaces[m].of(f).first_point for m, f in pairs},
        {pair: tuning.importances(studies, f"{run_.name}/{pair}") for pair in names},
        (cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial))
    fs = next(iter(sets.values()))  # every variant has the same segments and classes
    _reported(records, results, costs, cfg, checked, run_, fs.classes,
              report.context(checked.data_dir, cfg.split.kind, cfg.run.seed, _sizes(fs),
                             tuned.hardware, time.perf_counter() - start))
    return report.RunSummary(results, run_.dir, tuned.seconds, tuned.slots,
                             None if run_.resume else tuning.utilisation(grid, tuned.seconds, tuned.slots),
                             failures=[r.failure for r in records if r.failure])


def _export(records: list[TrialRecord], pairs: list[str], cfg: Config, checked: Checked,
            sets: dict[str, FeatureSet], run_: runs.Run) -> dict[str, export.PairExport | None]:
    """Each pair's best trial exported, as a .pth and an ONNX graph checked on real audio,
    into --output-dir and the run's best_models/."""
    probe = probe_segments(checked.data_dir, cfg)
    folders = [checked.output_dir, run_.dir / "best_models"]
    exports = {}
    for pair in pairs:
        done = export.export_pair(of_pair(records, pair), sets, cfg, folders, load_trial_state)
        exports[pair] = done and onnx_export.export_pair_onnx(done, probe, folders)
    return exports


def _reported(records: list[TrialRecord], results: list[report.PairResult], costs: list[dict],
              cfg: Config, checked: Checked, run_: runs.Run, classes: list[str], ctx: dict) -> None:
    """The run's leaderboard and plots, and its W&B summary run (unless W&B is off)."""
    from genre_ray.tracking import log_summary, model_files, sync_hint

    files = report.write_leaderboard(run_.dir, results, ctx, costs)
    files += report.write_plots(run_.dir, results, classes, report.search_trials(records),
                                cfg.search.max_epochs, costs)
    run_.folder.sync()  # the exports and reports in the storage now, where W&B references them
    if checked.mode is None:
        return
    store = run_.folder.store
    remote = store.tune_path(run_.name) if store.remote else None  # W&B references its copies
    log_summary(checked.mode, project=cfg.tracking.wandb_project, run_dir=run_.dir, name=run_.name,
                tables={"leaderboard": (report.COLUMNS, [r.row() for r in report.ranked(results)]),
                        "pareto": (report.PARETO_COLUMNS, [t for t in costs if t["front"]])},
                files=files, models=[model_files(row, remote) for row in results if row.export_path])
    if checked.mode == "offline":
        print(sync_hint(run_.dir))


def _sizes(fs: FeatureSet) -> dict[str, tuple[int, int]]:
    """Split -> (tracks, segments); training segments include the augmented copies."""
    return {name: (len(part.track_ids), len(part.x)) for name, part in fs.splits.items()}
