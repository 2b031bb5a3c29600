"""Every bench's --smoke run: the bench's own code at its smallest, all in one process and
one Ray (bench/harness.py), so that a change that breaks a bench fails here. Their figures
mean nothing; each must print its context line and end with its ratio line."""
from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import ray

from bench import harness

pytestmark = pytest.mark.slow  # real tunes on a small dataset

SMOKED = ["feature_cache", "synthetic", "baseline", "knobs", "serving", "search", "utilisation",
          "ray_overhead", "gpu_sharing", "control_plane"]


@pytest.fixture(scope="module")
def one_ray():
    with harness.local_ray(num_cpus=2, log_to_driver=False):
        yield


@pytest.mark.parametrize("name", SMOKED)
def test_a_benchs_smoke_run_prints_its_context_and_its_ratio(one_ray, name):
    main = importlib.import_module(f"bench.{name}").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--smoke"])
    lines = out.getvalue().splitlines()
    assert lines[0] == harness.context(), lines[:3]
    assert any(line.startswith("ratio ") for line in lines), out.getvalue()[-2000:]
    assert ray.is_initialized()  # the smoke test's Ray, left up by the bench
