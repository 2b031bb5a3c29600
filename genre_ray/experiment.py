"""The main job, end to end: features -> Ray -> one Tuner over every pair -> exports
-> test scores, leaderboard, plots (and a W&B summary run).

`run(Config, Session)` is what `tune_main.py` calls after building the configuration.
Everything a user can get wrong (names, paths, search-space files) is checked before Ray
starts. Which run it starts or continues (after Ctrl-C, through Tuner.restore) is
`runs.choose`'s answer, from the whole configuration the run saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from genre_ray import capacity, config, export, report, runs, storage, tuning
from genre_ray.config import Config
from genre_ray.data import describe_notes
from genre_ray.errors import UserError
from genre_ray.features import (FeatureSet, Variant, build_variants, canonical_feature,
                                estimated_bytes, probe_segments, variant_of)
from genre_ray.files import writable_folder
from genre_ray.models import count_parameters
from genre_ray.search_space import SearchSpace, load_space, parse_space
from genre_ray.trainable import load_trial_state


@dataclass(frozen=True)
class Session:
    """How this command runs, beside what it runs (config.Config): which run, which Ray."""

    name: str | None = None  # None: the newest interrupted run with this configuration, or new
    resume: bool = False  # continue a run with its saved configuration
    address: str | None = None  # a Ray cluster to join; None: $RAY_ADDRESS (a submitted
    # job's cluster) if set, else a new local Ray
    shared_storage: bool = False  # the storage path is mounted on every node
    check: bool = False  # check what a run would check, and stop there (tune_main --check)
    more_samples: int = 0  # grow the finished run `name` by this many trials per pair


class Interrupted(Exception):
    """The run stopped before its last trial (Ctrl-C); its state is saved for a resume."""


def _not_tune_resume_hint(record: logging.LogRecord) -> bool:
    """Drop Tune's "Resume experiment with: Tuner.restore(...)": Interrupted says how."""
    return not record.getMessage().startswith("Experiment has been interrupted")


@dataclass
class RunSummary:
    """Per-pair results (leaderboard rows), and how busy the Tuner kept its trial slots."""

    pairs: list[report.PairResult]
    run_dir: Path
    tuning_s: float
    slots: int
    utilisation: float | None  # None for a continued run: its trials' times span sessions
    copied_to: str | None = None  # URI storage: where the run's files are
    failures: list[str] = dataclasses.field(default_factory=list)  # a line per failed trial


@dataclass
class Checked:
    """What a run needs, checked before anything of the run is written."""

    spaces: dict[str, SearchSpace]
    output_dir: Path
    mode: str | None  # W&B: online | offline | None (off)
    data_dir: Path
    need: capacity.Need  # what each node must hold (estimated from the audio files' headers)
    variants: list[Variant]  # every feature front end a trial can sample (feature_variants)


def run(cfg: Config, session: Session = Session()) -> RunSummary:
    """Tune every (model, feature) pair of `cfg`, export the best model of each, score the
    exports on the test split, and write the leaderboard and plots. Interrupted: Ctrl-C.

    Order: which run (read-only), flags, files, data and the cluster are checked before
    the run's folder is claimed, so a mistake leaves no trace of a run."""
    start = time.perf_counter()
    store, chosen, cfg, checked = _prepared(cfg, session)
    with _ray(cfg, session, store, checked.need) as slots:
        sets = _feature_sets(cfg, checked)
        with runs.claimed(store, chosen) as run_:
            if run_.resume:
                ended = "failed" if run_.seen["status"] == "failed" else "interrupted"
                print(f"continuing {ended} run {run_.name!r} ({run_.dir}); pass --name NEW "
                      "to start a new run instead")
            elif run_.round:
                print(f"growing run {run_.name!r} ({run_.dir}) by {run_.rounds[-1]} trial(s) "
                      f"per pair, after its {sum(run_.rounds[:-1])}; its exports, leaderboard "
                      "and plots are rebuilt over every trial")
            try:
                summary = _run(cfg, checked, sets, slots, store, run_, start)
            except Interrupted:  # Ctrl-C while tuning: its record says interrupted
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


