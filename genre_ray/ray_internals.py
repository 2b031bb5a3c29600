"""The one place genre-ray reaches into Ray's private internals (DESIGN.md, Style).

Each patch names the private name it touches and the behaviour of the pinned Ray it
works around; tests/test_ray_internals.py fails by name when an upgrade moves them.
"""
from __future__ import annotations

import functools

from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import OutOfMemoryError, RayActorError


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
