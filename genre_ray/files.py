"""Files written for the user appear whole or not at all (temp name, then rename), and a
user's text files are read in the encodings people's editors and shells write."""
from __future__ import annotations

import codecs
import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from genre_ray.errors import UserError

# A byte-order mark and the encoding it announces; without one, text is UTF-8.
BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
STALE_S = 60  # a temporary file unlocked for this long was left by a writer that died


def _read_umask() -> int:
    """The process's umask. Reading it means setting it, so it is read once, at import,
    not on every write while other threads (W&B's, Ray's) may be creating files."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On an exception the temporary file is removed and `path` is left as it was, so an
    interrupted or concurrent writer never leaves a half-written file. The temporary file
    is locked (flock) while it is written: one an earlier writer left, killed before it
    could remove it, is unlocked, and is removed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


def remove_stale(path: Path, anything: bool = False) -> None:
    """Remove the temporary files and folders of `path` (`.<name>.*.tmp`: atomic_path's,
    cache.Writer's), or of anything in its folder, that no live writer holds: each writer
    flocks its file or folder."""
    for tmp in path.parent.glob(".*.tmp" if anything else f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if time.time() - tmp.stat().st_mtime < STALE_S:
                continue  # may be a writer between making it and locking it
            fd = os.open(tmp, os.O_RDONLY)
            try:
                if try_lock(fd):  # no live writer holds it
                    shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            finally:
                os.close(fd)


def try_lock(fd: int, tries: int = 1) -> bool:
    """Take the flock of `fd`, trying `tries` times 50 ms apart; whether it was taken."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def writable_folder(folder: Path, name: str, fix: str | None = None) -> Path:
    """`folder`, absolute, once a temporary file could be made in it (or in the nearest
    folder above it that exists: it is created when first written); UserError naming it
    as `name`, and `fix` (default: pass a folder you can write to as `name`), otherwise.
    Creates nothing."""
    folder = Path(folder).expanduser().resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(0, f"{existing} is a file, not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        fix = fix or f"pass a folder you can write to as {name}"
        raise UserError(f"cannot write to {name} {folder} ({err.strerror}); {fix}") from None
    return folder


def read_text(path: Path) -> str:
    """A user's text file: UTF-8 with or without a byte-order mark, or UTF-16 with one.
    UserError naming the file and the encoding to use for anything else."""
    raw = Path(path).read_bytes()
    encoding = next((name for bom, name in BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not {encoding.upper()} text (byte {err.start}: "
                        f"{raw[err.start:err.start + 1]!r}); save it as UTF-8") from None
