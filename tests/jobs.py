"""A two-node cluster with the job server on its head (127.0.0.1 only), its nodes reaching
the test S3 server, and `ray job ...` against it as a user runs it, from a copy of the
project holding a dataset and a cache that must not be sent. The cluster tests share one
(conftest's `jobs`)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench.cluster import RAY, Cluster, two_node_cluster
from bench.s3 import S3
from tests.helpers import REPO, make_tree


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


@dataclass
class Jobs:
    """`ray job ...` against the cluster's job server, as a user runs it from `folder`;
    `data` a dataset on this machine, `uri` the runs folder in bucket `bucket` on `s3`."""

    cluster: Cluster
    folder: Path
    data: Path
    s3: S3
    bucket: str = "jobs"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/runs"

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        verb, *rest = args
        return subprocess.run([*RAY, "job", verb, "--address", self.cluster.jobs, *rest],
                              cwd=self.folder, env=self.cluster.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, job_id: str, *command: str, wait: bool = True) -> subprocess.CompletedProcess:
        return self.ray("submit", "--submission-id", job_id, "--working-dir", ".",
                        *([] if wait else ["--no-wait"]), "--", *command)

    def status(self, job_id: str) -> str:
        out = self.ray("status", job_id)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI's colours
        said = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)|Status for job "
                         rf"'{job_id}': (\w+)", text)
        assert said, text
        return {"succeeded": "SUCCEEDED", "failed": "FAILED",
                "was stopped": "STOPPED"}.get(said[1], said[2])

    def logs(self, job_id: str) -> str:
        return self.ray("logs", job_id).stdout

    def wait(self, job_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(job_id)) in ("RUNNING", "PENDING"):
            assert time.monotonic() < deadline, self.logs(job_id)[-3000:]
            time.sleep(1)
        return status


@contextlib.contextmanager
def job_cluster(base: Path, s3: S3) -> Iterator[Jobs]:
    """The cluster up, its job server answering, a bucket for its runs; down after."""
    data = make_tree(base / "data", tracks=3, seconds=11.0)
    s3.bucket(Jobs.bucket)
    env = {**s3.env(), "GENRE_RAY_CACHE": str(base / "head-cache"),  # `python`: this one
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with two_node_cluster(base / "logs", jobs=True, env=env) as cluster:
        jobs = Jobs(cluster, project(base), data, s3)
        deadline = time.monotonic() + 60
        while jobs.ray("list").returncode != 0:  # the job server starts after the head
            assert time.monotonic() < deadline, jobs.ray("list").stderr
            time.sleep(1)
        yield jobs