def check(cfg: Config, session: Session = Session()) -> str:
    """What `run` checks before it starts Ray, and nothing else: which run, the flags and
    files, the data, the memory the features need, and that --address answers. A line
    saying what would run; UserError for the first problem. Writes nothing."""
    _require_reachable(cluster_address(session))  # first: a moment, where the data may take minutes
    store, chosen, cfg, checked = _prepared(cfg, session)
    pairs = len(cfg.run.models) * len(cfg.run.features)
    what = (f"continue run {chosen.name!r}" if chosen.resume else
            f"start run {chosen.name!r}" if chosen.name else "start a new run")
    data_gb, trial_gb = sum(checked.need.data.values()) / capacity.GB, checked.need.trial / capacity.GB
    return (f"ok: would {what} under {store.uri}: {pairs} pair(s) x {cfg.search.num_samples} "
            f"trial(s) of up to {cfg.search.max_epochs} epochs on {checked.data_dir}; features "
            f"{data_gb:.2f} GB (train + val), {trial_gb:.1f} GB per trial")


def _prepared(cfg: Config, session: Session) -> tuple[storage.Storage, runs.Run, Config, Checked]:
    """The run this command works on, its configuration (saved, when it continues one) and
    what it needs, every input checked; nothing written."""
    store = storage.storage(cfg.run.storage_path)
    if store.remote:  # first: every other check reads the storage
        store.check_writable()
    keeps_own = session.resume or bool(session.more_samples)  # the run's saved configuration
    chosen = runs.choose(store, session.name, config.as_json(resolved(cfg, keeps_own)),
                         session.resume, session.more_samples)
    cfg = config.from_json(chosen.config)
    config.cache_dir()  # UserError if the cache folder cannot be written
    if not store.remote:
        writable_folder(store.local, "--storage-path")
    return store, chosen, cfg, _check(cfg)


def resolved(cfg: Config, resume: bool = False) -> Config:
    """`cfg` as a run keeps it: paths absolute, feature names canonical, lists without
    repeats, and each model's search space read (a --resume takes the run's saved ones:
    none are read)."""
    def absolute(path: str | None) -> str | None:
        return path and (path if "://" in path else str(Path(path).expanduser().resolve()))

    run_ = cfg.run
    cfg = config.replaced(cfg, {  # a list given twice (or an alias beside its name): once
        "run.models": list(dict.fromkeys(run_.models)),
        "run.features": list(dict.fromkeys(canonical_feature(f) for f in run_.features)),
        **{f"run.{key}": absolute(getattr(run_, key))
           for key in ("data_dir", "output_dir", "storage_path", "search_spaces")}})
    spaces = {} if resume else {m: load_space(m, cfg.run.search_spaces).doc for m in cfg.run.models}
    return dataclasses.replace(cfg, spaces=spaces)


def _check(cfg: Config) -> Checked:
    from genre_ray.tracking import resolve_mode

    spaces = {m: parse_space(m, cfg.spaces[m], Path(f"run.json spaces.{m}")) for m in cfg.run.models}
    output_dir = writable_folder(Path(cfg.run.output_dir), "--output-dir")
    mode = resolve_mode(cfg.tracking.wandb, Path(cfg.run.env_file))
    data_dir = Path(cfg.run.data_dir) if cfg.run.data_dir else _embedded()
    variants = feature_variants([(m, f) for m in cfg.run.models for f in cfg.run.features], spaces, cfg)
    sizes = estimated_bytes(data_dir, variants, cfg)
    need = capacity.need(sizes, cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial,
                         cfg.memory)
    return Checked(spaces, output_dir, mode, data_dir, need, variants)


