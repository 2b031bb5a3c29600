"""Which run a command starts or continues, and where it lives.

A run is the folder `<storage>/<name>/`: Tune's experiment state and trials, the run's
Optuna journal, its W&B files, leaderboard and plots. Beside them genre-ray keeps
`run.json`, the run's whole resolved configuration (config.as_json: every section of
defaults.yaml, the flags, the search spaces as read) with its hash, and whether it
finished; and `.lock`, held by the process running it. So:

- a run whose record is not `finished` and whose lock is free was interrupted (Ctrl-C,
  SIGTERM, a killed driver) or `failed` (an error after it started, its `reason` kept):
  the same command continues it if the configuration is still the same; if
  defaults.yaml, a search-space file or a --config file changed since, it stops naming
  the change; `--resume` continues it as it was saved;
- a finished run is not run again: its name says where its results are; `--more-samples
  N` grows it instead, by a round of N more trials per pair: Tune's experiment of round
  k >= 1 is `<name>/more-<k>/` (`round_name`), the pairs' Optuna studies go on in the
  run's journal, and the record keeps each round's trials per pair (`rounds`);
- two processes never run one folder at once.

`--storage-path` may be a local or NFS path, or a URI. Tune writes a URI's trials and
checkpoints there itself; the files genre-ray writes (the record, the lock, the Optuna
journal, W&B files, leaderboard, plots) need a local folder, kept under the cache
(`<cache>/runs/<hash of the URI>/<name>/`) and copied to `<URI>/<name>/` at the end.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from genre_ray import config
from genre_ray.config import cache_dir
from genre_ray.errors import UserError
from genre_ray.files import atomic_path, try_lock

RECORD, LOCK = "run.json", ".lock"
# Bumped when what a run saves (Tune's pickled searcher and scheduler, its trials'
# configs and checkpoints) changes shape: an interrupted run of another format cannot be
# continued. 3: trials carry checkpoint_epochs; checkpoints hold their epoch's metrics.
# 4: the record holds the whole configuration; trials take it through with_parameters.
FORMAT = 4


@dataclass(frozen=True)
class Storage:
    """Where runs live: `uri` for Tune, `local` for genre-ray's own files of each run."""

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

    def tune_path(self, name: str) -> str:
        """Where Tune keeps run `name`: the name goes before a URI's query (?region=...)."""
        if not self.remote:
            return str(self.local / name)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"


def storage(path_or_uri: str) -> Storage:
    """The Storage of `--storage-path`: a path, or a URI (s3://, gs://, file://, ...)."""
    if "://" not in path_or_uri:
        local = Path(path_or_uri).expanduser().resolve()
        return Storage(str(local), local)
    import pyarrow
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(path_or_uri)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"--storage-path {path_or_uri} is not a storage URI this machine can "
                        f"use ({err}); pass a path, or an s3://, gs:// or file:// URI") from None
    key = hashlib.sha256(path_or_uri.rstrip("/").encode()).hexdigest()[:12]
    return Storage(path_or_uri.rstrip("/"), cache_dir() / "runs" / key)


@dataclass
class Run:
    """The run this command works on, with its configuration (config.as_json); `resume`:
    continue it through Tuner.restore; `seen`: its record when chosen (None: it had none);
    `rounds`: trials per pair of each round, the last the one this command runs (the first
    is the configuration's num_samples, each later one a --more-samples)."""

    name: str | None
    dir: Path | None
    config: dict[str, Any]
    resume: bool
    seen: dict[str, Any] | None = None
    rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.rounds = self.rounds or (self.config["search"]["num_samples"],)

    @property
    def round(self) -> int:
        return len(self.rounds) - 1


def round_name(name: str, round_: int) -> str:
    """Tune's experiment of a run's round, under the storage path: the run's own folder,
    then `<name>/more-<round>`."""
    return name if round_ == 0 else f"{name}/more-{round_}"


def _rounds(record: dict[str, Any]) -> tuple[int, ...]:
    return tuple(record.get("rounds") or (record["config"]["search"]["num_samples"],))


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record; None if it has none. UserError if it cannot be read."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); remove that run's folder, or pass "
                        "another --storage-path") from None


