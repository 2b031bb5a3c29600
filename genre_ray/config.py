"""Project defaults (genre_ray/defaults.yaml) and the cache directory."""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


@functools.cache
def _load() -> dict[str, Any]:
    with DEFAULTS_FILE.open() as f:
        return yaml.safe_load(f)


def defaults(section: str) -> dict[str, Any]:
    """A fresh copy of one section of defaults.yaml, safe to modify."""
    return copy.deepcopy(_load()[section])


def cache_dir() -> Path:
    """Where generated datasets and feature caches live ($GENRE_RAY_CACHE wins)."""
    root = os.environ.get("GENRE_RAY_CACHE") or defaults("cache")["dir"]
    return Path(root).expanduser().resolve()
