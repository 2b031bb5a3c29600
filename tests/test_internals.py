"""The private names of Ray, Optuna, W&B and torch.onnx that genre_ray.internals uses:
still where it expects them, with the behaviour it relies on or works around, and each
use doing its job."""
from __future__ import annotations

import inspect

import optuna
import pytest

from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import OutOfMemoryError, RayActorError

from genre_ray import internals
from tests.helpers import read_run


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
    internals.memory_kills_fail_trials()
    kill = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")
    RayActorManager._actor_task_failed(None, None, kill)
    other = RuntimeError("anything else")
    RayActorManager._actor_task_failed(None, None, other)
    assert isinstance(seen[0], RayActorError) and "killed by Ray's memory monitor" in str(seen[0])
    assert "running low on memory" in str(seen[0]) and seen[1] is other
    internals.memory_kills_fail_trials()  # idempotent: not wrapped twice
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

    internals.deleted_checkpoints_stay_deleted()
    internals.deleted_checkpoints_stay_deleted()  # idempotent
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

    internals.snapshots_name_kept_checkpoints()
    internals.snapshots_name_kept_checkpoints()  # idempotent
    create = TuneController._create_checkpoint_manager
    assert create.__wrapped__ is inspect.unwrap(create)
    assert _forces_after(create, keep=3) == 2
    assert _forces_after(create, keep=1) == 1


def test_optuna_search_keeps_its_optuna_handles_where_the_accessors_read_them():
    from ray.tune.search.optuna import OptunaSearch

    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    searcher = OptunaSearch(space, metric="loss", mode="min", seed=0)
    searcher.suggest("t1")
    trial = internals.asked(searcher)["t1"]
    [running] = internals.study_of(searcher).trials
    assert isinstance(trial, optuna.Trial) and running.number == trial.number
    assert running.state == optuna.trial.TrialState.RUNNING and "t1" not in internals.told(searcher)
    searcher.on_trial_complete("t1", {"loss": 0.5})
    assert "t1" in internals.told(searcher) and "t1" in internals.asked(searcher)  # kept: we forget it
    [told] = internals.study_of(searcher).trials
    assert told.state == optuna.trial.TrialState.COMPLETE and told.value == 0.5


def test_rays_wandb_callback_still_starts_and_stops_loggers_through_the_overridden_names():
    from ray.air.integrations.wandb import WandbLoggerCallback

    callback = WandbLoggerCallback(project="p")
    for table in ("_trial_queues", "_trial_logging_actors", "_trial_logging_futures"):
        assert getattr(callback, table) == {}, table
    assert "self._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)" in \
        inspect.getsource(WandbLoggerCallback.log_trial_start)
    assert list(inspect.signature(WandbLoggerCallback._cleanup_logging_actors).parameters) == \
        ["self", "timeout", "kill_on_timeout"]
    assert "self._trial_queues[trial].put((_QueueItem.END, None))" in \
        inspect.getsource(WandbLoggerCallback._signal_logging_actor_stop)


def test_a_thread_logger_writes_a_trials_results_as_rays_logger_filters_them(tmp_path):
    from queue import Queue

    from ray.air.integrations.wandb import _QueueItem

    queue = Queue()
    logger = internals.WandbThreadLogger(str(tmp_path), queue, exclude=["timestamp"], to_config=["config"],
                                         project="p", mode="offline", dir=str(tmp_path), id="t1",
                                         name="n", group="g", settings={"silent": True})
    for epoch in (1, 2):
        queue.put((_QueueItem.RESULT, {"epoch": epoch, "val_loss": 1.0 / epoch, "timestamp": 7,
                                       "training_iteration": epoch, "config": {"lr": 0.1}}))
    queue.put((_QueueItem.END, None))
    logger.run()  # in this thread: returns once the run is finished
    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(folder)
    assert [(h["epoch"], h["val_loss"]) for h in run["history"]] == [(1, 1.0), (2, 0.5)]
    assert not any("timestamp" in h for h in run["history"]) and run["exit"]["exit_code"] == 0


def test_two_onnx_exports_build_torchs_table_of_onnx_functions_once_each_with_its_own_copy(monkeypatch):
    import torch
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    builds = []
    original = ONNXRegistry.from_torchlib.__func__

    def counted(cls, *args, **kwargs):
        builds.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ONNXRegistry, "from_torchlib", classmethod(counted))
    internals.onnx_functions_built_once()
    internals.onnx_functions_built_once()  # idempotent: not wrapped twice
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    graphs = [torch.onnx.export(model, (torch.randn(2, 4),), dynamo=True, verbose=False)
              for _ in range(2)]
    assert len(builds) == 1 and all(g.model_proto.graph.node for g in graphs)  # the exporter's own call
    first, second = ONNXRegistry.from_torchlib(), ONNXRegistry.from_torchlib()
    assert first.functions == second.functions and first.functions is not second.functions
    name = next(iter(first.functions))
    first.functions[name].clear()
    assert second.functions[name]
