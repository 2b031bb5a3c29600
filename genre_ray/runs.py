"""Which run a command starts or continues, and the run's life while a command holds it.

A run is `<storage>/<name>/` (storage.py). Beside Tune's experiment, genre-ray keeps
`run.json` there, the run's record: its whole resolved configuration (config.as_json:
every section of defaults.yaml, with the flags'), beside it the search spaces as read,
the hash of both (config.identity), its status and rounds. One driver at a time holds a
run (lease.py). So:

- a run whose record is not `finished` and that no driver holds was interrupted (Ctrl-C,
  SIGTERM, `ray job stop`, a killed driver, a lost head) or `failed` (an error after it
  started, its `reason` kept): the same command continues it, from this machine or any
  other that reaches the storage, if the configuration is still the same (where this
  machine keeps things, config.MACHINE_FIELDS, is the command's); if defaults.yaml,
  a search-space file or a --config file changed since, it stops naming the change;
  `--resume` continues it as it was saved;
- a finished run is not run again: its name says where its results are; `--more-samples
  N` grows it instead, by a round of N more trials per pair: Tune's experiment of round
  k >= 1 is `<name>/more-<k>/` (`round_name`), the pairs' Optuna studies go on in the
  run's journal, and the record keeps each round's trials per pair (`rounds`).

While a command holds a run (`claimed`), with a URI storage, a keeper thread renews the
lease and puts the run's files in the storage every SYNC_S seconds (the record at once,
as it is written). When the storage cannot be written for GIVE_UP_S seconds, the keeper
stops the run as Ctrl-C does, before its lease could expire, and `Run.lost` says why.
"""
from __future__ import annotations

import _thread
import contextlib
import datetime
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from genre_ray import config, lease
from genre_ray.errors import UserError
from genre_ray.files import atomic_path
from genre_ray.storage import LOCK, RECORD, RunFolder, Storage, StorageError

# Bumped when what a run saves (Tune's pickled searcher and scheduler, its trials'
# configs and checkpoints) changes shape: an interrupted run of another format cannot be
# continued. 5: the Optuna journal is pickled as its run (tuning.RunJournal).
FORMAT = 5
SYNC_S = 2.0  # a URI storage gets the run's changed files this often
STOPPING_S = 10.0  # a run told to stop (`stopping`) may be taken over this long after
GIVE_UP_S = 10.0  # the storage failing this long stops the run (trials fail at their next
# checkpoint meanwhile), long before the lease it can no longer renew ends


class Interrupted(Exception):
    """The run stopped before its last trial (Ctrl-C); its state is saved for a resume."""


@dataclass(frozen=True)
class Session:
    """How this command runs, beside what it runs (config.Config): which run, which Ray."""

    name: str | None = None  # None: the newest interrupted run with this configuration, or new
    resume: bool = False  # continue a run with its saved configuration
    address: str | None = None  # a Ray cluster to join; None: $RAY_ADDRESS (a submitted
    # job's cluster) if set, else a new local Ray
    shared_storage: bool = False  # the storage path is mounted on every node
    check: bool = False  # check what a run would check, and stop there (tune_main --check)
    more_samples: int = 0  # grow the finished run `name` by this many trials per pair


@dataclass
class Run:
    """The run this command works on, with its configuration (config.as_json) and search
    spaces as read (each model's document); `resume`: continue it through Tuner.restore;
    `seen`: its record when chosen (None: it had none); `rounds`: trials per pair of each round, the last the one this command runs (the first
    is the configuration's num_samples, each later one a --more-samples); `folder`: its
    files, once claimed; `lost`: why the keeper stopped it (the storage failed)."""

    name: str | None
    config: dict[str, Any]
    spaces: dict[str, Any]
    resume: bool
    seen: dict[str, Any] | None = None
    rounds: tuple[int, ...] = ()
    folder: RunFolder | None = None
    lost: StorageError | None = None

    def __post_init__(self) -> None:
        self.rounds = self.rounds or (self.config["search"]["num_samples"],)

    @property
    def round(self) -> int:
        return len(self.rounds) - 1

    @property
    def dir(self) -> Path:
        """The run's folder on this machine."""
        return self.folder.dir


