"""The private Ray internals genre_ray.ray_internals patches: still where the patch
expects them, with the behaviour it works around, and the patch doing its one job."""
from __future__ import annotations

import inspect

import pytest

from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import OutOfMemoryError, RayActorError

from genre_ray import ray_internals


def test_tune_still_crashes_on_memory_kills_where_the_patch_expects():
    original = inspect.unwrap(RayActorManager._actor_task_failed)
    assert list(inspect.signature(original).parameters) == ["self", "tracked_actor_task", "exception"]
    source = inspect.getsource(original)
    # what the patch works around: an error neither RayActorError nor RayTaskError crashes
    assert "RayActorError" in source and "Caught unexpected exception" in source


def test_a_memory_kill_reaches_tune_as_an_actor_death(monkeypatch):
    seen = []
    monkeypatch.setattr(RayActorManager, "_actor_task_failed",
                        lambda self, task, exception: seen.append(exception))
    ray_internals.memory_kills_fail_trials()
    kill = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")
    RayActorManager._actor_task_failed(None, None, kill)
    other = RuntimeError("anything else")
    RayActorManager._actor_task_failed(None, None, other)
    assert isinstance(seen[0], RayActorError) and "killed by Ray's memory monitor" in str(seen[0])
    assert "running low on memory" in str(seen[0]) and seen[1] is other
    ray_internals.memory_kills_fail_trials()  # idempotent: not wrapped twice
    assert inspect.unwrap(RayActorManager._actor_task_failed) is not RayActorManager._actor_task_failed
    assert RayActorManager._actor_task_failed.__wrapped__.__name__ == "<lambda>"


def test_tune_still_deletes_checkpoints_through_the_function_the_patch_wraps(tmp_path):
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal import checkpoint_manager

    original = inspect.unwrap(checkpoint_manager._delete_fs_path)
    assert list(inspect.signature(original).parameters) == ["fs", "fs_path"]
    assert "_delete_fs_path(fs=checkpoint.filesystem" in inspect.getsource(checkpoint_manager)
    with pytest.raises(FileNotFoundError):  # what the patch works around
        original(fs=LocalFileSystem(), fs_path=str(tmp_path / "gone"))


def test_a_checkpoint_already_deleted_is_deleted_without_an_error(tmp_path):
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal import checkpoint_manager

    ray_internals.deleted_checkpoints_stay_deleted()
    ray_internals.deleted_checkpoints_stay_deleted()  # idempotent
    delete = checkpoint_manager._delete_fs_path
    assert delete.__wrapped__ is inspect.unwrap(delete)
    kept = tmp_path / "checkpoint_000001"
    kept.mkdir()
    (kept / "trial_state.pt").write_bytes(b"x")
    delete(fs=LocalFileSystem(), fs_path=str(tmp_path / "checkpoint_000000"))  # gone: no error
    delete(fs=LocalFileSystem(), fs_path=str(kept))
    assert not kept.exists()


def _forces_after(create, keep: int) -> int:
    """After how many checkpoints of one trial the experiment checkpoint manager that
    `create` makes (as TuneController does, with `num_to_keep=keep`) forces a snapshot."""
    from types import SimpleNamespace

    from ray import tune

    controller = SimpleNamespace(_storage=None, _checkpoint_period="auto",
                                 _trial_checkpoint_config=tune.CheckpointConfig(num_to_keep=keep))
    manager, trial = create(controller), object()
    for checkpoints in range(1, keep + 2):
        manager.on_trial_checkpoint(trial)
        if manager._should_force_sync_up:
            return checkpoints
    raise AssertionError(f"no snapshot forced after {keep + 1} checkpoints")


def test_tune_still_snapshots_only_at_the_checkpoint_that_deletes_the_named_one():
    from ray.train._internal import checkpoint_manager
    from ray.tune.execution.tune_controller import TuneController

    original = inspect.unwrap(TuneController._create_checkpoint_manager)
    assert _forces_after(original, keep=3) == 3  # what the patch works around
    assert "self._checkpoint_results[: -self._checkpoint_config.num_to_keep]" in \
        inspect.getsource(checkpoint_manager)  # ... deleted at that same checkpoint


def test_a_snapshot_is_forced_one_checkpoint_before_a_deletion():
    from ray.tune.execution.tune_controller import TuneController

    ray_internals.snapshots_name_kept_checkpoints()
    ray_internals.snapshots_name_kept_checkpoints()  # idempotent
    create = TuneController._create_checkpoint_manager
    assert create.__wrapped__ is inspect.unwrap(create)
    assert _forces_after(create, keep=3) == 2
    assert _forces_after(create, keep=1) == 1
