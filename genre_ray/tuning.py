"""Stage tuning: every (model, feature) pair searched by its own Optuna study, in ONE Tuner.

Pairs run side by side, not one after another: a search's tail (its last few trials)
would leave the other slots idle, so one Tuner holds every pair's trials and keeps
every slot busy until the whole run's last trial. Inside it each pair keeps its own
search and its own early stopping:

- `PairSearcher` hands each new trial to the pair with the fewest trials so far; each
  pair has a `PrunedOptunaSearch` over its search-space file, with an explicit, seeded
  TPE sampler and its own study `<run>/<pair>` in the run's Optuna storage.
- `PairScheduler` gives each pair its own ASHAScheduler, so a pair's trials are only
  ever compared with each other (one shared ASHA killed the pairs whose losses run
  higher, whatever their promise).
- ASHA-stopped trials are told to Optuna as PRUNED (Tune reports them as complete,
  which would mislead TPE); a trial that errors or whose loss is not finite as FAIL:
  `trials.outcome`, the rule the leaderboard and the search plot use too.

The run's Tune results leave this stage as plain records (`records`, trials.TrialRecord).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import pickle
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from genre_ray import cost as cost_limits
from genre_ray import runs
from genre_ray.config import Config, Search
from genre_ray.internals import (asked, deleted_checkpoints_stay_deleted, memory_kills_fail_trials,
                                 snapshots_name_kept_checkpoints, study_of, told)
from genre_ray.search_space import SearchSpace
from genre_ray.storage import JOURNAL, RunFolder, Storage, StorageError
from genre_ray.trials import (COST_KEYS, EPOCH_KEYS, EXCLUDED, FAILED, FINISHED, PRUNED, TrialKeys,
                              TrialRecord, outcome)

METRIC, MODE = "val_loss", "min"
TIME_ATTR = "training_iteration"  # one per epoch
MAX_FAILURES = 2  # retries of a failed trial (lost node, out of memory), from its checkpoint
KEEP_CHECKPOINTS = 3  # per trial, the best by its state's loss (make_tuner says why not fewer)


def pair_name(model: str, feature: str) -> str:
    return f"{model}_{feature}"


def result_outcome(result, max_epochs: int) -> str:
    """trials.outcome of a Tune `Result` (a trial of the ResultGrid)."""
    failed = bool(result.error or result.metrics.get("diverged"))
    return outcome(int(result.metrics.get(TIME_ATTR, 0)), max_epochs, failed,
                   bool(result.metrics.get("excluded")))


def history(result):
    """A trial's results by epoch (a Tune `Result`'s metrics_dataframe), each epoch once,
    its last report: a trial continued from a checkpoint (a lost node, a lost driver)
    reports the epochs after that checkpoint again. None if it reported none."""
    frame = result.metrics_dataframe
    if frame is None or TIME_ATTR not in frame:
        return frame
    return frame.drop_duplicates(TIME_ATTR, keep="last").reset_index(drop=True)


def records(results, max_epochs: int) -> list[TrialRecord]:
    """Tune `Result`s (a ResultGrid, a saved round's) as the plain records everything after
    tuning reads: the one place a run's Tune results are read."""
    return [_record(result, max_epochs) for result in results]


def _record(result, max_epochs: int) -> TrialRecord:
    from genre_ray.export import CHECKPOINT_METRIC

    metrics, frame, config = result.metrics or {}, history(result), result.config or {}
    epochs = [] if frame is None else [
        {key: row[key] for key in EPOCH_KEYS if key in frame} for row in frame.to_dict("records")]
    ended = result_outcome(result, max_epochs)
    # a trial that failed before its first report has no config in a saved run's results:
    # its folder says which (_trial_name)
    pair, _, trial_id = Path(result.path).name.rpartition("_")
    pair = config.get("pair", pair)
    return TrialRecord(
        metrics.get("trial_id", trial_id), pair, config.get("feature", pair.partition("_")[2]),
        dict(config), ended, int(metrics.get(TIME_ATTR, 0)), epochs,
        {key: metrics[key] for key in COST_KEYS if key in metrics}, metrics.get("time_total_s", 0.0),
        [(checkpoint, scores.get(CHECKPOINT_METRIC, math.inf))
         for checkpoint, scores in result.best_checkpoints or []],
        _failure(result) if ended == FAILED else "")


def _failure(result) -> str:
    """`<trial folder>: why it failed`, the error's last line (see its error.txt)."""
    why = result.metrics.get("diverged") or str(result.error).strip().splitlines()[-1]
    return f"{Path(result.path).name}: {why}"


TUNE_TRIAL = "tune_trial_id"  # user attr of an Optuna trial: the Tune trial it was asked for


def settle(storage: optuna.storages.BaseStorage, study: str, ended: list[TrialRecord]) -> None:
    """Tell each pair's study (`<study>/<pair>`) how every trial Tune ended (`ended`) went,
    where the study still holds it RUNNING: a continued driver can end a trial without its
    searcher hearing of it (seen once, after a continuation from a storage that had stopped
    mid-run), and a trial left RUNNING is one TPE's constant liar counts in every later round."""
    by_id = {record.trial_id: record for record in ended}
    for pair in sorted({record.pair for record in ended}):
        pair_study = optuna.load_study(study_name=f"{study}/{pair}", storage=storage)
        for trial in pair_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            record = by_id.get(trial.user_attrs.get(TUNE_TRIAL))
            if record is None:
                continue
            state = OPTUNA_STATE[record.outcome]
            value = record.epochs[-1].get(METRIC, math.nan) if record.epochs else math.nan
            if state == TrialState.COMPLETE and not _finite(value):
                state = TrialState.FAIL  # as on_trial_complete tells a non-finite loss
            pair_study.tell(trial.number, value if state == TrialState.COMPLETE else None, state=state)


# an excluded trial is PRUNED with its cost over a limit: TPE's constraints see it (constraints)
OPTUNA_STATE = {FINISHED: TrialState.COMPLETE, PRUNED: TrialState.PRUNED, FAILED: TrialState.FAIL,
                EXCLUDED: TrialState.PRUNED}


class PrunedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells scheduler-stopped trials as PRUNED and bad ones as FAIL.

    Tune skips `on_trial_result` for the result on which the scheduler stops a trial,
    so a completing result with a later step than the last one seen was a stop.
    """

    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._last_step: dict[str, int] = {}
        self._told_step: dict[str, int] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in told(self):  # told before the driver was lost (reconcile)
            return
        step = self._last_step[trial_id] = result.get(TIME_ATTR, 0)
        # a step told before: a trial restarted from an earlier checkpoint (or from scratch)
        # after a lost node or a restore; Optuna keeps the first value of a step
        if _finite(result.get(self.metric)) and step > self._told_step.get(trial_id, 0):
            self._told_step[trial_id] = step
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in told(self):  # told before the driver was lost (reconcile)
            return
        if trial_id not in asked(self):
            return super().on_trial_complete(trial_id, result, error)
        trial, result = asked(self)[trial_id], result or {}
        value, step = result.get(self.metric), int(result.get(TIME_ATTR, 0))
        excluded = bool(result.get("excluded"))
        state = OPTUNA_STATE[outcome(step, self._max_t, error or not _finite(value), excluded)]
        cost = {key: result[key] for key in COST_KEYS if key in result}
        if cost:
            trial.set_user_attr("cost", cost)  # what constraints() reads
        if state != TrialState.FAIL and not excluded and step > self._last_step.get(trial_id, 0):
            trial.report(float(value), step)  # the result Tune stopped it on: not seen above
        if state == TrialState.COMPLETE:
            study_of(self).tell(trial, float(value), state=state)
        else:
            study_of(self).tell(trial, state=state)  # PRUNED: its value is its last intermediate
        told(self).add(trial_id)
        self._forget(trial_id)

    def _forget(self, trial_id: str) -> None:
        """Drop a told trial's Optuna handle and steps (the study holds the trial), so what
        Tune pickles at every experiment snapshot (PairSearcher.save) grows with the running
        trials, not the whole run: at 2,000 trials over 10 pairs, 0.35 MB in 5 ms instead of
        1.4 MB in 38 ms (bench/control_plane.py)."""
        asked(self).pop(trial_id, None)
        self._last_step.pop(trial_id, None)
        self._told_step.pop(trial_id, None)

    def reconcile(self) -> None:
        """Make the study and this searcher agree after a restore. A driver killed without
        saving (SIGKILL, a lost head) leaves Tune's last saved state behind the study: the
        study's RUNNING trials this searcher does not know were asked for after that state
        and no Tune trial will finish them (left RUNNING, they would skew TPE's constant
        liar): told FAIL. Trials it knows that the study has finished, or lacks (the journal
        behind the state), are not told again: Tune reruns them from their checkpoints, and
        their results reach the leaderboard, not the study a second time."""
        study = {trial.number: trial for trial in study_of(self).get_trials(deepcopy=False)}
        known = {}
        for trial_id, trial in list(asked(self).items()):
            frozen = study.get(trial.number)
            if frozen is None or frozen.state.is_finished():
                told(self).add(trial_id)
                self._forget(trial_id)
            else:
                known[trial.number] = trial_id
        for number, frozen in study.items():
            if frozen.state == TrialState.RUNNING and number not in known:
                study_of(self).tell(number, state=TrialState.FAIL)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class PairSearcher(Searcher):
    """One searcher per pair behind Tune's single Searcher interface.

    Each suggestion goes to the pair with the fewest trials so far (ties: the order
    given), and carries the pair's constant keys; results are routed back by trial id.
    """

    def __init__(self, searchers: dict[str, PrunedOptunaSearch], budgets: dict[str, int],
                 constants: dict[str, dict[str, Any]], storage: RunStorage | None = None) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._searchers, self._budgets, self._constants = searchers, budgets, constants
        self._storage = storage  # its journal goes to the run's storage before each save
        self._started: Counter[str] = Counter()
        self._owner: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return False  # each pair's searcher owns its space

    def suggest(self, trial_id: str) -> dict | str | None:
        open_pairs = [p for p in self._searchers if self._started[p] < self._budgets[p]]
        if not open_pairs:
            return Searcher.FINISHED
        for pair in sorted(open_pairs, key=lambda p: self._started[p]):
            config = self._searchers[pair].suggest(trial_id)
            if config is not None and config != Searcher.FINISHED:
                asked(self._searchers[pair])[trial_id].set_user_attr(TUNE_TRIAL, trial_id)
                self._started[pair] += 1
                self._owner[trial_id] = pair
                return {**config, **self._constants[pair]}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._searchers[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._owner:  # the last word on a trial: forget it (see _forget)
            self._searchers[self._owner.pop(trial_id)].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        """Tune saves this with its experiment state, then puts both in the storage: the
        journal goes first, so a state restored from the storage never names a trial the
        journal there lacks."""
        if self._storage is not None:
            with contextlib.suppress(StorageError):  # the run's keeper stops the run if it lasts
                self._storage.journal.flush()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        for searcher in self._searchers.values():
            searcher.reconcile()


class PairScheduler(FIFOScheduler):
    """One trial scheduler per pair, chosen by a trial's `config["pair"]`."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self._schedulers = schedulers

    def _of(self, trial) -> TrialScheduler:
        return self._schedulers[trial.config["pair"]]

    def on_trial_add(self, controller, trial) -> None:
        self._of(trial).on_trial_add(controller, trial)

    def on_trial_error(self, controller, trial) -> None:
        self._of(trial).on_trial_error(controller, trial)

    def on_trial_result(self, controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(controller, trial, result)

    def on_trial_complete(self, controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(controller, trial, result)

    def on_trial_remove(self, controller, trial) -> None:
        self._of(trial).on_trial_remove(controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{pair}: {s.debug_string()}" for pair, s in self._schedulers.items())


def constraints(trial: optuna.trial.FrozenTrial, search: Search) -> list[float]:
    """TPE's constraints_func: the trial's cost over the search's limits (> 0 violates)."""
    return cost_limits.constraint_values(trial.user_attrs.get("cost", {}), search)


def build_search(pairs: list[tuple[str, str]], spaces: dict[str, SearchSpace], cfg: Config,
                 study: str, storage: optuna.storages.BaseStorage,
                 round_: int = 0) -> tuple[PairSearcher, PairScheduler]:
    """The searcher and scheduler of a run over `pairs` of (model, feature), as `cfg.search`
    says, seeded by `cfg.run.seed`; each pair's study is `<study>/<pair>` in `storage`.

    `round_` > 0: a run grown by `cfg.search.num_samples` more trials per pair. Each study
    goes on (Optuna loads it: TPE models every earlier trial, none is rerun), without the
    first point (round 0 ran it) and with samplers seeded anew for the round; a trial an
    interrupted driver had asked for and never told is told FAIL first.

    With a cost limit (search.max_latency_ms, max_params), TPE samples under Optuna's
    constraints: each told trial carries its cost (user attr `cost`), and one over a limit
    (excluded, PRUNED untrained) is infeasible, so TPE learns to sample within them."""
    search, searchers, constants = cfg.search, {}, {}
    limited = search.max_latency_ms is not None or search.max_params is not None
    limits = functools.partial(constraints, search=search) if limited else None  # picklable
    for i, (model, feature) in enumerate(pairs):
        pair = pair_name(model, feature)
        space = spaces[model].of(feature)
        sampler = optuna.samplers.TPESampler(  # explicit: Optuna 5 changed TPE's defaults
            seed=cfg.run.seed + i + round_ * len(pairs), n_startup_trials=search.n_startup_trials,
            multivariate=True, constant_liar=True, constraints_func=limits)
        searchers[pair] = PrunedOptunaSearch(
            space.distributions, metric=METRIC, mode=MODE, sampler=sampler,
            points_to_evaluate=None if round_ else [space.first_point], storage=storage,
            study_name=f"{study}/{pair}", max_t=search.max_epochs)
        if round_:
            searchers[pair].reconcile()
        constants[pair] = dataclasses.asdict(TrialKeys(
            pair, model, feature, search.max_epochs, cfg.run.seed, checkpoint_epochs(search)))
    budgets = {pair: search.num_samples for pair in searchers}
    grace = min(search.grace_period, search.max_epochs)  # ASHA asserts grace <= max_t
    scheduler = PairScheduler({pair: ASHAScheduler(
        metric=METRIC, mode=MODE, time_attr=TIME_ATTR, max_t=search.max_epochs,
        grace_period=grace, reduction_factor=search.reduction_factor) for pair in searchers})
    return PairSearcher(searchers, budgets, constants,
                        storage if isinstance(storage, RunStorage) else None), scheduler


def checkpoint_epochs(search: Search) -> list[int]:
    """The epochs a trial may checkpoint at (trainable.BestSaver): ASHA's rungs, grace x
    reduction_factor^k below max_epochs, where it may be stopped, and the last epoch."""
    grace = min(search.grace_period, search.max_epochs)
    rungs = itertools.takewhile(lambda epoch: epoch < search.max_epochs,
                                (grace * search.reduction_factor ** k for k in itertools.count()))
    return [*rungs, search.max_epochs]


def _trial_name(trial) -> str:
    """`<model>_<feature>_<trial id>`: short, and says which pair (Ray's default lists
    every hyperparameter in the folder name)."""
    return f"{trial.config['pair']}_{trial.trial_id}"


class RunJournal(JournalFileBackend):
    """The run's Optuna journal: Optuna's journal file in the run's folder, kept in the
    run's storage (`flush`: its new lines as one more part, storage.RunFolder). Pickled as
    its run, so a searcher restored on another machine (a new head) writes that
    machine's copy, pulled from the storage."""

    def __init__(self, folder: RunFolder) -> None:
        folder.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(str(folder.dir / JOURNAL))
        self.folder = folder

    def __reduce__(self):
        return RunJournal, (self.folder,)

    def flush(self) -> None:
        self.folder.push_appended()


class RunStorage(optuna.storages.JournalStorage):
    """The JournalStorage of a RunJournal, which it names (`journal`)."""

    def __init__(self, journal: RunJournal) -> None:
        super().__init__(journal)
        self.journal = journal


def optuna_storage(where: Path | RunFolder) -> RunStorage:
    """The run's Optuna storage: its journal (a RunFolder's, or a folder's on this machine),
    readable with optuna.load_study."""
    if isinstance(where, Path):
        local = Storage(str(where.parent.resolve()), where.parent.resolve())
        where = local.folder(where.name)
    return RunStorage(RunJournal(where))


def importances(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, float]:
    """Each hyperparameter's importance to the pair's validation loss (Optuna's default
    evaluator, PED-ANOVA) over every trial that reported one, ASHA-stopped trials by the
    best loss they reached (with ASHA few trials complete); {} under 3 such trials."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    scored = optuna.create_study(direction=MODE + "imize")
    for trial in study.get_trials(deepcopy=False):
        losses = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
        if losses and trial.distributions:
            scored.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions=trial.distributions, value=min(losses)))
    if len(scored.trials) < 3:
        return {}
    return {k: round(v, 3) for k, v in optuna.importance.get_param_importances(scored).items()}


def fit(feature_refs: dict[str, Any], searcher: PairSearcher, scheduler: PairScheduler,
        run_cfg: Config, **kwargs: Any):
    """Run every pair's trials in one Tuner (`make_tuner`'s); returns Tune's ResultGrid."""
    return make_tuner(feature_refs, searcher, scheduler, run_cfg, **kwargs).fit()


def make_tuner(feature_refs: dict[str, Any], searcher: PairSearcher, scheduler: PairScheduler,
               run_cfg: Config, *, storage_path: str, name: str, num_trials: int, cpus_per_trial: float,
               gpus_per_trial: float, max_concurrent: int, memory_per_trial: int = 0,
               callbacks: list | None = None, stop: Any = None, verbose: int = 1, trainable=None,
               keep_checkpoints: int | None = KEEP_CHECKPOINTS):
    """One Tuner over every pair's trials, each given the run's `run_cfg` (the trainable's
    `run_cfg`: what its hyperparameters go into). `stop`: Tune's RunConfig(stop=...), e.g. a
    Stopper that ends the run at a budget. `trainable`: a function trainable taking
    `(config, feature_refs, run_cfg)` in place of `trainable.train_pair` (benches).

    The feature sets reach trials through `tune.with_parameters` as object refs put
    once per run (`feature_refs`: FeatureSet.variant -> ref); each trial fetches only its
    own feature variant. Checkpoints are bounded to
    `keep_checkpoints` per trial, ranked by the loss of the state they hold (a trial
    checkpoints its best state, and only when it improved, so the best is also the latest,
    which is what a resume needs).

    Why three kept: Tune snapshots the whole experiment (every trial's state, the
    searcher) after every `num_to_keep - 1` checkpoints of a trial
    (internals.snapshots_name_kept_checkpoints), so that a snapshot never names a
    deleted checkpoint, and a snapshot costs more as trials accumulate.
    bench/control_plane.py (32 logical slots, 0.5 s epochs, 150 s): a snapshot after every
    checkpoint, the driver's CPU per trial went 87 -> 402 ms over 400 trials (utilisation
    24 %); after every second, 37 -> 74 ms over 730 trials (42 %, the rest is 32 workers on
    2 cores), one driver core then starting 17 trials/s. A trial checkpoints only at ASHA's
    rungs and its last epoch (trainable.BestSaver), so three is a few MB to ~510 MB (MLP on
    waveforms with Adam).
    """
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from genre_ray.export import CHECKPOINT_METRIC

    _prepare_tune()
    return tune.Tuner(
        _trainable(feature_refs, run_cfg, cpus_per_trial, gpus_per_trial, memory_per_trial,
                   trainable),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_trials, max_concurrent_trials=max_concurrent,
                                    reuse_actors=True,  # no process start per trial
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=verbose, stop=stop,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *(callbacks or [])],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints,
                                                    checkpoint_score_attribute=CHECKPOINT_METRIC,
                                                    checkpoint_score_order=MODE),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)))


