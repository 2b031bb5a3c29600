"""Where runs live: a folder (on this machine, or one every node mounts), or a bucket:
any URI pyarrow opens (s3://, gs://, file://, ...).

A run is `<storage>/<name>/`. Tune writes its experiment there itself (state, trials,
checkpoints); genre-ray's own files of the run sit beside them: `run.json`, the Optuna
journal, W&B files, leaderboard, plots, copies of the exports. With a path they are
written in place. With a URI they are written in a working folder on this machine,
`<cache>/runs/<hash of the URI>/<name>/`, and kept in the bucket while the run runs
(`RunFolder.sync`, called every few seconds; `push` for a file that must be there at
once): a machine with an empty disk continues the run from the bucket (`RunFolder.pull`).
Object storage cannot append, so the Optuna journal, an append-only file, goes up in
parts, `<journal>.parts/<offset>`, each the bytes written since the one before; a pull
joins them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow
import pyarrow.fs as pafs

from genre_ray.config import cache_dir
from genre_ray.errors import UserError
from genre_ray.files import atomic_path

RECORD, LOCK = "run.json", ".lock"  # the run's record (runs.py) and its lock, in its folder
JOURNAL = "optuna.journal"  # the run's Optuna journal, in its folder (tuning.RunJournal)
PARTS = ".parts"  # JOURNAL + PARTS: the folder of its parts in the storage
OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow's type_name of filesystems without folders
MAX_PARTS = 64  # beyond, the journal goes up whole and its parts are removed
T = TypeVar("T")


def _options(uri: str, scheme: str) -> str:
    """`uri` with S3's allow_delayed_open: a small file is one PUT, where pyarrow's default
    is a multipart upload of three requests. Tune uploads every trial's small files again
    at each of its syncs, so this cuts most of a run's requests to the bucket."""
    if scheme == "s3" and "allow_delayed_open" not in uri:
        uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
    return uri


class StorageError(UserError):
    """The storage path cannot be read or written (a missing bucket, credentials, the
    network): one line naming the storage, the operation and the storage's own reason."""