def feature_variants(pairs: list[tuple[str, str]], spaces: dict[str, SearchSpace],
                     cfg: Config) -> list[Variant]:
    """Every (feature, front end) a trial of `pairs` (model, feature) can sample, once each:
    the front ends their search spaces choose among (search_space.SearchSpace.variants)."""
    found = {}
    for model, feature in pairs:
        for searched in spaces[model].variants(feature):
            front = config.tuned(cfg, searched, feature)
            found[variant_of(front, feature)] = (feature, front.features.of(feature))
    return list(found.values())


def _feature_sets(cfg: Config, checked: Checked) -> dict[str, FeatureSet]:
    """Every feature variant of the run (variant_name -> its set; computed once, cached),
    and what loading left out."""
    sets = build_variants(checked.data_dir, checked.variants, cfg)
    notes = next(iter(sets.values())).report  # files skipped, padded or ignored
    if any(notes.values()):
        print("\n".join([f"data {checked.data_dir}:", *describe_notes(notes)]))
    return sets


@contextlib.contextmanager
def _ray(cfg: Config, session: Session, store: storage.Storage, need: capacity.Need) -> Iterator[int]:
    """Ray up (a new local one with an object store sized for the data, or the cluster
    --address or $RAY_ADDRESS names) and checked; yields the trials that fit at once; down
    after."""
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial
    logging.getLogger("ray.tune.tune").addFilter(_not_tune_resume_hint)
    address = cluster_address(session)
    _require_reachable(address)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a submitted job's driver
        # It starts in the job's working folder, which Ray deletes and unpacks anew when
        # another job of the same code sets up (seen with Ray 2.60: Tune's os.getcwd()
        # failed at the end of a run). Every path of the run is absolute by now.
        config.cache_dir().mkdir(parents=True, exist_ok=True)
        os.chdir(config.cache_dir())
    sized = {} if address else {"object_store_memory": capacity.local_store_bytes(need, cfg.memory)}
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:  # absent --address: a new local Ray, never a cluster an earlier `ray start` left running
        ray.init(address=address or "local", include_dashboard=False,
                 configure_logging=False, **sized)
    except ConnectionError as err:  # --address auto, and no cluster runs here
        raise UserError(f"--address {address}: {str(err).rstrip('.')}; start one with "
                        "`ray start --head`, or drop --address to run on a new local Ray") from None
    signal.signal(signal.SIGTERM, on_sigterm)  # ray.init's exits at once (sys.exit): the command's
    try:
        _require_shared_storage(session, store)
        yield _slots(need)
    finally:
        ray.shutdown()


def _run(cfg: Config, checked: Checked, sets: dict[str, FeatureSet], slots: int,
         store: storage.Storage, run_: runs.Run, start: float) -> RunSummary:
    max_epochs = cfg.search.max_epochs
    pairs = [(m, f) for m in cfg.run.models for f in cfg.run.features]
    runs.write_record(run_, "running")
    this_round = dataclasses.replace(  # a grown run's round: its own trials per pair
        cfg, search=dataclasses.replace(cfg.search, num_samples=run_.rounds[-1]))
    grid, tuned = _tune(this_round, sets, pairs, checked.spaces, store, run_, checked.mode,
                        slots, checked.need.trial)
    round_path = store.tune_path(runs.round_name(run_.name, run_.round))
    if tuning.interrupted(round_path, run_.rounds[-1] * len(pairs), grid):
        runs.write_record(run_, "interrupted")
        raise Interrupted(f"run {run_.name!r} was interrupted; its trials, checkpoints and "
                          "Optuna studies are saved. Run the same command again, or add "
                          f"--resume --name {run_.name}, to continue it")
    every = [*_earlier_rounds(store, run_), *grid]  # every trial of the run
    results, costs = _exported(every, pairs, cfg, checked, sets, run_)
    fs = next(iter(sets.values()))  # every variant has the same segments and classes
    _reported(every, results, costs, cfg, checked, run_, fs.classes,
              report.context(checked.data_dir, cfg.split.kind, cfg.run.seed, _sizes(fs),
                             tuned.hardware, time.perf_counter() - start))
    return RunSummary(results, run_.dir, tuned.seconds, tuned.slots,
                      None if run_.resume else tuning.utilisation(grid, tuned.seconds, tuned.slots),
                      failures=[_failure(r) for r in every
                                if tuning.result_outcome(r, max_epochs) == tuning.FAILED])