def _prepare_tune() -> None:
    """What every Tuner of a run needs, new or restored: internals' patches, and
    Tune's options read from the environment at fit time (process-wide; a user's own
    setting is kept)."""
    memory_kills_fail_trials()
    deleted_checkpoints_stay_deleted()
    snapshots_name_kept_checkpoints()
    # Tune's default loggers are CSV, JSON and TensorBoard. The run reads progress.csv and
    # result.json (ResultGrid, plots) and logs to W&B, never to TensorBoard, whose writer
    # flushes its event file at every result: a quarter of the driver's CPU per trial
    # (400 -> 300 ms at 200 trials over 32 slots, bench/control_plane.py's trainable).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune warns when it snapshots the experiment more often than every 5 s, which two
    # checkpoints kept per trial (KEEP_CHECKPOINTS, make_tuner says why) makes it do with short epochs:
    # chosen, so not worth a warning per snapshot.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def restore_tuner(path: str, feature_refs: dict[str, Any], run_cfg: Config,
                  cpus_per_trial: float, gpus_per_trial: float, memory_per_trial: int = 0):
    """The Tuner of an interrupted run at `path` (Tune's experiment folder): finished
    trials are kept, unfinished ones continue from their checkpoints, errored ones stay
    errored. Searcher (each pair's Optuna study, trial counts), scheduler and callbacks
    come from the saved state; the feature sets are this Ray's `feature_refs`, and
    `run_cfg` the run's saved configuration."""
    from ray import tune

    _prepare_tune()
    return tune.Tuner.restore(path, _trainable(feature_refs, run_cfg, cpus_per_trial,
                                               gpus_per_trial, memory_per_trial),
                              resume_unfinished=True, resume_errored=False)