@dataclass(frozen=True)
class Storage:
    """Where runs live: `uri` as given (a path, or a URI with its query), `local` the folder
    on this machine holding the runs' own files (the storage itself, for a path)."""

    uri: str
    local: Path

    @property
    def remote(self) -> bool:
        return self.uri != str(self.local)

    @property
    def node_local(self) -> bool:
        """A path or file:// URI: other nodes of a cluster may not reach it (unless
        --shared-storage says they do)."""
        scheme, sep, _ = self.uri.partition("://")
        return not sep or scheme == "file"

    @property
    def scheme(self) -> str:
        return self.uri.partition("://")[0] if self.remote else "file"

    def tune_path(self, name: str) -> str:
        """Where Tune keeps run `name`: the name goes before a URI's query (?region=...)."""
        if not self.remote:
            return str(self.local / name)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"

    def tune_uri(self, name: str = "") -> str:
        """What Tune is given for run `name` (for "": the storage): `tune_path`, with the
        options of genre-ray's own filesystem (`_options`)."""
        return _options(self.tune_path(name) if name else self.uri, self.scheme)

    @functools.cached_property
    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        fs, root = pafs.FileSystem.from_uri(_options(self.uri if self.remote else self.local.as_uri(),
                                                     self.scheme))
        return fs, root.rstrip("/")

    def _path(self, relative: str) -> str:
        return f"{self._filesystem[1]}/{relative}" if relative else self._filesystem[1]

    def read(self, relative: str) -> bytes | None:
        """The object at `relative` (`<name>/run.json`) under the storage; None if absent."""
        fs, path = self._filesystem[0], self._path(relative)
        def get() -> bytes | None:
            if fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with fs.open_input_stream(path) as f:
                return f.read()
        return self._io(f"read {relative}", get)

    def write(self, relative: str, data: bytes) -> None:
        """Write the object at `relative` whole (an object store replaces it at once)."""
        fs, path = self._filesystem[0], self._path(relative)
        def put() -> None:
            if fs.type_name not in OBJECT_STORES:  # a folder must exist; an object store has none
                fs.create_dir(path.rpartition("/")[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(data)
        self._io(f"write {relative}", put)

    def delete(self, relative: str) -> None:
        """Remove the object or folder at `relative`, if there is one."""
        fs, path = self._filesystem[0], self._path(relative)
        def remove() -> None:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)
        self._io(f"remove {relative}", remove)

    def listing(self, relative: str = "") -> list[pafs.FileInfo]:
        """What the folder at `relative` holds (not recursive); [] if it is absent."""
        fs, path = self._filesystem[0], self._path(relative)
        return self._io(f"list {relative or '.'}",
                        lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))

    def check_writable(self) -> None:
        """StorageError unless a file can be written, read and removed here: a missing
        bucket, wrong or read-only credentials are found before anything else is done."""
        fs, path = self._filesystem[0], self._path(f".genre-ray-probe-{os.getpid()}-{time.time_ns()}")
        def roundtrip() -> None:
            if fs.type_name not in OBJECT_STORES:
                fs.create_dir(self._path(""), recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(b"probe")
            with fs.open_input_stream(path) as f:
                f.read()
            fs.delete_file(path)
        self._io("write, read and remove a file", roundtrip)

    def folders(self) -> list[str]:
        """The names of the folders at the storage's top (its runs), hidden ones left out."""
        return [info.base_name for info in self.listing()
                if info.type == pafs.FileType.Directory and not info.base_name.startswith(".")]

    def modified(self, relative: str) -> float | None:
        """When the object at `relative` was last written (seconds since the epoch); None if absent."""
        fs, path = self._filesystem[0], self._path(relative)
        info = self._io(f"read {relative}", lambda: fs.get_file_info(path))
        return info.mtime.timestamp() if info.type == pafs.FileType.File else None

    def _io(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (pyarrow.ArrowException, OSError) as err:
            raise StorageError(f"cannot {what} in --storage-path {self.uri} ({describe(err)}); "
                               "check that it exists, its credentials and that this machine "
                               "reaches it") from None

    def folder(self, name: str) -> RunFolder:
        """Run `name`'s files: one RunFolder per run in a process, shared by its writers."""
        key = (self.uri, name)
        with _FOLDERS_LOCK:
            if key not in _FOLDERS:
                _FOLDERS[key] = RunFolder(self, name)
            return _FOLDERS[key]


def describe(err: BaseException) -> str:
    """An error of pyarrow or the OS in one line: what S3 and the network said, no request ids."""
    text = " ".join(str(err).split())
    return text.split(" (Request ID")[0] if text else type(err).__name__


@functools.lru_cache(maxsize=None)
def _usable(uri: str) -> None:
    """Raises unless pyarrow has a filesystem for `uri`; once per URI and process: each look
    makes a client (for s3:// with no region configured, one that asks the bucket for its
    region), and every RunFolder unpickled from Tune's state looks (a restore unpickles several)."""
    pafs.FileSystem.from_uri(uri)


def storage(path_or_uri: str) -> Storage:
    """The Storage of `--storage-path`: a path, or a URI (s3://, gs://, file://, ...)."""
    if "://" not in path_or_uri:
        local = Path(path_or_uri).expanduser().resolve()
        return Storage(str(local), local)
    try:
        _usable(path_or_uri)
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        raise UserError(f"--storage-path {path_or_uri} is not a storage URI this machine can "
                        f"use ({describe(err)}); pass a path, or an s3://, gs:// or file:// "
                        "URI") from None
    key = hashlib.sha256(path_or_uri.rstrip("/").encode()).hexdigest()[:12]
    return Storage(path_or_uri.rstrip("/"), cache_dir() / "runs" / key)


_FOLDERS: dict[tuple[str, str], RunFolder] = {}
_FOLDERS_LOCK = threading.Lock()


class RunFolder:
    """A run's own files: `dir` on this machine, kept in the storage (a URI's) by `push`,
    `sync` and `push_appended`, brought back by `pull`. For a path, `dir` is the storage
    and these do nothing. Pickled as its storage and name (tuning.RunJournal is pickled
    into Tune's state): unpickled on another machine, it is that machine's copy."""

    def __init__(self, store: Storage, name: str) -> None:
        self.store, self.name, self.dir = store, name, store.local / name
        self._lock = threading.Lock()
        self._pushed: dict[str, tuple[int, int]] = {}  # file -> (size, mtime_ns) pushed
        self._offset = 0  # bytes of the journal in the storage
        self._parts = 0  # parts of the journal in the storage
        self._until = float("inf")  # no write to the storage after this time (close_at)

    def __reduce__(self):
        return _reopened, (self.store.uri, self.name)

    def close_at(self, when: float) -> None:
        """Write nothing more to the storage after `when` (seconds since the epoch): a
        stopping driver's lease ends then, and another may hold the run."""
        self._until = min(self._until, when)

    @property
    def _writing(self) -> bool:
        return self.store.remote and time.time() < self._until

    def push(self, relative: str) -> None:
        """Put one file of the run's folder in the storage now."""
        if self._writing:
            with self._lock:
                self._push(relative)

    def sync(self) -> None:
        """Put every file changed since it was last pushed, and the journal's new bytes."""
        if not self._writing:
            return
        with self._lock:
            for relative in self._changed():
                self._push(relative)
            self._push_appended()

    def push_appended(self, wait_s: float = 10.0) -> None:
        """Put the journal's bytes written since its last part as one more part; not if
        another push holds the folder beyond `wait_s` seconds (a storage that hangs)."""
        if self._writing and self._lock.acquire(timeout=wait_s):
            try:
                self._push_appended()
            finally:
                self._lock.release()

    def compact(self) -> None:
        """Put the journal whole (`optuna.journal` in the storage, what optuna.load_study
        reads) and remove its parts."""
        if self._writing and (self.dir / JOURNAL).is_file():
            with self._lock:
                self._compact()

    def pull(self) -> None:
        """Replace this machine's record and journal of the run by the storage's."""
        if not self.store.remote:
            return
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            for relative, data in ((RECORD, self.store.read(f"{self.name}/{RECORD}")),
                                   (JOURNAL, self._joined())):
                with atomic_path(self.dir / relative) as tmp:
                    tmp.write_bytes(data or b"")
            self._offset = (self.dir / JOURNAL).stat().st_size
            self._parts = len(self.store.listing(f"{self.name}/{JOURNAL}{PARTS}"))
            self._pushed, self._until = {}, float("inf")

    def reset(self) -> None:
        """Start a new run: no file of an earlier run of this name left on this machine
        (a URI's working folder; a path's folder holds none, runs.choose saw to that)."""
        if self.store.remote:
            with self._lock:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir.mkdir(parents=True)
                self._pushed, self._offset, self._parts, self._until = {}, 0, 0, float("inf")

    def reset_journal(self) -> None:
        """Start the run's journal anew, here and in the storage."""
        (self.dir / JOURNAL).unlink(missing_ok=True)
        if self.store.remote:
            with self._lock:
                self.store.delete(f"{self.name}/{JOURNAL}")
                self.store.delete(f"{self.name}/{JOURNAL}{PARTS}")
                self._offset = self._parts = 0

    def _changed(self) -> list[str]:
        """Files of `dir` whose size or time changed since pushed: not the journal (parts),
        links (W&B's latest-run), temporary files or the lock."""
        found = []
        for folder, _, names in os.walk(self.dir):
            for name in names:
                file = Path(folder, name)
                relative = file.relative_to(self.dir).as_posix()
                if relative in (JOURNAL, LOCK) or name.endswith(".tmp") or file.is_symlink():
                    continue
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    stat = file.stat()
                    if self._pushed.get(relative) != (stat.st_size, stat.st_mtime_ns):
                        found.append(relative)
        return found

    def _push(self, relative: str) -> None:
        file = self.dir / relative
        try:
            stat, data = file.stat(), file.read_bytes()
        except FileNotFoundError:  # a temporary file of W&B's, removed meanwhile
            return
        self.store.write(f"{self.name}/{relative}", data)
        self._pushed[relative] = (stat.st_size, stat.st_mtime_ns)

    def _push_appended(self) -> None:
        journal = self.dir / JOURNAL
        if not journal.is_file() or journal.stat().st_size <= self._offset:
            return
        data = _lines(journal, self._offset)  # whole lines only: Optuna may be mid-append
        if data:
            self.store.write(f"{self.name}/{JOURNAL}{PARTS}/{self._offset:016d}", data)
            self._offset, self._parts = self._offset + len(data), self._parts + 1
        if self._parts > MAX_PARTS:
            self._compact()

    def _compact(self) -> None:
        data = _lines(self.dir / JOURNAL, 0)
        self.store.write(f"{self.name}/{JOURNAL}", data)
        self.store.delete(f"{self.name}/{JOURNAL}{PARTS}")
        self._offset, self._parts = len(data), 0

    def _joined(self) -> bytes:
        """The journal as the storage holds it: its whole copy, then the parts beyond it."""
        data = self.store.read(f"{self.name}/{JOURNAL}") or b""
        parts = sorted(self.store.listing(f"{self.name}/{JOURNAL}{PARTS}"),
                       key=lambda info: int(info.base_name))
        for info in parts:
            offset = int(info.base_name)
            if offset > len(data):
                break  # a part missing before it: the journal ends where it is whole
            if offset + info.size > len(data):
                part = self.store.read(f"{self.name}/{JOURNAL}{PARTS}/{info.base_name}") or b""
                data += part[len(data) - offset:]
        return data


def _reopened(uri: str, name: str) -> RunFolder:
    return storage(uri).folder(name)


def _lines(path: Path, offset: int) -> bytes:
    """The bytes of `path` from `offset` to its last newline."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return data[:data.rfind(b"\n") + 1]
