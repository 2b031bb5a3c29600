"""One driver per run: the run's lease, taken before anything of the run is written.

- A path or `file://` storage: an flock on `<storage>/<name>/.lock`. The OS releases it
  when the process ends, however it ends.
- `s3://`: the object `<name>/.lease`, written with S3's conditional writes: created with
  `If-None-Match: *`, renewed and taken over with `If-Match: <its ETag>`, so of two
  drivers that try at once one wins. It names its holder and an expiry: the holder
  renews it every RENEW_S seconds, and a lease not renewed for TTL_S seconds (a killed
  driver, a lost head) may be taken over, so a dead driver holds a run for at most TTL_S.
  Expiries are compared across machines' clocks, which NTP keeps within a second.
- Other schemes (gs://, ...): pyarrow writes them with no condition, so there is no lease;
  a warning says two drivers of one run are not kept apart there.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genre_ray.errors import UserError
from genre_ray.files import try_lock
from genre_ray.storage import LOCK, Storage, StorageError, describe

LEASE = ".lease"
TTL_S = 60.0
RENEW_S = 10.0


class Busy(UserError):
    """Another live driver holds the run."""


class Lost(StorageError):
    """This driver's lease was taken over: it was not renewed for TTL_S seconds."""


class Lease:
    """A held lease; `keep` renews it when due, `release` gives it up. `expires`: when it
    ends unless renewed (seconds since the epoch); None: when its process ends."""

    expires: float | None = None

    def keep(self) -> None:
        pass

    def cut(self, seconds: float) -> None:
        """End the lease `seconds` from now, and renew it no more (a stopping driver)."""

    def release(self) -> None:
        pass


def take(store: Storage, name: str, *, new: bool = False) -> Lease | None:
    """The lease of run `name`. `new`: the name of a new run, taken only if nobody ever
    took it (None otherwise). Busy when another live driver holds it."""
    if store.node_local:
        return _FlockLease.take(_local_folder(store) / name, new)
    if store.scheme == "s3":
        return _S3Lease.take(store, name, new)
    print(f"warning: --storage-path {store.uri}: genre-ray keeps two drivers off one run only "
          "on a path, file:// or s3://; here it cannot, so start each run once")
    return Lease()


def holder(store: Storage, name: str) -> str | None:
    """Who holds run `name`'s lease now (its process, or host and expiry); None if nobody."""
    if store.node_local:
        return _FlockLease.holder(_local_folder(store) / name)
    if store.scheme == "s3":
        return _S3Lease.holder(store, name)
    return None


def _local_folder(store: Storage) -> Path:
    """The storage's own folder for a path or file:// URI (not the working folder)."""
    if not store.remote:
        return store.local
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(store.uri).path))


