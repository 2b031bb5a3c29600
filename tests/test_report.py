"""The leaderboard's context: what a run says about where it ran."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from genre_ray import report


def test_the_context_names_a_library_that_is_not_installed(monkeypatch):
    """A run with tracking off needs no wandb; its leaderboard says so instead of crashing
    (as on a GPU image whose Python had no wandb)."""
    monkeypatch.setattr(report, "LIBRARIES", ("torch", "no-such-library-genre-ray"))
    ctx = report.context(Path("d"), "random", 0, {"train": (1, 2)}, "cpu", 1.0)
    assert ctx["libraries"].startswith(f"torch {version('torch')}, no-such-library-genre-ray not installed, python ")