def _trainable(feature_refs: dict[str, Any], run_cfg: Config, cpus_per_trial: float,
               gpus_per_trial: float, memory_per_trial: int = 0, trainable=None):
    """The trainable with its resources: `memory_per_trial` bytes are reserved on the node
    (capacity.py), so Ray places no more trials on a node than its memory holds."""
    from ray import tune

    if trainable is None:
        from genre_ray.trainable import train_pair as trainable

    return tune.with_resources(tune.with_parameters(trainable, feature_refs=feature_refs,
                                                    run_cfg=run_cfg),
                               {"cpu": cpus_per_trial, "gpu": gpus_per_trial,
                                "memory": memory_per_trial})


def interrupted(experiment_path: str, num_trials: int, grid) -> bool:
    """Whether the run at `experiment_path` stopped before its end (Ctrl-C), judged from
    the state Tune saved last: the ResultGrid cannot tell, as Tune marks its running
    trials TERMINATED when it stops, after saving them as unfinished. A trial `grid` (the
    ResultGrid) holds an error for has ended, even where Tune saved it as running (seen
    after a trial's last retry failed on a worker Ray's memory monitor killed)."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    errored = {Path(r.path).name.rsplit("_", 1)[-1] for r in grid if r.error}  # _trial_name
    trials = ExperimentAnalysis(experiment_path).trials
    return len(trials) < num_trials or any(
        t.status not in (Trial.TERMINATED, Trial.ERROR) and t.trial_id not in errored
        for t in trials)


def fit_in_main_thread(tuner):
    """`tuner.fit()`, then the SIGINT and SIGUSR1 handlers as they were before: Tune sets
    its own for the fit and leaves them set, so a later Ctrl-C (during exports) would only
    log "ending Ray Tune run"."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        return tuner.fit()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class Tuned:
    """How the Tuner ran: its wall seconds, trial slots and the cluster's hardware."""

    seconds: float
    slots: int
    hardware: str


