"""The one place genre-ray reaches into Ray's private internals.

Each patch names the private name it touches and the behaviour of the pinned Ray it
works around; tests/test_ray_internals.py fails by name when an upgrade moves them.
"""
from __future__ import annotations

import functools

from pyarrow.fs import FileType
from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import OutOfMemoryError, RayActorError
from ray.train._internal import checkpoint_manager
from ray.tune.execution.tune_controller import TuneController


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
