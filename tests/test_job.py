"""The main job submitted to a cluster one does not log into (tests/jobs.py: two nodes on
this machine, the job server on the head, storage in a bucket on the test S3 server), with
`ray job submit --working-dir` as a user types it, from a copy of the project holding a
dataset and a cache that must not be sent."""
from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest

from tests.jobs import Jobs

pytestmark = pytest.mark.slow  # a real cluster and jobs


def tune(data: Path, uri: str, name: str, *args: str) -> list[str]:
    return ["python", "tune_main.py", "--data-dir", str(data), "--storage-path", uri,
            "--name", name, "--models", "MLP", "--features", "spectrogram", "--wandb", "off", *args]


def test_the_working_dir_sends_the_code_and_not_the_data_or_cache(jobs: Jobs):
    out = jobs.submit("files", "python", "-c",
                      "import os, genre_ray; print(sorted(os.listdir('.')))")
    assert out.returncode == 0, out.stderr[-2000:]
    listed = ast.literal_eval(jobs.logs("files").strip().splitlines()[-1])  # its folder on the head
    assert {"genre_ray", "search_spaces", "tune_main.py"} <= set(listed)
    assert "data" not in listed and ".cache" not in listed


def test_a_submitted_main_job_tunes_on_the_cluster_and_keeps_its_run_in_the_bucket(jobs: Jobs):
    data, uri, s3 = jobs.data, jobs.uri, jobs.s3
    out = jobs.submit("main", *tune(data, uri, "main", "--num-samples", "2", "--max-epochs", "2"))
    assert out.returncode == 0 and jobs.status("main") == "SUCCEEDED", out.stdout[-3000:]
    logs = jobs.logs("main")
    assert "Trial status:" in logs and "| MLP_spectrogram |" in logs  # progress, leaderboard
    assert "on 2 trial slots" in logs  # the head's CPU and the worker's
    stored = s3.objects(jobs.bucket, "runs/main/")
    assert "runs/main/best_models/MLP_spectrogram_best_model.pth" in stored
    assert "runs/main/leaderboard.md" in stored
    assert json.loads(stored["runs/main/run.json"])["status"] == "finished"


def test_a_failing_job_ends_failed_with_its_error_line_last(jobs: Jobs):
    data, uri = jobs.data, jobs.uri
    jobs.submit("bad", *tune(data, uri, "bad", "--models", "NOPE"))
    assert jobs.wait("bad") == "FAILED"
    last = jobs.logs("bad").strip().splitlines()[-1]
    assert last.startswith("error: ") and "unknown model 'NOPE'" in last


def test_a_stopped_job_is_recorded_interrupted_and_the_same_job_continues_it(jobs: Jobs):
    """`ray job stop` as a user sends it: SIGTERM, and SIGKILL 3 s later unless
    RAY_JOB_STOP_WAIT_TIME_S says otherwise; the run must survive both."""
    data, uri, s3 = jobs.data, jobs.uri, jobs.s3
    command = tune(data, uri, "stopped", "--models", "MLP", "CEL", "--num-samples", "3",
                   "--max-epochs", "6")
    jobs.submit("first", *command, wait=False)
    deadline = time.monotonic() + 300
    while not any(b'"done": true' in body
                  for body in s3.objects(jobs.bucket, "runs/stopped/", suffix="/result.json").values()):
        assert jobs.status("first") in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(1)
    assert jobs.ray("stop", "first").returncode == 0
    assert jobs.wait("first") == "STOPPED"
    record = json.loads(s3.objects(jobs.bucket, "runs/stopped/run.json")["runs/stopped/run.json"])
    assert record["status"] == "interrupted"
    lease = s3.objects(jobs.bucket, "runs/stopped/.lease")
    if lease:  # a driver killed before it let go: its lease was cut short
        time.sleep(max(0.0, json.loads(lease["runs/stopped/.lease"])["expires"] - time.time()))
    again = jobs.submit("again", *command)
    assert again.returncode == 0 and jobs.status("again") == "SUCCEEDED", again.stdout[-3000:]
    assert "continuing interrupted run 'stopped'" in jobs.logs("again")
