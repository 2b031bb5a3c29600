"""What keeping a run in its storage costs, and what a lost head costs, in one bench run.

    python -m bench.storage [--repeats 1]  # the default run; ~25 min at 1 repeat on 2 cores
    python -m bench.storage --smoke        # one pair on a tiny synthetic set: checks the bench

1. Wall time of the default run (W&B off) with --storage-path a local path, a file://
   URI and s3:// on a local S3 server (moto's server mode, bench/s3.py, through pyarrow's
   S3 filesystem as on AWS), one after the other on one warmed cache, each --repeats
   times (in turn, forwards then backwards; the best counts). Ratios over the local
   path; goals: file:// <= 1.03, s3:// <= 1.10.
2. A lost head: the default run on s3:// SIGKILLed (driver and its local Ray) once half
   its trials ended, then the same command from a new cache and folder. Epochs trained
   again: each continued trial's epochs reported a second time (Tune's progress.csv),
   plus the epochs of trials the continuation could not know (the Optuna trials it told
   FAIL), over the run's epochs. Goal <= 0.1.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pyarrow.fs as pafs
from optuna.trial import TrialState

from bench import harness
from bench.s3 import s3_server
from genre_ray.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--models", "MLP", "--features", "spectrogram", "--num-samples", "4", "--max-epochs", "4"]


def tune_main(work: Path, cache: Path, env: dict[str, str], storage: str, flags: list[str],
              kill_when=None) -> tuple[float, int]:
    """tune_main.py from the new folder `work` with `storage`: (wall seconds, exit code);
    SIGKILLed (its process group: the driver and the Ray it started) once `kill_when()`."""
    work.mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "tune_main.py"), "--wandb", "off", "--name", "bench",
           "--storage-path", storage, "--output-dir", str(work / "best_models"), *flags]
    start = time.perf_counter()
    with open(work / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "GENRE_RAY_CACHE": str(cache)}, start_new_session=True)
        while kill_when is not None and proc.poll() is None and not kill_when():
            time.sleep(1)
        if kill_when is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    if code not in (0, -signal.SIGKILL):
        sys.exit(f"tune_main.py exited {code}: see {work / 'log'}\n{(work / 'log').read_text()[-3000:]}")
    return time.perf_counter() - start, code


class Bucket:
    """The run `bench` in an S3 bucket, read as the bench's own client (pyarrow)."""

    def __init__(self, s3, name: str) -> None:
        key, secret = s3.keys["writer"]
        self.fs = pafs.S3FileSystem(access_key=key, secret_key=secret, region="us-east-1",
                                    endpoint_override=s3.endpoint.removeprefix("http://"),
                                    scheme="http")
        self.root = f"{name}/runs/bench"

    def read(self, relative: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{relative}") as f:
            return f.read()

    def trials(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [i.base_name for i in infos if i.type == pafs.FileType.Directory
                and "_" in i.base_name and not i.base_name.startswith(".")]

    def ended(self) -> int:
        return sum(b'"done": true' in self._maybe(f"{t}/result.json") for t in self.trials())

    def _maybe(self, relative: str) -> bytes:
        try:
            return self.read(relative)
        except OSError:
            return b""


def epochs(bucket: Bucket) -> tuple[int, int]:
    """(epochs the run keeps, epochs trained again) after a continued run."""
    kept = again = 0
    for trial in bucket.trials():
        rows = list(csv.DictReader(io.StringIO(bucket._maybe(f"{trial}/progress.csv").decode())))
        steps = [int(r["training_iteration"]) for r in rows]
        kept, again = kept + len(set(steps)), again + len(steps) - len(set(steps))
    with tempfile.NamedTemporaryFile(suffix=".journal") as journal:
        journal.write(bucket.read("optuna.journal"))
        journal.flush()
        studies = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal.name))
        for summary in optuna.get_all_study_summaries(studies):
            for t in optuna.load_study(study_name=summary.study_name, storage=studies).trials:
                if t.state == TrialState.FAIL:  # asked for after the last saved state: lost
                    again += len(t.intermediate_values)
    return kept, again


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each storage, in turn, forwards then backwards; "
                             "the best counts")
    args = parser.parse_args(argv)
    print(harness.context())
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp, \
            s3_server(Path(tmp) / "s3") as s3:
        tmp, env, cache = Path(tmp), s3.env(), Path(tmp) / "cache"
        flags = []
        if args.smoke:
            flags = ["--data-dir", str(generate(tmp / "data", 3, seed=0, seconds=10.0)), *SMOKE]
        tune_main(tmp / "warm-up", cache, env, str(tmp / "warm-runs"),
                  [*flags, "--num-samples", "1", "--max-epochs", "1"])
        walls = timed(tmp, cache, env, s3, flags, args.repeats)
        for kind, wall in walls.items():
            print(f"default run, storage {kind:<8} {wall:7.0f} s (best of {args.repeats})")

        uri, bucket = s3.bucket("killed") + "/runs", Bucket(s3, "killed")
        half = (4 if args.smoke else 30) // 2  # trials of the run
        tune_main(tmp / "lost-head", tmp / "cache-lost", env, uri, flags,
                  kill_when=lambda: bucket.ended() >= half)
        time.sleep(max(0.0, json.loads(bucket.read(".lease"))["expires"] - time.time()))
        tune_main(tmp / "new-head", tmp / "cache-new", env, uri, flags)
        kept, again = epochs(bucket)
    print(f"SIGKILLed driver: {again} epoch(s) trained again over the run's {kept}")
    print(harness.ratio(walls["file://"] / walls["path"], "wall time, file:// over a path", 1.03))
    print(harness.ratio(walls["s3://"] / walls["path"], "wall time, s3:// over a path", 1.10))
    print(harness.ratio(again / kept, "epochs trained again after a lost head, over the run's", 0.1))


def timed(tmp: Path, cache: Path, env: dict[str, str], s3, flags: list[str],
          repeats: int) -> dict[str, float]:
    """Storage kind -> the best wall time of `repeats` runs of the command on it, the kinds
    taken in turn, forwards then backwards, so that drift in machine load falls on each."""
    stores = {"path": str(tmp / "runs"), "file://": (tmp / "file-runs").as_uri(),
              "s3://": s3.bucket("timed") + "/runs"}
    best = dict.fromkeys(stores, float("inf"))
    for i in range(repeats):
        for kind in list(stores)[::-1] if i % 2 else list(stores):
            uri = f"{stores[kind]}-{i}"
            wall, _ = tune_main(tmp / f"timed-{kind.strip(':/')}-{i}", cache, env, uri, flags)
            best[kind] = min(best[kind], wall)
    return best


if __name__ == "__main__":
    main()
