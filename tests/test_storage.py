"""A run kept in its storage, as a team runs one: a bucket (s3:// on a real S3 server on
127.0.0.1, bench/s3.py, through pyarrow's S3 filesystem as on AWS) and, the same way, a
file:// folder. One run is taken through every stop a cluster knows, each continued by
the same command from a new empty working folder and a new cache (a fresh head):

1. SIGINT mid-tuning (Ctrl-C, `ray job stop`);
2. SIGKILL mid-tuning (a lost head: nothing could be saved or copied);
3. the storage stopped mid-run (the server gone; for file://, its folder replaced by a file);
4. the run finished.

The two storages' runs go through their stops at the same time. Then what the storage
holds is checked: no finished trial ran again, the studies hold every trial, the exports
are what the trials say is best, and the exports, leaderboard and plots are in the
storage. Bad storage paths are refused before anything is written."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pytest
from optuna.trial import TrialState

from genre_ray import export
from tests.helpers import ONE_SLOT, REPO, make_tree, read_run, run_main
from bench.s3 import S3

pytestmark = pytest.mark.slow  # whole runs of tune_main.py
PAIRS, SAMPLES, EPOCHS = ["MLP_spectrogram", "CEL_spectrogram"], 3, 12


@dataclass
class Where:
    """A storage under test: its URI, the environment that reaches it, and how to stop
    and restart it."""

    uri: str
    env: dict[str, str]
    s3: S3 | None = None
    away: Path | None = None  # file://: where its folder waits while it is stopped
    _fs: tuple = field(default=None, repr=False)

    @property
    def fs(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            if self.s3:
                key, secret = self.s3.keys["writer"]
                host = self.s3.endpoint.removeprefix("http://")
                fs = pafs.S3FileSystem(access_key=key, secret_key=secret, region="us-east-1",
                                       endpoint_override=host, scheme="http")
                self._fs = (fs, self.uri.removeprefix("s3://"))
            else:
                self._fs = pafs.FileSystem.from_uri(self.uri)
        return self._fs

    def read(self, relative: str) -> bytes | None:
        fs, root = self.fs
        if fs.get_file_info(f"{root}/{relative}").type != pafs.FileType.File:
            return None
        with fs.open_input_stream(f"{root}/{relative}") as f:
            return f.read()

    def files(self, relative: str) -> list[str]:
        fs, root = self.fs
        found = fs.get_file_info(pafs.FileSelector(f"{root}/{relative}", recursive=True,
                                                   allow_not_found=True))
        return [info.path.removeprefix(f"{root}/") for info in found if info.type == pafs.FileType.File]

    def stop(self) -> None:
        if self.s3:
            self.s3.relay.stop()
        else:
            folder = Path(self.uri.removeprefix("file://"))
            folder.rename(self.away)
            folder.write_text("not a folder: the storage is away")

    def start(self) -> None:
        if self.s3:
            self.s3.relay.start()
        else:
            folder = Path(self.uri.removeprefix("file://"))
            folder.unlink()
            self.away.rename(folder)

    def end_lease(self, name: str) -> None:
        """As if the lease of a driver that is gone had run out (an flock ends with its process)."""
        if self.s3:
            client, bucket = self.s3.client(), self.uri.removeprefix("s3://").split("/")[0]
            key = f"{self.uri.removeprefix(f's3://{bucket}/')}/{name}/.lease"
            body = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps({**body, "expires": 0}))


@pytest.fixture(scope="module")
def wheres(tmp_path_factory, s3) -> dict[str, Where]:
    base = tmp_path_factory.mktemp("storage-file")
    return {"s3": Where(s3.bucket(f"runs-{int(time.time() * 1000)}") + "/runs", s3.env(), s3),
            "file": Where((base / "bucket" / "runs").as_uri(), dict(os.environ), away=base / "away")}


@pytest.fixture(params=["s3", "file"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def where(wheres, kind) -> Where:
    return wheres[kind]


def command(data: Path, uri: str) -> list[str]:
    return [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(data),
            "--models", "MLP", "CEL", "--features", "spectrogram", "--num-samples", str(SAMPLES),
            "--max-epochs", str(EPOCHS), "--storage-path", uri, "--name", "chain",
            "--output-dir", "best", "--wandb", "offline", *ONE_SLOT]


def done(where: Where) -> dict[str, str]:
    """Trial folder -> hash of its result.json in the storage, for trials that ended."""
    found = {}
    for path in where.files("chain"):
        if path.endswith("/result.json") and path.count("/") == 2:
            data = where.read(path) or b""
            if b'"done": true' in data:
                found[path.split("/")[1]] = hashlib.sha256(data).hexdigest()
    return found


def checkpoints(where: Where) -> set[str]:
    """The trials' checkpoint folders in the storage (each trial's worker writes them there
    as it reaches them; a trial's result.json reaches the storage only with the driver's syncs)."""
    folders = (path.split("/")[:3] for path in where.files("chain"))
    return {"/".join(parts) for parts in folders
            if len(parts) == 3 and parts[2].startswith("checkpoint_")}


def ended_in_state(where: Where) -> set[str]:
    """Trials the experiment state in the storage holds as ended (TERMINATED or ERROR)."""
    states = sorted(p for p in where.files("chain") if p.count("/") == 1
                    and p.split("/")[1].startswith("experiment_state"))
    state = json.loads(where.read(states[-1]))
    ended = set()
    for trial, _ in state["trial_data"]:
        trial = json.loads(trial)
        if trial["status"] in ("TERMINATED", "ERROR"):
            ended.add(f"{trial['config']['pair']}_{trial['trial_id']}")
    return ended


@dataclass
class Stage:
    code: int
    out: str
    err: str
    finished: dict[str, str]  # trial -> result.json hash: ended in the state it left
    status: str  # of the run's record in the storage, after it
    cache: Path  # the head's cache: its working copy of the run's files


def stage(where: Where, data: Path, base: Path, name: str, stop=None, when=None) -> Stage:
    """The command from a new empty working folder with a new cache (a fresh head); `stop`
    (a signal, or "storage") once `when(where)` holds."""
    cwd = base / name
    cwd.mkdir()
    env = {**where.env, "GENRE_RAY_CACHE": str(base / f"cache-{name}"), "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}  # SIGABRT (ended) prints where each thread was
    with open(cwd / "out.log", "w+") as out, open(cwd / "err.log", "w+") as err:
        proc = subprocess.Popen(command(data, where.uri), cwd=cwd, env=env, stdout=out,
                                stderr=err, start_new_session=True)
        deadline = time.monotonic() + 300
        while stop is not None and not when(where):
            assert proc.poll() is None and time.monotonic() < deadline, (cwd / "err.log").read_text()[-3000:]
            time.sleep(1)  # each look lists the run in the storage and reads its results
        if stop == "storage":
            where.stop()
        elif stop is not None:
            os.killpg(proc.pid, stop)
        code = ended(proc, cwd / "err.log")
    if stop == "storage":
        where.start()
    if stop in (signal.SIGKILL, "storage"):
        where.end_lease("chain")
    finished = {t: h for t, h in done(where).items() if t in ended_in_state(where)}
    status = json.loads(where.read("chain/run.json"))["status"]
    return Stage(code, (cwd / "out.log").read_text(), (cwd / "err.log").read_text(), finished,
                 status, base / f"cache-{name}")


def ended(proc: subprocess.Popen, err: Path, timeout_s: float = 300) -> int:
    """The command's exit code; a command that hangs is made to print its threads' stacks
    (faulthandler) and killed with its Ray, and the stage fails with those stacks."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args} hung for {timeout_s} s:\n{err.read_text()[-12000:]}")


