"""Shared fixtures: every test gets an isolated cache; tests that speak S3 share one server."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own feature/dataset cache, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GENRE_RAY_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server on 127.0.0.1 (tests/s3.py), started once for the session."""
    from tests.s3 import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