def _exported(every, pairs: list[tuple[str, str]], cfg: Config, checked: Checked,
              sets: dict[str, FeatureSet], run_: runs.Run) -> tuple[list[report.PairResult], list[dict]]:
    """Each pair's best trial of `every` (the run's trials) exported and scored, beside its
    seed point and importances; and every trial's cost, the Pareto front marked."""
    probe = probe_segments(checked.data_dir, cfg)  # real audio for the ONNX graphs' check
    results = [_pair_result(every, m, f, sets, checked.output_dir, run_.dir, cfg, probe)
               for m, f in pairs]
    studies = tuning.optuna_storage(run_.folder)  # read once: a journal is replayed when opened
    for row, (m, f) in zip(results, pairs):
        _searched(row, every, checked.spaces[m].of(f).first_point, studies, f"{run_.name}/{row.pair}")
    costs = report.pareto_front(_costs(every, results))
    _mark_pareto(results, costs)
    return results, costs


def _reported(every, results: list[report.PairResult], costs: list[dict], cfg: Config,
              checked: Checked, run_: runs.Run, classes: list[str], ctx: dict) -> None:
    """The run's leaderboard and plots, and its W&B summary run (unless W&B is off)."""
    from genre_ray.tracking import log_summary, sync_hint

    max_epochs = cfg.search.max_epochs
    files = report.write_leaderboard(run_.dir, results, ctx, costs)
    files += report.write_plots(run_.dir, results, classes, _trials(every, max_epochs),
                                max_epochs, costs)
    run_.folder.sync()  # the exports and reports in the storage now, where W&B references them
    if checked.mode is None:
        return
    log_summary(checked.mode, project=cfg.tracking.wandb_project, run_dir=run_.dir, name=run_.name,
                tables={"leaderboard": (report.COLUMNS, [r.row() for r in report.ranked(results)]),
                        "pareto": (report.PARETO_COLUMNS, [t for t in costs if t["front"]])},
                files=files, models=[_model_files(row, run_) for row in results if row.export_path])
    if checked.mode == "offline":
        print(sync_hint(run_.dir))


def _model_files(row: report.PairResult, run_: runs.Run):
    """A pair's export for W&B: the storage's copies by reference with a URI storage path
    (uploaded once already), else the files on this machine."""
    from genre_ray.tracking import ModelFiles

    files = [path for path in (row.export_path, row.onnx_path) if path is not None]
    store = run_.folder.store
    if store.remote:
        base = store.tune_path(run_.name).partition("?")[0]
        files = [f"{base}/best_models/{path.name}" for path in files]
    return ModelFiles(row.pair, row.row(), [str(f) for f in files])


@dataclass
class Tuned:
    """How the Tuner ran: its wall seconds, trial slots and the cluster's hardware."""

    seconds: float
    slots: int
    hardware: str


