"""Cache entries on disk: a folder of .npy arrays and a meta.json, written by streaming
appends and renamed into place whole, read back as memory maps (no copy in memory).

    <entry>/meta.json       {"format": 1, "meta": {...}, "crc32": {"train.x": ..., ...}}
    <entry>/<name>.npy      one array per name, e.g. train.x, train.labels, stats.mean

`Writer` grows each array by appending chunks, so writing an entry of any size holds
one chunk in memory; numpy reserves room in an .npy header for its row count to grow,
and the header is rewritten in place at the end. `read` checks every array's CRC32 by
streaming its file (torch.load and np.load check nothing) and returns copy-on-write
memory maps: pages come from the page cache, shared by every process that maps them,
and writing to one never reaches the file. A corrupt entry is reported and removed;
its caller rebuilds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from genre_ray.files import remove_stale

FORMAT = 1  # bump when the layout above changes
READ_BYTES = 16 << 20  # checksum reads: bounded, and large enough to stream at disk speed

log = logging.getLogger(__name__)


class _Array:
    """One .npy file grown by `append`: (rows, *row_shape) of one dtype."""

    def __init__(self, path: Path, first: np.ndarray) -> None:
        self.file: BinaryIO = open(path, "wb")
        self.header = {"descr": np.lib.format.dtype_to_descr(first.dtype),
                       "fortran_order": False, "shape": (0, *first.shape[1:])}
        np.lib.format.write_array_header_1_0(self.file, self.header)
        self.offset, self.crc = self.file.tell(), 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.lib.format.descr_to_dtype(self.header["descr"]))
        if rows.shape[1:] != self.header["shape"][1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} appended to an array of rows "
                             f"{self.header['shape'][1:]}")
        self.file.write(rows.data)
        self.crc = zlib.crc32(rows.data, self.crc)
        self.header["shape"] = (self.header["shape"][0] + len(rows), *rows.shape[1:])

    def close(self) -> int:
        """Write the final row count into the header, flush to disk; returns the CRC32."""
        self.file.seek(0)
        np.lib.format.write_array_header_1_0(self.file, self.header)
        if self.file.tell() != self.offset:  # numpy's reserved room ran out: never for axis 0
            raise RuntimeError(f"{self.file.name}: the .npy header changed length")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.crc


class Writer:
    """Writes the entry at `path` through a temporary sibling folder, renamed into place
    by `commit`; `abort` (or an exception inside `with`) removes it and leaves `path` as
    it was. Another process that committed the same entry first wins."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path, anything=True)  # what builds killed mid-write left: GBs at GTZAN size
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                         suffix=".tmp"))
        self.lock: int | None = os.open(self.tmp, os.O_RDONLY)  # held until commit or abort
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.growing: dict[str, _Array] = {}
        self.crcs: dict[str, int] = {}  # finished arrays

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, *_: Any) -> None:
        if kind is not None:
            self.abort()

    def append(self, name: str, rows: np.ndarray) -> None:
        """Append rows (n, *row_shape) to array `name`, created by its first append."""
        if name not in self.growing:
            self.growing[name] = _Array(self.array_path(name), rows)
        self.growing[name].append(rows)

    def put(self, name: str, array: np.ndarray) -> None:
        """Write a whole (small) array `name` at once."""
        array = np.ascontiguousarray(array)
        np.save(self.array_path(name), array)
        self.crcs[name] = zlib.crc32(array.data)

    def array_path(self, name: str) -> Path:
        return self.tmp / f"{name}.npy"

    def finish(self, name: str) -> np.ndarray:
        """Finish growing array `name`; returns it mapped for reading."""
        self.crcs[name] = self.growing.pop(name).close()
        return np.load(self.array_path(name), mmap_mode="r")

    def drop(self, name: str) -> None:
        """Remove finished array `name` (a step of the computation) from the entry."""
        del self.crcs[name]
        self.array_path(name).unlink()

    def commit(self, meta: dict[str, Any]) -> None:
        """Finish every array, write meta.json, and rename the folder into place."""
        for name in list(self.growing):
            self.finish(name)
        with open(self.tmp / "meta.json", "w") as f:
            json.dump({"format": FORMAT, "meta": meta, "crc32": self.crcs}, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            self.tmp.rename(self.path)
        except OSError:  # a concurrent writer committed first: its entry is the same
            if not (self.path / "meta.json").exists():
                raise
            self.abort()
        self._unlock()

    def abort(self) -> None:
        for array in self.growing.values():
            array.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        """Let go of the lock, once: abort may follow commit (an error later in `with`)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(meta, arrays as copy-on-write memory maps) of the entry at `path`; None when it is
    absent, and when it is corrupt (reported, then removed so that it is rebuilt)."""
    path = Path(path)
    if not (path / "meta.json").exists():
        return None
    try:
        with open(path / "meta.json") as f:
            stored = json.load(f)
        if stored.get("format") != FORMAT:
            raise ValueError(f"format {stored.get('format')}, expected {FORMAT}")
        for name, crc in stored["crc32"].items():
            if _crc32(path / f"{name}.npy") != crc:
                raise ValueError(f"checksum mismatch in {name}.npy")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="c") for name in stored["crc32"]}
        with contextlib.suppress(OSError):  # a read-only cache is read, never trimmed
            os.utime(path / "meta.json")  # last used: what `trim` keeps the newest of
        return stored["meta"], arrays
    except Exception as err:  # any failure to read means the entry cannot be trusted
        log.warning("feature cache entry %s is corrupt (%s: %s); rebuilding it", path,
                    type(err).__name__, err)
        shutil.rmtree(path, ignore_errors=True)
        return None


def trim(root: Path, keep: set[Path], max_bytes: int) -> list[Path]:
    """Remove the least recently read or written entries under `root` (never one of `keep`,
    which a run is using) until the committed entries there take at most `max_bytes`;
    returns the removed ones. Another process that maps a removed entry keeps reading it
    (its files stay until unmapped); one about to read it finds it absent and rebuilds."""
    entries = sorted(filter(None, map(_use_and_size, Path(root).iterdir())))
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, path in entries:
        if total <= max_bytes:
            break
        if path.resolve() not in keep:
            log.info("feature cache over its %.1f GB bound: removing %s, the least recently "
                     "used entry", max_bytes / (1 << 30), path.name)
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed.append(path)
    return removed


def _use_and_size(path: Path) -> tuple[int, int, Path] | None:
    """(last use, bytes, path) of a committed entry; None for anything else (a writer's
    `.<entry>.*.tmp` folder), or an entry that another process removes meanwhile."""
    if path.name.startswith("."):
        return None
    try:
        used = (path / "meta.json").stat().st_mtime_ns
        return used, sum(f.stat().st_size for f in path.iterdir()), path
    except (FileNotFoundError, NotADirectoryError):
        return None


def _crc32(path: Path) -> int:
    """CRC32 of an .npy file's data (the bytes after its header), read in bounded pieces."""
    crc, buffer = 0, bytearray(READ_BYTES)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        _read_header(f, version)
        while size := f.readinto(buffer):
            crc = zlib.crc32(memoryview(buffer)[:size], crc)
    return crc


def _read_header(f: BinaryIO, version: tuple[int, int]) -> None:
    """Move `f` past an .npy header of `version`."""
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