def run_chain(where: Where, base: Path) -> dict[str, Stage]:
    """The run through every stop, each continued by a fresh head."""
    data = make_tree(base / "data", tracks=3, seconds=11.0)
    stages = {"sigint": stage(where, data, base, "sigint", signal.SIGINT, lambda w: len(done(w)) >= 2)}
    # Each fresh head is stopped by its own progress, early enough to leave it trials to run:
    # the driver killed once its trials wrote two new checkpoints (the workers write them to
    # the storage as they reach them), the storage stopped once the driver says a trial of
    # its own completed (a trial's result.json reaches the storage only with its syncs).
    before = checkpoints(where)
    stages["sigkill"] = stage(where, data, base, "sigkill", signal.SIGKILL,
                              lambda w: len(checkpoints(w) - before) >= 2)
    log = base / "storage" / "out.log"
    stages["storage"] = stage(where, data, base, "storage", "storage",
                              lambda w: log.is_file() and "completed after" in log.read_text())
    stages["end"] = stage(where, data, base, "end")
    return stages


@pytest.fixture(scope="module")
def chains(wheres, tmp_path_factory) -> dict[str, dict[str, Stage]]:
    """Both storages' chains at once: each stage is a process of its own, and each chain
    waits on its own progress, so the two share the machine's time and not each other's."""
    bases = {name: tmp_path_factory.mktemp(f"heads-{name}") for name in wheres}
    with ThreadPoolExecutor(len(wheres)) as pool:
        running = {name: pool.submit(run_chain, where, bases[name]) for name, where in wheres.items()}
        return {name: future.result() for name, future in running.items()}


