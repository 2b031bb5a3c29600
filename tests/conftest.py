"""Shared fixtures: one feature/dataset cache for the session (never the user's), a fresh
one for tests of the cache itself; tests that speak S3 share one server."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

# The suite keeps more threads busy than this 2-core machine has (two workers, each with
# Ray's trials and their torch threads); OpenMP threads that spin while they wait for work,
# their default, take the cores from the others: about a tenth of the suite's CPU time.
# Set before any test imports torch, and inherited by every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# README's test command runs two pytest-xdist workers (pytest.ini); each takes whole
# modules (their tests share module-scoped runs), the slowest first, so that neither
# waits alone on a long module at the end. The modules that start clusters with `ray
# start` are one unit, run one after another: a cluster's nodes take ports as they start.
CLUSTER_MODULES = ("test_cluster", "test_job", "test_gpu_check")
SLOWEST_FIRST = ("clusters", "test_storage", "test_resume", "test_grow", "test_bench", "test_bad_luck",
                 "test_memory", "test_two_runs", "test_tracking", "test_feature_search",
                 "test_tuning", "test_cost", "test_tune_main", "test_bad_inputs")


def unit(nodeid: str) -> str:
    """The scheduling unit of the test `nodeid` (path::name): its module, or "clusters"."""
    module = Path(nodeid.split("::")[0]).stem
    return "clusters" if module in CLUSTER_MODULES else module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit(item.nodeid), len(rank)))  # stable


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    return ByUnit(config, log)


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """os.environ as it was after each test: a command run in-process may set a variable
    for its own run (tracking.resolve_mode puts a .env's W&B key there), and a worker's
    next test, whichever it is, must not inherit it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """The session's cache, shared by its xdist workers (the cache is safe for processes
    that build at once): the embedded dataset and each small tree's features built once."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(autouse=True)
def session_cache(shared_cache, monkeypatch) -> Path:
    """Every test (and every command it starts) uses the session's cache, never the user's."""
    monkeypatch.setenv("GENRE_RAY_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """A cache of the test's own, for tests of what the cache holds."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GENRE_RAY_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server on 127.0.0.1 (bench/s3.py), started once for the session."""
    from bench.s3 import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