def write_record(run: Run, status: str, reason: str | None = None) -> None:
    """Write the run's record: `status` running | interrupted | failed (`reason`) | finished."""
    record = {"name": run.name, "status": status, "format": FORMAT, "config": run.config,
              "config_hash": config.digest(run.config), "rounds": list(run.rounds),
              "updated": datetime.datetime.now().isoformat(timespec="seconds"),
              **({"reason": reason} if reason else {})}
    with atomic_path(run.dir / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def choose(store: Storage, name: str | None, cfg: dict[str, Any], resume: bool,
           more: int = 0) -> Run:
    """The run a command works on, read-only: the named run, else the newest interrupted
    run this command started (same flags; with `resume`: any), else a new run (name None,
    given when claimed). `more`: grow the named finished run by a round of `more` trials
    per pair (or continue that round, interrupted). UserError when the named run is
    finished (and not grown), or when the run to continue was saved with another
    configuration (unless `resume` or `more`: it keeps its own)."""
    if more and name is None:
        raise UserError("--more-samples grows a finished run: name it with --name (its folder "
                        "under --storage-path)")
    if name is not None:
        return _named(store, _checked_name(name), cfg, resume, more)
    return _latest(store, cfg, resume) or Run(None, None, cfg, resume=False)


def _checked_name(name: str) -> str:
    """`name` if it is one folder name inside the storage path; UserError otherwise."""
    if not name.strip() or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"--name {name!r} is not a folder name: give one name, without '/', "
                        "not '.' or '..' and not empty, e.g. --name my-run")
    return name


@contextlib.contextmanager
def claimed(store: Storage, run: Run) -> Iterator[Run]:
    """`run` with its folder's lock held until the block ends (a new run gets its name
    here). UserError when another process runs it."""
    while (fd := _claim(store, run)) is None:
        pass  # another process took that new name first: the next one
    try:
        yield run
    finally:
        os.close(fd)


def _claim(store: Storage, run: Run) -> int | None:
    """Lock `run`'s folder (naming a new run first): the lock's fd, or None if a new name
    was taken meanwhile. UserError if the chosen run changed between choice and lock."""
    if run.name is not None:
        fd = _lock(run.dir)
        if read_record(run.dir) != run.seen:
            os.close(fd)
            raise UserError(f"run {run.name!r} was run by another process while this one "
                            "started; run the command again")
        return fd
    name = _new_name(store)
    with contextlib.suppress(_Busy):
        fd = _lock(store.local / name)
        if read_record(store.local / name) is None:
            run.name, run.dir = name, store.local / name
            return fd
        os.close(fd)
    return None


def _named(store: Storage, name: str, cfg: dict[str, Any], resume: bool, more: int) -> Run:
    run_dir = store.local / name
    record = read_record(run_dir)
    if record is None and (resume or more):
        what = "grow" if more else "resume"
        raise UserError(f"there is no run {name!r} under {store.uri} to {what}; check --name "
                        f"and --storage-path, or drop --{'more-samples' if more else 'resume'} "
                        "to start it")
    if record is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} exists and is not a genre-ray run; pass another --name")
        if store.remote and tune_state_exists(store, name):  # started on another machine
            raise UserError(f"a run {name!r} already exists at {store.tune_path(name)}, started "
                            "from another machine (its record is in that machine's cache); "
                            "continue it from there, or pass another --name")
        return Run(name, run_dir, cfg, resume=False)
    if record.get("format") != FORMAT and not (record["status"] == "finished" and not more):
        raise UserError(f"run {name!r} was saved by another version of genre-ray and cannot be "
                        f"{'grown' if more else 'continued'}; pass a new --name to start another run")
    if record["status"] == "finished":  # an older format's record has no config: no output_dir
        if more:
            return Run(name, run_dir, record["config"], resume=False, seen=record,
                       rounds=(*_rounds(record), more))
        models = (record.get("config") or {}).get("run", {}).get("output_dir")
        raise UserError(f"run {name!r} is finished: its leaderboard is {run_dir / 'leaderboard.md'}"
                        + (f" and its models are in {models}" if models else "")
                        + "; pass a new --name to start another run, or --more-samples N to "
                          "add N trials per pair to it")
    rounds = _rounds(record)
    if more and (len(rounds) == 1 or rounds[-1] != more):
        growing = f" (its round of {rounds[-1]} more)" if len(rounds) > 1 else ""
        raise UserError(f"run {name!r} is not finished ({record['status']}); continue it first"
                        f"{growing}: tune_main.py --name {name} --resume, then grow it")
    if not (resume or more):
        _require_same(name, record["config"], cfg)
    return Run(name, run_dir, record["config"], resume=True, seen=record, rounds=rounds)


