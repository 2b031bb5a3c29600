"""The one place genre-ray uses private names of Ray, Optuna, W&B and torch.onnx.

Each use names the private name it touches and the behaviour of the pinned version it
relies on or works around; tests/test_internals.py fails by name when an upgrade moves
or changes them. Four kinds: patches of Tune's behaviour, the Optuna handles of Ray's
OptunaSearch, Ray's per-trial W&B logger run as a driver thread, and torch.onnx's table of
ONNX functions built once per process.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from queue import Queue
from typing import Any

import optuna
from pyarrow.fs import FileType
from ray.air.execution._internal.actor_manager import RayActorManager
from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor
from ray.exceptions import OutOfMemoryError, RayActorError
from ray.train._internal import checkpoint_manager
from ray.tune.execution.tune_controller import TuneController
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


# ---- patches of the pinned Tune ----------------------------------------------------------

def memory_kills_fail_trials() -> None:
    """Make a trial that Ray's memory monitor kills a failed trial, not a crashed run.

    The monitor kills a worker with `OutOfMemoryError`, which the pinned Tune's
    `RayActorManager._actor_task_failed` handles as neither an actor nor a task error: it
    raises "Caught unexpected exception", and tune_main.py died with a traceback, nothing
    exported (measured at GTZAN size). The worker is dead, as after any actor death, so the
    error is handed on as a RayActorError: Tune fails the trial, retries it from its
    checkpoint (FailureConfig), and the run goes on. Idempotent."""
    original = RayActorManager._actor_task_failed
    if hasattr(original, "__wrapped__"):
        return

    @functools.wraps(original)
    def _actor_task_failed(self, tracked_actor_task, exception: Exception) -> None:
        if isinstance(exception, OutOfMemoryError):
            exception = RayActorError(error_msg=f"killed by Ray's memory monitor: {exception}")
        original(self, tracked_actor_task, exception)

    RayActorManager._actor_task_failed = _actor_task_failed


def deleted_checkpoints_stay_deleted() -> None:
    """Let Tune drop a checkpoint that is already gone, without an error.

    A driver killed without saving (SIGKILL, a lost head) leaves Tune's last saved state
    naming checkpoints it deleted afterwards (a trial keeps the best three). Continued from
    that state, the pinned Tune's `_CheckpointManager.register_checkpoint` deletes them
    again through `checkpoint_manager._delete_fs_path`, which raises FileNotFoundError for
    a missing path before its own error handling: a traceback per checkpoint, and the
    trial's new checkpoint left out of the next experiment snapshot. A missing path is
    deleted already. Idempotent."""
    original = checkpoint_manager._delete_fs_path
    if hasattr(original, "__wrapped__"):
        return

    @functools.wraps(original)
    def _delete_fs_path(fs, fs_path: str) -> None:
        if fs.get_file_info(fs_path).type != FileType.NotFound:
            original(fs=fs, fs_path=fs_path)

    checkpoint_manager._delete_fs_path = _delete_fs_path


def snapshots_name_kept_checkpoints() -> None:
    """Snapshot the experiment one trial checkpoint before Tune can delete the checkpoint
    the last snapshot names.

    The pinned `TuneController._create_checkpoint_manager` forces an experiment snapshot
    after every `num_to_keep` checkpoints of a trial (`_ExperimentCheckpointManager.
    _sync_every_n_trial_checkpoints`), yet `_CheckpointManager.register_checkpoint` deletes
    the oldest kept checkpoint at that same checkpoint, before the forced snapshot reaches
    the storage. A driver killed in between (SIGKILL, a lost head) leaves a snapshot that
    names a deleted checkpoint, and the continued trial fails in `Trainable.restore` ("does
    not exist on storage anymore"; seen on S3 in tests/test_storage.py). Forced every
    `num_to_keep - 1` checkpoints (at least 1), the snapshot names a checkpoint that the
    next deletion keeps. Idempotent."""
    original = TuneController._create_checkpoint_manager
    if hasattr(original, "__wrapped__"):
        return

    @functools.wraps(original)
    def _create_checkpoint_manager(self):
        manager = original(self)
        keep = self._trial_checkpoint_config.num_to_keep
        if keep is not None:
            manager._sync_every_n_trial_checkpoints = max(1, keep - 1)
        return manager

    TuneController._create_checkpoint_manager = _create_checkpoint_manager


# ---- Ray's OptunaSearch: its Optuna handles ----------------------------------------------

def asked(searcher: OptunaSearch) -> dict[str, optuna.Trial]:
    """Trial id -> the Optuna trial OptunaSearch asked its study for (`_ot_trials`), live:
    filled by `suggest`, never emptied by the pinned OptunaSearch itself."""
    return searcher._ot_trials


def study_of(searcher: OptunaSearch) -> optuna.Study:
    """The study OptunaSearch asks and tells (`_ot_study`)."""
    return searcher._ot_study


def told(searcher: OptunaSearch) -> set[str]:
    """The trial ids OptunaSearch has told its study (`_completed_trials`), live."""
    return searcher._completed_trials


# ---- Ray's W&B logger, as threads of the driver ------------------------------------------

class WandbThreadLogger(_WandbLoggingActor):
    """Ray's per-trial W&B logger, run as a thread of the driver rather than as an actor.

    Ray starts two processes per trial for W&B (a Queue actor and a logging actor, each
    importing Ray and wandb). On a 2-core laptop those starts took a fifth of the CPU of
    a 30-trial run and stalled the driver about 1 s per trial. Since wandb 0.19 one
    process holds many runs (`reinit="create_new"`), so each trial's run lives in a thread
    of the driver, fed by a plain queue, and every run shares the driver's one wandb
    service. Ray's result handling (`_handle_result`: excludes, config keys, allowed
    types) is kept, as `row`; the run is addressed directly (`wandb_run`), never through
    the global `wandb.run`, as several are open at once. Ray's actor also `chdir`s into the
    trial folder: not in a driver.
    """

    def __init__(self, logdir: str, queue: Queue, exclude: list[str], to_config: list[str],
                 **init_kwargs: Any) -> None:
        import wandb

        self._wandb, self.queue, self._logdir = wandb, queue, logdir
        self._exclude, self._to_config = set(exclude), set(to_config)
        self.kwargs = {**init_kwargs, "reinit": "create_new"}
        self.name = init_kwargs.get("name", "unknown")

    def run(self) -> None:
        try:
            self.wandb_run = self._wandb.init(**self.kwargs)
        except Exception:  # the run goes on without this trial's W&B run; say why
            log.exception("W&B could not start the run of %s", self.name)
            return
        self.wandb_run.config.update({"trial_log_path": self._logdir})
        while (item := self.queue.get())[0] != _QueueItem.END:
            if item[0] == _QueueItem.RESULT:  # checkpoints are not uploaded (upload_checkpoints)
                row, config_update = self.row(item[1])
                self.wandb_run.config.update(config_update, allow_val_change=True)
                self.wandb_run.log(row, step=row.get("training_iteration"))
        self.wandb_run.finish()

    def row(self, result: dict) -> tuple[dict, dict]:
        """(the history row, the config update) of one Tune result, as Ray's logger makes them."""
        return self._handle_result(result)