def _tune(cfg: Config, sets: dict[str, FeatureSet], pairs: list[tuple[str, str]],
          spaces: dict, store: storage.Storage, run_: runs.Run, mode: str | None, slots: int,
          trial_bytes: int) -> tuple[Any, Tuned]:
    """One Tuner over every pair (new, or restored from the run's saved state), on the
    Ray this process joined: its ResultGrid, and how it ran."""
    import ray

    from genre_ray.tracking import wandb_callback
    from genre_ray.trainable import share

    refs = {fs.variant: share(fs) for fs in sets.values()}  # once per run, shared by all trials
    resources = {"cpus_per_trial": cfg.resources.cpus_per_trial,
                 "gpus_per_trial": cfg.resources.gpus_per_trial, "memory_per_trial": trial_bytes}
    start = time.perf_counter()
    tune_name = runs.round_name(run_.name, run_.round)
    if run_.resume and runs.tune_state_exists(store, tune_name):
        tuner = tuning.restore_tuner(store.tune_path(tune_name), refs, cfg, **resources)
    else:
        callbacks = wandb_callback(mode, project=cfg.tracking.wandb_project, run_dir=run_.dir,
                                   classes=next(iter(sets.values())).classes)
        parent, _, folder = tune_name.rpartition("/")  # a later round: inside the run's folder
        tuner = tuning.make_tuner(refs, *_search(cfg, pairs, spaces, run_), cfg, **resources,
                                  storage_path=store.tune_path(parent) if parent else store.uri,
                                  name=folder,
                                  num_trials=cfg.search.num_samples * len(pairs),
                                  max_concurrent=slots, callbacks=callbacks)
    grid = tuning.fit_in_main_thread(tuner)
    return grid, Tuned(time.perf_counter() - start, slots, report.hardware(ray.nodes()))


def _search(cfg: Config, pairs: list[tuple[str, str]], spaces: dict,
            run_: runs.Run) -> tuple[tuning.PairSearcher, tuning.PairScheduler]:
    """A new round's searcher and scheduler. The first round's over a fresh Optuna journal
    (one left by a start that never reached its Tuner would hold its seed points a second
    time); a later round's go on with the pairs' studies in the run's journal."""
    if run_.round == 0:
        run_.folder.reset_journal()
    return tuning.build_search(pairs, spaces, cfg, run_.name, tuning.optuna_storage(run_.folder),
                               round_=run_.round)


def _earlier_rounds(store: storage.Storage, run_: runs.Run) -> list:
    """The trials (Tune Results) of the run's rounds before this command's, as saved."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return [result for k in range(run_.round) for result in ResultGrid(ExperimentAnalysis(
        store.tune_path(runs.round_name(run_.name, k)), default_metric=tuning.METRIC,
        default_mode=tuning.MODE))]


def _pair_result(grid, model: str, feature: str, sets: dict[str, FeatureSet], output_dir: Path,
                 run_dir: Path, cfg: Config, probe) -> report.PairResult:
    """Export the pair's best checkpoint, with its test scores (on the feature variant it
    trained on), as a .pth and, checked on the `probe` segments, an ONNX graph; and
    describe its search."""
    pair = tuning.pair_name(model, feature)
    results = [r for r in grid if r.config.get("pair") == pair]
    ended = Counter(tuning.result_outcome(r, cfg.search.max_epochs) for r in results)
    seconds = tuning.busy_seconds(results)
    row = report.PairResult(pair, ended[tuning.FINISHED], ended[tuning.PRUNED], ended[tuning.FAILED],
                            seconds * cfg.resources.cpus_per_trial,
                            seconds * cfg.resources.gpus_per_trial, excluded=ended[tuning.EXCLUDED])
    best = export.best_of_pair(results, load_trial_state)
    if best is None:
        return row
    _, hyper = config.TrialKeys.split(best.config)
    trained = config.tuned(cfg, hyper, feature)
    fs = sets[variant_of(trained, feature)]
    exported = export.Exported.of(best, fs, dataclasses.asdict(trained.model), hyper)
    net = exported.rebuild()
    row.test = report.test_scores(net, fs.splits["test"], len(fs.classes))
    name = export.export_name(model, fs.feature)
    exported = dataclasses.replace(exported, test=row.test.summary())
    exported.save([output_dir / name, run_dir / "best_models" / name])
    row.onnx_path, row.onnx_problem = _onnx(exported, probe, [output_dir, run_dir / "best_models"])
    trial = next(r for r in results if r.metrics.get("trial_id") == best.trial_id)
    row.export_path = output_dir / name
    row.val_loss, row.val_acc = best.metrics["val_loss"], best.metrics["val_acc"]
    row.params, row.config, row.trial_id = count_parameters(net), hyper, best.trial_id
    row.epochs = int(trial.metrics.get("training_iteration", 0))
    row.history = tuning.history(trial)[["epoch", "train_loss", "val_loss", "val_acc"]] \
        .to_dict("records")
    return row


def _onnx(exported: export.Exported, probe, folders: list[Path]) -> tuple[Path | None, str]:
    """The export's ONNX graph written into `folders` (its path in the first), or why it
    could not be: then no graph of an earlier run is left there beside the new .pth."""
    from genre_ray import onnx_export

    paths = [folder / onnx_export.onnx_name(exported.model, exported.feature) for folder in folders]
    problem = onnx_export.export_onnx(exported, probe, paths)
    if problem:
        for path in paths:
            path.unlink(missing_ok=True)
    return (None, problem) if problem else (paths[0], "")


def _searched(row: report.PairResult, grid, first_point: dict[str, Any], studies,
              study: str) -> None:
    """What the search found beyond the seed point: its score beside the winner's, which
    one won, and each hyperparameter's importance (from the pair's Optuna study)."""
    seed = [r for r in grid if r.config.get("pair") == row.pair
            and config.TrialKeys.split(r.config)[1] == first_point and r.metrics_dataframe is not None
            and "val_loss" in r.metrics_dataframe]
    if seed:
        row.seed_val_loss = float(tuning.history(seed[0])["val_loss"].min())
        row.winner = "seed point" if seed[0].metrics.get("trial_id") == row.trial_id else "searched"
    row.importance = tuning.importances(studies, study)


def _failure(result) -> str:
    """`<trial folder>: why it failed`, the error's last line (see its error.txt)."""
    why = result.metrics.get("diverged") or str(result.error).strip().splitlines()[-1]
    return f"{Path(result.path).name}: {why}"


