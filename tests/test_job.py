"""The main job submitted to a cluster one does not log into: a two-node cluster on this
machine with the job server on its head (127.0.0.1 only), storage in a bucket on the
test S3 server, and `ray job submit --working-dir` as a user types it, from a copy of the
project holding a dataset and a cache that must not be sent."""
from __future__ import annotations

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from bench.cluster import RAY, two_node_cluster
from tests.helpers import REPO, make_tree
from bench.s3 import s3_server

pytestmark = pytest.mark.slow  # a real cluster and jobs


def project(base: Path) -> Path:
    """What a user submits: the project's files, plus a dataset and a feature cache in
    its folder (.rayignore leaves them out)."""
    folder = base / "project"
    for name in ("genre_ray", "search_spaces"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("tune_main.py", ".rayignore", ".gitignore"):
        shutil.copy(REPO / name, folder / name)
    make_tree(folder / "data", tracks=1, seconds=6.0)
    (folder / ".cache" / "genre-ray").mkdir(parents=True)
    (folder / ".cache" / "genre-ray" / "features.npy").write_bytes(b"\0" * 1024)
    return folder


class Jobs:
    """`ray job ...` against the cluster's job server, as a user runs it."""

    def __init__(self, cluster, folder: Path) -> None:
        self.cluster, self.folder = cluster, folder

    @functools.cached_property
    def client(self) -> JobSubmissionClient:
        """The job server's SDK client (the CLI's own), once the server answers, with the
        token `ray start` made (this process imported Ray without token authentication)."""
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        return JobSubmissionClient(self.cluster.jobs, headers={
            "Authorization": f"Bearer {token.read_text().strip()}"})

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        verb, *rest = args
        return subprocess.run([*RAY, "job", verb, "--address", self.cluster.jobs, *rest],
                              cwd=self.folder, env=self.cluster.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, job_id: str, *command: str, wait: bool = True) -> subprocess.CompletedProcess:
        return self.ray("submit", "--submission-id", job_id, "--working-dir", ".",
                        *([] if wait else ["--no-wait"]), "--", *command)

    def status(self, job_id: str) -> str:
        """What `ray job status` says, asked of the job server directly: a poll a second
        through the CLI would start a Python process importing Ray each time."""
        return self.client.get_job_status(job_id).value

    def logs(self, job_id: str, until: str = "", timeout: float = 30) -> str:
        """The job's logs (`ray job logs`), once they hold `until`: the job server may answer
        with the entrypoint's first line before the rest of a finished job's output reaches it."""
        deadline = time.monotonic() + timeout
        while until not in (text := self.client.get_job_logs(job_id)) and time.monotonic() < deadline:
            time.sleep(1)
        return text

    def wait(self, job_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(job_id)) in ("RUNNING", "PENDING"):
            assert time.monotonic() < deadline, self.logs(job_id)[-3000:]
            time.sleep(1)
        return status


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    data = make_tree(base / "data", tracks=3, seconds=11.0)
    with s3_server(base / "s3") as s3:
        uri = s3.bucket("jobs") + "/runs"
        env = {**s3.env(), "GENRE_RAY_CACHE": str(base / "head-cache"),  # `python`: this one
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        with two_node_cluster(base / "logs", jobs=True, env=env) as ray_cluster:
            jobs = Jobs(ray_cluster, project(base))
            deadline = time.monotonic() + 60
            while jobs.ray("list").returncode != 0:  # the job server starts after the head
                assert time.monotonic() < deadline, jobs.ray("list").stderr
                time.sleep(1)
            yield jobs, data, uri, s3


def tune(data: Path, uri: str, name: str, *args: str) -> list[str]:
    return ["python", "tune_main.py", "--data-dir", str(data), "--storage-path", uri,
            "--name", name, "--models", "MLP", "--features", "spectrogram", "--wandb", "off", *args]


def test_the_working_dir_sends_the_code_and_not_the_data_or_cache(cluster):
    jobs, *_ = cluster
    out = jobs.submit("files", "python", "-c",
                      "import os, genre_ray; print(sorted(os.listdir('.')))")
    assert out.returncode == 0, out.stderr[-2000:]
    printed = jobs.logs("files", until="['").strip().splitlines()[-1]
    listed = ast.literal_eval(printed)  # its folder on the head
    assert {"genre_ray", "search_spaces", "tune_main.py"} <= set(listed)
    assert "data" not in listed and ".cache" not in listed


def test_a_submitted_main_job_tunes_on_the_cluster_and_keeps_its_run_in_the_bucket(cluster):
    jobs, data, uri, s3 = cluster
    out = jobs.submit("main", *tune(data, uri, "main", "--num-samples", "2", "--max-epochs", "2"))
    assert out.returncode == 0 and jobs.status("main") == "SUCCEEDED", out.stdout[-3000:]
    logs = jobs.logs("main", until="| MLP_spectrogram |")
    assert "Trial status:" in logs and "| MLP_spectrogram |" in logs  # progress, leaderboard
    assert "on 2 trial slots" in logs  # the head's CPU and the worker's
    stored = s3.objects("jobs", "runs/main/")
    assert "runs/main/best_models/MLP_spectrogram_best_model.pth" in stored
    assert "runs/main/leaderboard.md" in stored
    assert json.loads(stored["runs/main/run.json"])["status"] == "finished"


def test_a_failing_job_ends_failed_with_its_error_line_last(cluster):
    jobs, data, uri, _ = cluster
    jobs.submit("bad", *tune(data, uri, "bad", "--models", "NOPE"))
    assert jobs.wait("bad") == "FAILED"
    last = jobs.logs("bad", until="error: ").strip().splitlines()[-1]
    assert last.startswith("error: ") and "unknown model 'NOPE'" in last


def test_a_stopped_job_is_recorded_interrupted_and_the_same_job_continues_it(cluster):
    """`ray job stop` as a user sends it: SIGTERM, and SIGKILL 3 s later unless
    RAY_JOB_STOP_WAIT_TIME_S says otherwise; the run must survive both."""
    jobs, data, uri, s3 = cluster
    command = tune(data, uri, "stopped", "--models", "MLP", "CEL", "--num-samples", "3",
                   "--max-epochs", "6")
    jobs.submit("first", *command, wait=False)
    deadline = time.monotonic() + 300
    while not any(b'"done": true' in body
                  for body in s3.objects("jobs", "runs/stopped/", suffix="/result.json").values()):
        assert jobs.status("first") in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(1)
    assert jobs.ray("stop", "first").returncode == 0
    assert jobs.wait("first") == "STOPPED"
    record = json.loads(s3.objects("jobs", "runs/stopped/run.json")["runs/stopped/run.json"])
    assert record["status"] == "interrupted"
    lease = s3.objects("jobs", "runs/stopped/.lease")
    if lease:  # a driver killed before it let go: its lease was cut short
        time.sleep(max(0.0, json.loads(lease["runs/stopped/.lease"])["expires"] - time.time()))
    again = jobs.submit("again", *command)
    assert again.returncode == 0 and jobs.status("again") == "SUCCEEDED", again.stdout[-3000:]
    assert "continuing interrupted run 'stopped'" in jobs.logs("again", until="continuing interrupted")