def round_name(name: str, round_: int) -> str:
    """Tune's experiment of a run's round, under the storage path: the run's own folder,
    then `<name>/more-<round>`."""
    return name if round_ == 0 else f"{name}/more-{round_}"


def _saved(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(configuration, search spaces) of a run's record; an older record keeps its spaces
    inside its configuration."""
    saved = dict(record["config"])
    return saved, record.get("spaces", saved.pop("spaces", {}))


def _rounds(record: dict[str, Any]) -> tuple[int, ...]:
    return tuple(record.get("rounds") or (record["config"]["search"]["num_samples"],))


def read_record(store: Storage, name: str) -> dict[str, Any] | None:
    """Run `name`'s record in the storage; None if it has none. UserError if it cannot be read."""
    data = store.read(f"{name}/{RECORD}")
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as err:
        raise UserError(f"cannot read {store.tune_path(name)}/{RECORD} ({err}); remove that "
                        "run's folder, or pass another --storage-path") from None


def write_record(run: Run, status: str, reason: str | None = None) -> None:
    """Write the run's record, here and in its storage: `status` running | interrupted |
    failed (`reason`) | finished."""
    record = {"name": run.name, "status": status, "format": FORMAT, "config": run.config,
              "spaces": run.spaces,
              "config_hash": config.digest(config.identity(run.config, run.spaces)),
              "rounds": list(run.rounds),
              "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **({"reason": reason} if reason else {})}
    with atomic_path(run.dir / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    run.folder.push(RECORD)


def choose(store: Storage, name: str | None, cfg: dict[str, Any], spaces: dict[str, Any],
           resume: bool, more: int = 0) -> Run:
    """The run a command works on, read-only, for configuration `cfg` (config.as_json) and
    search spaces `spaces` (each model's document as read): the named run, else the newest
    interrupted run this command started (same flags; with `resume`: any), else a new run (name None,
    given when claimed). `more`: grow the named finished run by a round of `more` trials
    per pair (or continue that round, interrupted). UserError when the named run is
    finished (and not grown), or when the run to continue was saved with another
    configuration (unless `resume` or `more`: it keeps its own). A run the same command
    continues takes this command's MACHINE_FIELDS."""
    if more and name is None:
        raise UserError("--more-samples grows a finished run: name it with --name (its folder "
                        "under --storage-path)")
    if name is not None:
        chosen = _named(store, _checked_name(name), cfg, spaces, resume, more)
    else:
        chosen = _latest(store, cfg, spaces, resume) or Run(None, cfg, spaces, resume=False)
    if not (resume or more):  # the same command, on this machine or another
        chosen.config = config.here(chosen.config, cfg)
    return chosen


def _checked_name(name: str) -> str:
    """`name` if it is one folder name inside the storage path; UserError otherwise."""
    if not name.strip() or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"--name {name!r} is not a folder name: give one name, without '/', "
                        "not '.' or '..' and not empty, e.g. --name my-run")
    return name


def _named(store: Storage, name: str, cfg: dict[str, Any], spaces: dict[str, Any], resume: bool,
           more: int) -> Run:
    if (who := lease.holder(store, name)) is not None:  # now, not after Ray and the features
        raise lease.Busy(lease.busy_message(name, who))
    record = read_record(store, name)
    if record is None and (resume or more):
        what = "grow" if more else "resume"
        raise UserError(f"there is no run {name!r} under {store.uri} to {what}; check --name "
                        f"and --storage-path, or drop --{'more-samples' if more else 'resume'} "
                        "to start it")
    if record is None:
        if any(info.base_name not in (LOCK, lease.LEASE) for info in store.listing(name)):
            raise UserError(f"{store.tune_path(name)} exists and is not a genre-ray run; pass "
                            "another --name")
        return Run(name, cfg, spaces, resume=False)
    if record.get("format") != FORMAT and not (record["status"] == "finished" and not more):
        raise UserError(f"run {name!r} was saved by another version of genre-ray and cannot be "
                        f"{'grown' if more else 'continued'}; pass a new --name to start another run")
    if record["status"] == "finished":  # an older format's record has no config: no output_dir
        if more:
            return Run(name, *_saved(record), resume=False, seen=record,
                       rounds=(*_rounds(record), more))
        models = (record.get("config") or {}).get("run", {}).get("output_dir")
        raise UserError(f"run {name!r} is finished: its leaderboard is "
                        f"{store.tune_path(name)}/leaderboard.md"
                        + (f" and its models are in {models}" if models else "")
                        + "; pass a new --name to start another run, or --more-samples N to "
                          "add N trials per pair to it")
    rounds = _rounds(record)
    if more and (len(rounds) == 1 or rounds[-1] != more):
        growing = f" (its round of {rounds[-1]} more)" if len(rounds) > 1 else ""
        raise UserError(f"run {name!r} is not finished ({record['status']}); continue it first"
                        f"{growing}: tune_main.py --name {name} --resume, then grow it")
    saved = _saved(record)
    if not (resume or more):
        _require_same(name, saved, cfg, spaces)
    return Run(name, *saved, resume=True, seen=record, rounds=rounds)


def _latest(store: Storage, cfg: dict[str, Any], spaces: dict[str, Any], resume: bool) -> Run | None:
    """The newest interrupted run this command started: the same flags' values (with
    `resume`: any run). UserError if its configuration changed since (not with `resume`)."""
    for name, record in _unfinished(store):
        if resume or config.command(record["config"]) == config.command(cfg):
            saved = _saved(record)
            if not resume:
                _require_same(name, saved, cfg, spaces)
            return Run(name, *saved, resume=True, seen=record, rounds=_rounds(record))
    if resume:
        raise UserError(f"no interrupted run under {store.uri} to resume; drop --resume to start "
                        "a new run, or pass the --storage-path where the run lives")
    return None


def _unfinished(store: Storage) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, record) of the runs not finished and held by no driver, newest first."""
    dated = [(store.modified(f"{name}/{RECORD}"), name) for name in store.folders()]
    for _, name in sorted(((t, n) for t, n in dated if t is not None), reverse=True):
        record = read_record(store, name)
        if record["status"] != "finished" and record.get("format") == FORMAT \
                and lease.holder(store, name) is None:
            yield name, record


def _new_name(store: Storage) -> str:
    stamp = datetime.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
    taken = {info.base_name for info in store.listing() if info.base_name.startswith(stamp)}
    return next(n for n in [stamp, *(f"{stamp}-{i}" for i in range(2, 1000))] if n not in taken)


def _require_same(name: str, saved: tuple[dict[str, Any], dict[str, Any]], cfg: dict[str, Any],
                  spaces: dict[str, Any]) -> None:
    """UserError naming what changed, unless `cfg` and `spaces` are what run `name` saved
    (`_saved`'s configuration and spaces)."""
    saved, now = config.identity(*saved), config.identity(cfg, spaces)
    if config.digest(saved) != config.digest(now):
        raise UserError(f"run {name!r} was interrupted with another configuration than this "
                        f"command's ({'; '.join(config.changes(saved, now))}); add --resume to "
                        "continue it as it was started, or pass a new --name to start another run")


@contextlib.contextmanager
def claimed(store: Storage, run: Run) -> Iterator[Run]:
    """`run` held by this command until the block ends (a new run gets its name here),
    its files on this machine as the storage has them, and kept there (`_Keeper`). Busy
    when another driver holds it; UserError when it changed since it was chosen."""
    held = _claim(store, run)
    try:
        run.folder = store.folder(run.name)
        if run.seen is None:
            run.folder.reset()
        else:
            run.folder.pull()
        with _Keeper(run, held):
            yield run
            run.folder.sync()
            run.folder.compact()
    finally:
        if run.lost is None:  # else the storage is out of reach: the lease ends by itself,
            held.release()    # when the error says, with no more waiting on the storage


def _claim(store: Storage, run: Run) -> lease.Lease:
    """The lease of `run` (naming a new run first: the first name nobody took).
    UserError if the chosen run changed between choice and lease."""
    if run.name is not None:
        held = lease.take(store, run.name)
        if read_record(store, run.name) != run.seen:
            held.release()
            raise UserError(f"run {run.name!r} was run by another process while this one "
                            "started; run the command again")
        return held
    while True:
        name = _new_name(store)
        held = lease.take(store, name, new=True)
        if held is not None and read_record(store, name) is None:
            run.name = name
            return held
        if held is not None:
            held.release()


_HELD: set[_Keeper] = set()  # the runs this process holds, for `stopping`


def stopping() -> None:
    """A stop was asked for (SIGTERM: `kill`, `ray job stop`, a pod's deletion): every run
    this process holds is recorded `interrupted` now, and its lease cut to end STOPPING_S
    from now, so that if a SIGKILL follows before Tune has saved and stopped (`ray job
    stop` sends one 3 s after SIGTERM unless RAY_JOB_STOP_WAIT_TIME_S says otherwise),
    the run is still recorded so and the same command continues it soon after. Done by a
    thread: a signal handler must not wait for a lock the code it interrupted holds."""
    for keeper in list(_HELD):
        threading.Thread(target=keeper.cut_short, name="genre-ray-stopping", daemon=True).start()


class _Keeper:
    """While a run is held (a URI storage): every SYNC_S seconds its lease renewed and its
    files put in the storage. When the storage has not been reached for GIVE_UP_S seconds
    (it refuses, or hangs: a watchdog thread judges), `run.lost` says why and the main
    thread is interrupted as by Ctrl-C (Tune saves what it can and stops)."""

    def __init__(self, run: Run, held: lease.Lease) -> None:
        self.run, self.held = run, held
        self.stop, self.once = threading.Event(), threading.Lock()
        self.reached, self.error = time.monotonic(), None
        self.threads = [threading.Thread(target=target, name=f"genre-ray-{target.__name__[1:]}",
                                         daemon=True) for target in (self._keep, self._watch)]

    def __enter__(self) -> _Keeper:
        if self.run.folder.store.remote:
            for thread in self.threads:
                thread.start()
        _HELD.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _HELD.discard(self)
        self.stop.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout=SYNC_S)  # one hung in the storage is a daemon: left
        if isinstance(exc[1], StorageError):  # met by the run itself, not by this keeper
            self._lose(exc[1])
        if self.run.lost is not None and exc[0] is not None:
            raise self.run.lost from None  # why the run stopped, in place of the Ctrl-C

    def cut_short(self) -> None:
        """`stopping`'s work for this run (a storage error is the keeper's to report)."""
        with contextlib.suppress(StorageError):
            if self.run.seen is not None or (self.run.dir / RECORD).is_file():
                write_record(self.run, "interrupted")
            self.held.cut(STOPPING_S)
            if self.held.expires is not None:  # then another driver may hold the run
                self.run.folder.close_at(self.held.expires - 1.0)

    def _keep(self) -> None:
        while not self.stop.wait(SYNC_S):
            try:
                self.held.keep()
                self.run.folder.sync()
                self.run.folder.store.modified(f"{self.run.name}/{RECORD}")  # reached, even idle
                self.reached = time.monotonic()
            except lease.Lost as err:
                return self._give_up(err)
            except StorageError as err:
                self.error = err

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            if time.monotonic() - self.reached >= GIVE_UP_S:
                return self._give_up(self.error or StorageError(
                    f"--storage-path {self.run.folder.store.uri} has not answered for "
                    f"{GIVE_UP_S:.0f} s"))

    def _give_up(self, err: StorageError) -> None:
        if self._lose(err):
            _thread.interrupt_main(signal.SIGINT)

    def _lose(self, err: StorageError) -> bool:
        """Record in `run.lost` that the storage failed (with how to continue), once."""
        with self.once:
            if self.run.lost is not None:
                return False
            ends = self.held.expires
            after = "" if ends is None else \
                time.strftime(" after %H:%M:%S UTC, when this driver's lease ends", time.gmtime(ends))
            self.run.lost = StorageError(f"{err}. The run stopped; what the storage held is "
                                         f"kept: run the same command again once it can be "
                                         f"written{after}")
            return True


def tune_state_exists(store: Storage, name: str) -> bool:
    """Whether Tune saved this run's experiment state (written at its first step; its
    `tuner.pkl` alone, written when the Tuner is made, cannot be restored)."""
    return any(info.base_name.startswith("experiment_state") for info in store.listing(name))