def tune_round(cfg: Config, sets: dict[str, Any], pairs: list[tuple[str, str]],
               spaces: dict[str, SearchSpace], run_: runs.Run, mode: str | None, slots: int,
               trial_bytes: int) -> tuple[Any, Tuned]:
    """The run's round (a grown run's: its own trials per pair) as one Tuner over every
    pair (new, or restored from the run's saved state), on the Ray this process joined:
    its ResultGrid, and how it ran. `sets`: the feature sets (features.FeatureSet) by
    variant; `mode`: W&B's (tracking.resolve_mode); `trial_bytes`: memory per trial."""
    import ray

    from genre_ray.cluster import hardware
    from genre_ray.tracking import wandb_callback
    from genre_ray.trainable import share

    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, num_samples=run_.rounds[-1]))
    refs = {fs.variant: share(fs) for fs in sets.values()}  # once per run, shared by all trials
    resources = {"cpus_per_trial": cfg.resources.cpus_per_trial,
                 "gpus_per_trial": cfg.resources.gpus_per_trial, "memory_per_trial": trial_bytes}
    start, store = time.perf_counter(), run_.folder.store
    tune_name = runs.round_name(run_.name, run_.round)
    if run_.resume and runs.tune_state_exists(store, tune_name):
        tuner = restore_tuner(store.tune_uri(tune_name), refs, cfg, **resources)
    else:
        callbacks = wandb_callback(mode, project=cfg.tracking.wandb_project, run_dir=run_.dir,
                                   classes=next(iter(sets.values())).classes)
        parent, _, folder = tune_name.rpartition("/")  # a later round: inside the run's folder
        tuner = make_tuner(refs, *_round_search(cfg, pairs, spaces, run_), cfg, **resources,
                           storage_path=store.tune_uri(parent),
                           name=folder, num_trials=cfg.search.num_samples * len(pairs),
                           max_concurrent=slots, callbacks=callbacks)
    grid = fit_in_main_thread(tuner)
    return grid, Tuned(time.perf_counter() - start, slots, hardware(ray.nodes()))