def _trials(grid, max_epochs: int) -> list[dict[str, Any]]:
    """Every trial's validation loss by epoch, for plots.search_view."""
    trials = []
    for r in grid:
        frame = tuning.history(r)
        if frame is None or "val_loss" not in frame:
            continue  # failed before its first epoch, or excluded untrained
        ended = tuning.result_outcome(r, max_epochs)
        trials.append({"pair": r.config["pair"], "trial_id": r.metrics.get("trial_id", ""),
                       "epochs": frame["epoch"].tolist(), "val_loss": frame["val_loss"].tolist(),
                       "stopped": ended == tuning.PRUNED, "failed": ended == tuning.FAILED})
    return trials


def _costs(every, results: list[report.PairResult]) -> list[dict[str, Any]]:
    """Each trial that trained and measured its cost: its pair, feature, best validation
    loss and cost, and whether it is its pair's export (for report.pareto_front)."""
    exported = {r.trial_id for r in results if r.trial_id}
    found = []
    for r in every:
        frame = tuning.history(r)
        if frame is None or "val_loss" not in frame or "latency_ms" not in frame:
            continue
        loss = float(frame["val_loss"].min())
        if math.isfinite(loss):
            trial_id = r.metrics.get("trial_id", "")
            found.append({"feature": r.config["feature"], "pair": r.config["pair"],
                          "trial_id": trial_id, "val_loss": loss, "exported": trial_id in exported,
                          **{key: r.metrics[key] for key in tuning.COST_KEYS}})
    return found


def _mark_pareto(results: list[report.PairResult], costs: list[dict[str, Any]]) -> None:
    """Each exported pair's latency, and whether its export is on its feature's front."""
    by_trial = {t["trial_id"]: t for t in costs}
    for row in results:
        if row.trial_id in by_trial:
            row.latency_ms = by_trial[row.trial_id]["latency_ms"]
            row.pareto = "yes" if by_trial[row.trial_id]["front"] else "no"