class WandbThreadCallback(WandbLoggerCallback):
    """WandbLoggerCallback whose trials are logged by `new_logger`'s WandbThreadLogger in a
    driver thread each, a trial continued after a restore in the run it had, and a
    shutdown bounded on Ctrl-C."""

    def new_logger(self, trial: Any, queue: Queue, exclude: list[str],
                   init_kwargs: dict[str, Any]) -> WandbThreadLogger:
        return WandbThreadLogger(trial.local_path, queue, exclude, self.AUTO_CONFIG_KEYS,
                                 **init_kwargs)

    def _start_logging_actor(self, trial, exclude_results: list[str], **init_kwargs: Any) -> None:
        if trial in self._trial_logging_futures:  # a restarted trial keeps its run
            return
        queue: Queue = Queue()
        logger = self.new_logger(trial, queue, exclude_results, init_kwargs)
        thread = threading.Thread(target=logger.run, name=f"wandb-{trial.trial_id}", daemon=True)
        thread.start()
        self._trial_queues[trial], self._trial_logging_actors[trial] = queue, logger
        self._trial_logging_futures[trial] = thread

    def _cleanup_logging_actors(self, timeout: float = 0, kill_on_timeout: bool = False) -> None:
        """Forget the loggers whose run has finished, waiting up to `timeout` s in all;
        with `kill_on_timeout`, forget the rest too (daemon threads end with the driver)."""
        deadline = time.monotonic() + timeout
        for trial, thread in list(self._trial_logging_futures.items()):
            thread.join(max(0.0, deadline - time.monotonic()))
            if kill_on_timeout or not thread.is_alive():
                for table in (self._trial_queues, self._trial_logging_actors,
                              self._trial_logging_futures):
                    del table[trial]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # On Ctrl-C Tune stops trials without log_trial_end, so their loggers would wait for
        # results until upload_timeout with the run unclosed: tell each one to finish first
        # (queue END -> run.finish()), then wait as usual.
        for trial in list(self._trial_logging_actors):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


# ---- torch.onnx's exporter: its table of ONNX functions ----------------------------------

def onnx_functions_built_once() -> None:
    """Build torch.onnx's table of ATen -> ONNX functions once per process, not per export.

    The pinned dynamo exporter builds it (`ONNXRegistry.from_torchlib`, about 0.9 CPU-s)
    in every `torch.onnx.export`, and a run exports one graph per pair. Each export still
    gets a table of its own: a copy of the one built, which it may register into."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    if getattr(ONNXRegistry.from_torchlib, "built_once", False):
        return
    build, built, lock = ONNXRegistry.from_torchlib.__func__, {}, threading.Lock()

    @functools.wraps(build)
    def from_torchlib(cls, *args: Any, **kwargs: Any):
        key = (cls, args, tuple(sorted(kwargs.items())))
        with lock:
            if key not in built:
                built[key] = build(cls, *args, **kwargs)
        table = cls.__new__(cls)
        table.__dict__.update(built[key].__dict__)
        table.functions = {target: list(metas) for target, metas in built[key].functions.items()}
        return table

    from_torchlib.built_once = True
    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