def _round_search(cfg: Config, pairs: list[tuple[str, str]], spaces: dict[str, SearchSpace],
                  run_: runs.Run) -> tuple[PairSearcher, PairScheduler]:
    """A new round's searcher and scheduler. The first round's over a fresh Optuna journal
    (one left by a start that never reached its Tuner would hold its first points a second
    time); a later round's go on with the pairs' studies in the run's journal."""
    if run_.round == 0:
        run_.folder.reset_journal()
    return build_search(pairs, spaces, cfg, run_.name, optuna_storage(run_.folder),
                        round_=run_.round)


def earlier_rounds(run_: runs.Run) -> list:
    """The trials (Tune Results) of the run's rounds before this command's, as saved."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    store = run_.folder.store
    return [result for k in range(run_.round) for result in ResultGrid(ExperimentAnalysis(
        store.tune_path(runs.round_name(run_.name, k)), default_metric=METRIC,
        default_mode=MODE))]


def busy_seconds(results) -> float:
    """Seconds trials spent in their trainable (Tune's `time_total_s`: setup and epochs),
    summed over `results` (Tune `Result`s); starting a trial is not counted."""
    return sum(r.metrics.get("time_total_s", 0.0) for r in results if r.metrics)


def utilisation(grid, wall_s: float, slots: int) -> float:
    """Busy trial-seconds over `wall_s` x `slots`: the share of the run's trial slots that
    trials kept busy; starting a trial, and a slot left empty, count as idle."""
    return busy_seconds(grid) / (wall_s * slots)