def _sizes(fs: FeatureSet) -> dict[str, tuple[int, int]]:
    """Split -> (tracks, segments); training segments include the augmented copies."""
    return {name: (len(part.track_ids), len(part.x)) for name, part in fs.splits.items()}


def summary_table(summary: RunSummary) -> str:
    """What tune_main.py prints at the end of a run: the leaderboard, exports, utilisation."""
    lines = [report.table(summary.pairs), ""]
    lines += [f"{r.pair:<22}{_exports(r)}" for r in summary.pairs]
    lines.append(f"leaderboard, plots: {summary.run_dir / 'leaderboard.md'}, "
                 f"{summary.run_dir / 'plots'}/")
    if summary.copied_to:
        lines.append(f"the run's files are in {summary.copied_to}/")
    if summary.failures:
        lines.append(f"{len(summary.failures)} trial(s) failed (an error's traceback is in "
                     f"{summary.run_dir}/<trial>/error.txt):")
        lines += [f"  {line}" for line in summary.failures]
    busy = "continued run" if summary.utilisation is None else \
        f"busy {summary.utilisation:.0%} of the time"
    lines.append(f"tuning took {summary.tuning_s:.0f} s on {summary.slots} trial slots, {busy}")
    return "\n".join(lines)


def _exports(row: report.PairResult) -> str:
    """A pair's export files, or why it has none."""
    if row.export_path is None:
        return "no export: no trial finished an epoch"
    onnx = f"+ {row.onnx_path.suffix}" if row.onnx_path else f"(no .onnx: {row.onnx_problem})"
    return f"{row.export_path} {onnx}"


def _require_shared_storage(session: Session, store: storage.Storage) -> None:
    """On a cluster of more than one node, every node saves its trials' checkpoints to the
    storage path: a path only this machine has would lose them. UserError before any trial."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and store.node_local and not session.shared_storage:
        raise UserError(
            f"the Ray cluster has {nodes} nodes but --storage-path {store.uri} may be "
            "a path on this machine only: trials on other nodes could not save their "
            "checkpoints there. Pass a bucket (s3://..., gs://...), or a path every node mounts "
            "(NFS) and add --shared-storage")


def cluster_address(session: Session) -> str | None:
    """The cluster this command joins: --address, else $RAY_ADDRESS (Ray sets it to the
    cluster's for a submitted job's command; an http:// one names a job server, for
    `ray job submit`, not a cluster to join); None: a new local Ray."""
    env = os.environ.get("RAY_ADDRESS", "")
    if session.address is not None:
        return session.address
    return env if env and not env.startswith(("http://", "https://")) else None


def _require_reachable(address: str | None) -> None:
    """UserError unless HOST:PORT (or ray://HOST:PORT) answers within 5 s: ray.init would
    retry an unreachable address for minutes."""
    if address in (None, "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot reach a Ray cluster at --address {address} ({err}); check the "
                        "address (HOST:PORT of the head, e.g. 10.0.0.5:6379, or auto), start "
                        "the head with `ray start --head`, or drop --address to run locally") from None


def _slots(need: capacity.Need) -> int:
    """Trials to run at once: as many as the nodes' CPUs, GPUs and memory hold, node by
    node; says so when memory holds fewer than the CPUs and GPUs would run."""
    import ray

    nodes = ray.nodes()
    slots = capacity.slots(need, nodes)
    unbounded = capacity.slots(dataclasses.replace(need, trial=1), nodes)
    if slots < unbounded:
        print(f"memory: {slots} trial(s) at once, not {unbounded}: each trial is given "
              f"{need.trial / capacity.GB:.1f} GB beside the {need.store / capacity.GB:.1f} GB "
              "of features that a node's trials share")
    return slots


def _embedded() -> Path:
    from genre_ray.synthetic import embedded_dataset

    return embedded_dataset()