@pytest.fixture
def chain(chains, kind) -> dict[str, Stage]:
    return chains[kind]


def test_sigint_records_the_run_interrupted_in_its_storage(where, chain):
    first = chain["sigint"]
    assert first.code == 130, first.err[-3000:]
    assert first.err.strip().splitlines()[-1].startswith("run 'chain' was interrupted")
    assert first.status == "interrupted"
    assert 0 < len(first.finished) < len(PAIRS) * SAMPLES


def test_a_fresh_head_continues_without_rerunning_a_finished_trial(chain):
    for before, after in [("sigint", "sigkill"), ("sigkill", "storage"), ("storage", "end")]:
        assert "continuing interrupted run 'chain'" in chain[after].out or \
            "continuing failed run 'chain'" in chain[after].out, chain[after].err[-2000:]
        kept = {t: h for t, h in chain[after].finished.items() if t in chain[before].finished}
        assert kept == chain[before].finished, (before, after)  # not one result more
    assert len(chain["end"].finished) == len(PAIRS) * SAMPLES


def test_a_killed_driver_loses_only_the_epochs_after_its_trials_last_checkpoints(where, chain):
    assert chain["sigkill"].code == -signal.SIGKILL
    rungs = {0, 2, 4, 8, 12}  # grace 2 x reduction 2^k, and the last epoch: where trials checkpoint
    reran = 0
    for trial in chain["end"].finished:
        rows = list(csv.DictReader(io.StringIO(where.read(f"chain/{trial}/progress.csv").decode())))
        epochs = [int(row["training_iteration"]) for row in rows]
        for i in range(1, len(epochs)):
            if epochs[i] <= epochs[i - 1]:  # continued from a checkpoint: it starts after one
                assert epochs[i] - 1 in rungs, (trial, epochs)
                reran += epochs[i - 1] - epochs[i] + 1
    assert reran <= 2 * EPOCHS  # at most the two trials running at each stop


def test_a_stopped_storage_ends_the_run_with_one_line_and_leaves_it_continuable(chain):
    stopped = chain["storage"]
    assert stopped.code == 2, stopped.err[-3000:]
    last = stopped.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--storage-path" in last and "run the same command" in last
    assert chain["end"].code == 0, chain["end"].err[-3000:]


def test_the_finished_run_has_its_exports_reports_and_whole_studies_in_the_storage(where, chain):
    files = set(where.files("chain"))
    for name in ("leaderboard.md", "leaderboard.csv", "pareto.csv", "plots/search.png",
                 "plots/importance.png", *(f"best_models/{p}_best_model.{ext}"
                                           for p in PAIRS for ext in ("pth", "onnx"))):
        assert f"chain/{name}" in files, name
    assert not any(name.endswith(".lease") for name in files)  # released (an flock ends with its process)
    assert json.loads(where.read("chain/run.json"))["status"] == "finished"
    assert any(name.startswith("chain/wandb/offline-run-") for name in files)
    with tempfile.TemporaryDirectory() as folder:
        journal = Path(folder, "optuna.journal")
        journal.write_bytes(where.read("chain/optuna.journal"))  # whole, at the end
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        for pair in PAIRS:
            trials = optuna.load_study(study_name=f"chain/{pair}", storage=storage).trials
            assert not [t for t in trials if t.state == TrialState.RUNNING]
            told = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            assert len(told) == SAMPLES, [t.state for t in trials]
            best = min(v for t in told for v in t.intermediate_values.values())
            with tempfile.NamedTemporaryFile(suffix=".pth") as pth:
                pth.write(where.read(f"chain/best_models/{pair}_best_model.pth"))
                pth.flush()
                assert export.Exported.load(Path(pth.name)).val["val_loss"] == pytest.approx(best)


