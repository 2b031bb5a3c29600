"""One driver per run (genre_ray/lease.py): an S3 lease by conditional writes on a real S3
server, and an flock for paths and file:// URIs."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from genre_ray import lease
from genre_ray.storage import storage
from tests.helpers import REPO


@pytest.fixture
def bucket(s3, monkeypatch):
    """A new bucket's storage path, this process reaching it as the writer."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return storage(s3.bucket(f"lease-{time.time_ns()}") + "/runs")


def test_a_second_driver_is_refused_naming_the_first_until_it_lets_go(bucket):
    first = lease.take(bucket, "r")
    assert "pid" in lease.holder(bucket, "r") and "lease until" in lease.holder(bucket, "r")
    with pytest.raises(lease.Busy, match=r"run 'r' is running in another driver \(host .*, pid \d+"):
        lease.take(bucket, "r")
    assert lease.take(bucket, "r", new=True) is None  # a new run takes another name
    first.release()
    assert lease.holder(bucket, "r") is None
    lease.take(bucket, "r").release()


def test_a_lease_not_renewed_in_time_is_taken_over_and_its_driver_told(s3, bucket):
    first = lease.take(bucket, "r")
    client, key = s3.client(), f"runs/r/{lease.LEASE}"
    name = bucket.uri.removeprefix("s3://").split("/")[0]
    body = json.loads(client.get_object(Bucket=name, Key=key)["Body"].read())
    client.put_object(Bucket=name, Key=key, Body=json.dumps({**body, "expires": time.time() - 1}))
    second = lease.take(bucket, "r")  # the first driver is gone, as far as anyone can tell
    first.renewed = -lease.RENEW_S  # its next renewal is due
    with pytest.raises(lease.Lost, match="taken over by another driver"):
        first.keep()
    second.keep()  # not due: nothing written
    second.release()


def test_a_lease_cut_short_ends_then_and_is_renewed_no_more(bucket):
    first = lease.take(bucket, "r")
    first.cut(0.0)
    first.renewed = -lease.RENEW_S
    first.keep()  # would renew, but a stopping driver does not
    assert lease.holder(bucket, "r") is None
    lease.take(bucket, "r").release()


def test_a_storage_that_cannot_be_reached_is_one_storage_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    unreachable = storage("s3://nowhere/runs")
    with pytest.raises(lease.StorageError, match="cannot read the lease of run 'r' in --storage-path s3://nowhere/runs"):
        lease.take(unreachable, "r")


@pytest.mark.parametrize("kind", ["path", "file"])
def test_an_flock_keeps_a_second_process_off_a_path_or_file_uri_run(tmp_path, kind):
    where = str(tmp_path / "runs") if kind == "path" else (tmp_path / "runs").as_uri()
    held = lease.take(storage(where), "r")
    assert (tmp_path / "runs" / "r" / ".lock").is_file()  # in the storage, not the cache
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from genre_ray import lease; from genre_ray.storage "
         "import storage; lease.take(storage(sys.argv[1]), 'r')", where],
        cwd=REPO, capture_output=True, text=True)
    assert "run 'r' is running in another driver (pid" in other.stderr
    held.release()
    assert lease.holder(storage(where), "r") is None