def _latest(store: Storage, cfg: dict[str, Any], resume: bool) -> Run | None:
    """The newest interrupted run this command started: the same flags' values (with
    `resume`: any run). UserError if its configuration changed since (not with `resume`)."""
    for run_dir, record in _unfinished(store):
        if resume or config.command(record["config"]) == config.command(cfg):
            if not resume:
                _require_same(run_dir.name, record["config"], cfg)
            return Run(run_dir.name, run_dir, record["config"], resume=True, seen=record,
                       rounds=_rounds(record))
    if resume:
        raise UserError(f"no interrupted run under {store.uri} to resume; drop --resume to start "
                        "a new run, or pass the --storage-path where the run lives")
    return None


def _unfinished(store: Storage) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder, record) of runs not finished and not locked, newest first."""
    records = sorted(store.local.glob(f"*/{RECORD}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in records:
        record = read_record(path.parent)
        if record["status"] != "finished" and record.get("format") == FORMAT \
                and not _busy(path.parent):
            yield path.parent, record


def _new_name(store: Storage) -> str:
    stamp = datetime.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
    taken = {p.name for p in store.local.glob(f"{stamp}*")}
    return next(n for n in [stamp, *(f"{stamp}-{i}" for i in range(2, 1000))] if n not in taken)


def _require_same(name: str, saved: dict[str, Any], cfg: dict[str, Any]) -> None:
    """UserError naming what changed, unless `cfg` is the configuration run `name` saved."""
    if config.digest(saved) != config.digest(cfg):
        raise UserError(f"run {name!r} was interrupted with another configuration than this "
                        f"command's ({'; '.join(config.changes(saved, cfg))}); add --resume to "
                        "continue it as it was started, or pass a new --name to start another run")


class _Busy(UserError):
    pass


def _lock(run_dir: Path) -> int:
    """Take `run_dir`'s lock (an flock: released when the process ends, however it ends)
    and write our pid in it; returns its fd, to close to release it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot lock run {run_dir} ({err.strerror}); pass a --storage-path "
                        "you can write to") from None
    if not try_lock(fd, tries=10):  # another process's _busy may be peeking
        pid = os.pread(fd, 32, 0).decode().strip() or "?"
        os.close(fd)
        raise _Busy(f"run {run_dir.name!r} ({run_dir}) is running in another process "
                    f"(pid {pid}); wait for it, or pass another --name")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _busy(run_dir: Path) -> bool:
    """Whether another process holds `run_dir`'s lock (checked without writing)."""
    if not (run_dir / LOCK).is_file():
        return False
    fd = os.open(run_dir / LOCK, os.O_RDONLY)
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)


def tune_state_exists(store: Storage, name: str) -> bool:
    """Whether Tune saved this run's experiment state (written at its first step; its
    `tuner.pkl` alone, written when the Tuner is made, cannot be restored)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(_uri(store.tune_path(name)))
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return any(f.base_name.startswith("experiment_state") for f in found)


def _uri(path_or_uri: str) -> str:
    return path_or_uri if "://" in path_or_uri else Path(path_or_uri).as_uri()


def require_writable(store: Storage) -> None:
    """UserError unless a file can be written under a URI storage path."""
    import pyarrow
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(store.uri)
    probe = f"{path}/.genre-ray-probe-{os.getpid()}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"cannot write to --storage-path {store.uri} ({err}); check its "
                        "credentials and permissions, or pass another --storage-path") from None


def publish(store: Storage, run: Run) -> str | None:
    """Copy the run's local files to `<URI>/<name>/`, beside Tune's (remote storage only);
    returns that URI. Links (W&B's `latest-run`) and the lock are left out."""
    if not store.remote:
        return None
    import pyarrow
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(store.tune_path(run.name))
    try:
        for folder, _, names in os.walk(run.dir):
            for name in names:
                file = Path(folder, name)
                if name != LOCK and not file.is_symlink():
                    target = f"{path}/{file.relative_to(run.dir).as_posix()}"
                    fs.create_dir(target.rpartition("/")[0], recursive=True)
                    pyarrow.fs.copy_files(str(file), target, destination_filesystem=fs)
    except (pyarrow.ArrowException, OSError) as err:
        write_record(run, "interrupted")  # the same command copies them again
        raise UserError(f"the run finished, but copying its files to {store.tune_path(run.name)} "
                        f"failed ({err}); they are in {run.dir}; run the same command again "
                        "to copy them") from None
    return store.tune_path(run.name)