@dataclass
class _FlockLease(Lease):
    fd: int

    @classmethod
    def take(cls, run_dir: Path, new: bool) -> _FlockLease | None:
        """Lock `run_dir` (an flock, released when the process ends) and write our pid."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot lock run {run_dir} ({err.strerror}); pass a --storage-path "
                            "you can write to") from None
        if not try_lock(fd, tries=10):  # another process's holder() may be peeking
            pid = os.pread(fd, 32, 0).decode().strip() or "?"
            os.close(fd)
            if new:
                return None
            raise Busy(busy_message(run_dir.name, f"pid {pid}"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @staticmethod
    def holder(run_dir: Path) -> str | None:
        if not (run_dir / LOCK).is_file():
            return None
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
        try:
            return None if try_lock(fd) else f"pid {os.pread(fd, 32, 0).decode().strip() or '?'}"
        finally:
            os.close(fd)

    def release(self) -> None:
        os.close(self.fd)


@dataclass
class _S3Lease(Lease):
    client: Any
    bucket: str
    key: str
    etag: str
    run: str
    where: str  # the storage path, for messages
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    renewed: float = field(default_factory=time.monotonic)
    ending: bool = False

    @classmethod
    def take(cls, store: Storage, name: str, new: bool) -> _S3Lease | None:
        client, bucket, key = _s3_object(store, name)
        lease = cls(client, bucket, key, "", name, store.uri)
        held = _call(store, "read the lease of", name, lambda: _get(client, bucket, key))
        if held is not None:
            body, etag = held
            if new:
                return None
            if body["expires"] > time.time():
                raise Busy(busy_message(name, _who(body)))
        if not lease._put({"IfMatch": held[1]} if held else {"IfNoneMatch": "*"}):
            if new:
                return None
            raise Busy(f"run {name!r} was taken by another driver while this one started; "
                       "wait for it, or pass another --name")
        return lease

    @staticmethod
    def holder(store: Storage, name: str) -> str | None:
        client, bucket, key = _s3_object(store, name)
        held = _call(store, "read the lease of", name, lambda: _get(client, bucket, key))
        return _who(held[0]) if held and held[0]["expires"] > time.time() else None

    def keep(self) -> None:
        if not self.ending and time.monotonic() - self.renewed >= RENEW_S:
            if not self._put({"IfMatch": self.etag}):
                raise Lost(f"run {self.run!r} was taken over by another driver: this one could "
                           f"not renew its lease for {TTL_S:.0f} s; its results so far are saved")
            self.renewed = time.monotonic()

    def _unwritable(self, err: Exception) -> StorageError:
        return StorageError(f"cannot write the lease of run {self.run!r} in --storage-path "
                            f"{self.where} ({describe(err)})")

    def cut(self, seconds: float) -> None:
        self.ending = True
        self._put({"IfMatch": self.etag}, seconds)

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except (BotoCoreError, ClientError):
            pass  # it expires by itself

    def _put(self, condition: dict[str, str], seconds: float = TTL_S) -> bool:
        """Write the lease, to end `seconds` from now, under `condition`; False if S3 says
        it no longer holds."""
        from botocore.exceptions import BotoCoreError, ClientError

        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "expires": time.time() + seconds}
        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=self.key,
                                            Body=json.dumps(body).encode(), **condition)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._unwritable(err) from None
        except BotoCoreError as err:  # the endpoint does not answer
            raise self._unwritable(err) from None
        self.etag, self.expires = answer["ETag"], body["expires"]
        return True


def busy_message(name: str, who: str) -> str:
    """Why run `name` cannot be taken: `who` (holder's description) is running it."""
    gone = "" if who.startswith("pid") else (
        f". If that driver is gone, its lease ends {TTL_S:.0f} s after its last renewal: run "
        "the same command again then")
    return f"run {name!r} is running in another driver ({who}); wait for it, or pass another --name{gone}"


def _who(body: dict[str, Any]) -> str:
    expires = time.strftime("%H:%M:%S UTC", time.gmtime(body["expires"]))
    return f"host {body.get('host', '?')}, pid {body.get('pid', '?')}, lease until {expires}"


def _s3_object(store: Storage, name: str) -> tuple[Any, str, str]:
    """A boto3 client for the storage's endpoint (its URI's endpoint_override, scheme and
    region, else the environment's, as pyarrow reads them), its bucket and the lease key."""
    import boto3

    url = urllib.parse.urlsplit(store.uri)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
    prefix = url.path.strip("/")
    return client, url.netloc, f"{prefix}/{name}/{LEASE}".lstrip("/")


def _get(client: Any, bucket: str, key: str) -> tuple[dict[str, Any], str] | None:
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(answer["Body"].read()), answer["ETag"]


def _call(store: Storage, what: str, name: str, operation):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return operation()
    except (BotoCoreError, ClientError) as err:
        raise StorageError(f"cannot {what} run {name!r} in --storage-path {store.uri} "
                           f"({describe(err)}); check that it exists, its credentials and that "
                           "this machine reaches it") from None