@pytest.mark.parametrize("user, uri, says", [
    ("writer", "s3://no-such-bucket/runs", "NO_SUCH_BUCKET"),
    ("nobody", "s3://{bucket}/runs", "INVALID_ACCESS_KEY_ID"),
    ("reader", "s3://{bucket}/runs", "ACCESS_DENIED"),
    ("writer", "nope://{bucket}/runs", "not a storage URI this machine can use"),
], ids=["missing-bucket", "wrong-credentials", "read-only-credentials", "unknown-scheme"])
def test_a_storage_path_that_cannot_be_used_is_refused_before_anything(s3, tmp_path, monkeypatch,
                                                                       user, uri, says):
    """In this process (tests/test_bad_inputs.py runs tune_main.py's exit code and one line
    as a command): the run's storage is checked before anything is written."""
    bucket = f"refuse-{user}-{int(time.time() * 1000)}"
    s3.bucket(bucket)
    for key, value in {**s3.env(user), "GENRE_RAY_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    out = run_main("tune_main", "--storage-path", uri.format(bucket=bucket), "--models", "MLP",
                   "--wandb", "off", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and says in out.stderr
    assert not s3.objects(bucket) and not list(tmp_path.iterdir())  # nothing written


def test_a_second_driver_on_a_run_in_the_bucket_is_refused_with_one_line(s3, tmp_path, monkeypatch):
    from genre_ray import lease
    from genre_ray.storage import storage

    for key, value in {**s3.env(), "GENRE_RAY_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    uri = s3.bucket(f"held-{int(time.time() * 1000)}") + "/runs"
    held = lease.take(storage(uri), "held")  # the first driver, as far as the bucket tells
    try:
        out = run_main("tune_main", "--storage-path", uri, "--name", "held", "--models", "MLP",
                       "--wandb", "off", cwd=tmp_path)
    finally:
        held.release()
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert out.stderr.startswith("error: run 'held' is running in another driver (host ")
    assert not s3.objects(uri.removeprefix("s3://").split("/")[0], "runs/held/")  # nothing of it


def test_the_wandb_model_artifacts_reference_the_storages_exports(where, chain):
    """With a bucket the artifact references the bucket's copy (W&B records its digest,
    uploads nothing again); file:// is a bucket too."""
    folders = chain["end"].cache.glob("runs/*/chain/wandb/offline-run-*")
    (summary,) = [r for r in map(read_run, folders) if r["group"] == "summary"]
    models = {a["name"]: a for a in summary["artifacts"] if a["type"] == "model"}
    assert set(models) == set(PAIRS)
    for artifact in models.values():
        assert {"best", "chain"} <= set(artifact["aliases"])
        for entry in artifact["manifest"]["contents"]:
            assert entry["ref"] == f"{where.uri}/chain/best_models/{entry['path']}" and entry["digest"]
            assert int(entry["size"]) == len(where.read(f"chain/best_models/{entry['path']}"))


def test_each_small_file_reaches_the_bucket_in_one_request(s3, chains):
    """Tune uploads every trial's small files again at each of its syncs, and a trial its
    checkpoints: each is one PUT (pyarrow's allow_delayed_open, which genre-ray gives Tune
    too), not a multipart upload of three requests."""
    requests = s3.log.read_text().splitlines()
    puts = [line for line in requests if '"PUT /runs-' in line and "/chain/" in line]
    assert len(puts) > 100, len(puts)  # the chain's files went up
    assert not [line for line in requests if re.search(r'"POST \S*\?uploads', line)]
