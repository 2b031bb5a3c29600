"""Peak memory of feature building and of a tune run, per process, sampled from /proc.

    python -m bench.memory [--data-dir D] [--models ...] [--features ...] [--num-samples 2]
                           [--max-epochs 1] [--cache DIR] [--skip-build]

For the goals' figures, run it on a GTZAN-size synthetic set (`python -m genre_ray.synthetic D
--tracks-per-genre 100`, then `--data-dir D`); without --data-dir it uses the embedded one.

Phases, each a child process the bench samples with one poller thread (`Sampler`):
- build: per feature, one child calls `build_features` on an empty cache (a temporary
  one, or --cache), sampled every 0.2 s; its output is the bytes of the files that
  appeared or changed under <cache>/features while it ran (if the cache keeps an
  intermediate entry, such as decoded segments, the first feature's build counts it).
- tune: tune_main.py on that cache (features cached) with 2 trial slots (each half the
  CPUs), W&B off, sampled every 0.5 s.
- allowance: for every trial the tune run recorded, its model and config trained for 2 s
  on one evaluation batch of random inputs, as the trainable trains (with the CPU copy of
  its best state that trainable.BestSaver keeps between checkpoints), in a fresh Ray
  worker; that worker's peak private memory less the random inputs is the trial's
  allowance (model, optimiser, batches, activations, the best state's copy, and the
  worker's own torch + Ray).
  Its driver also loads each feature set to size it (train + val + test arrays).

Measures: peak RSS is the kernel's VmHWM (exact up to the last sample; a build child
reads its own at its end); private (RssAnon) and shared (RssFile
+ RssShmem) are peaks of the samples, so a spike shorter than the interval can be missed.
Pages a process maps from the object store or from cache files are shared, not a copy.
Trial workers are the pids Tune records in each trial's result.json; with reuse_actors a
worker hosts several trials and is judged on the largest allowance and feature set among
them. Two workers differ by tens of MB of private memory with no data at all, so the
trial goal says little below a feature set of about 1 GB.
The object store is the bytes allocated in the plasma files this run's raylet maps
(/dev/shm, or a fallback file when that is full), read from their inodes through
/proc/<raylet>/map_files. Checked by experiment: a 100 MB ray.put grows them by 100 MB,
while raylet's RssShmem stays at 0 (the writer touches the pages, not raylet), and the
used bytes of /dev/shm also count any other Ray on the machine.
The machine is MemTotal - MemAvailable over its value when the child started: other
work on the machine counts too, and page cache (memory-mapped cache entries included)
is mostly "available", so beside it stands this run's own peak: the private memory of
all its processes plus the object store.

Goals: a trial worker's peak private memory minus its allowance <= 10% of its feature
set; the machine's peak <= 1.5 x the largest feature set + 3 GB; each build's peak RSS
<= 1.3 x its output. A bench reports: it exits 0 whatever the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from bench.harness import context
from genre_ray import config
from genre_ray.synthetic import embedded_dataset
from genre_ray.trials import TrialKeys

ROOT = Path(__file__).resolve().parents[1]
MB, GB = 1e6, 1e9
FIELDS = {"VmHWM": "rss", "RssAnon": "anon", "RssFile": "shared", "RssShmem": "shared"}


# ---- /proc ------------------------------------------------------------------------

def status(pid: int | str) -> dict[str, int]:
    """Peak RSS, private and shared bytes of `pid` now (/proc/<pid>/status)."""
    mem = {"rss": 0, "anon": 0, "shared": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            mem[FIELDS[key]] += int(value.split()[0]) * 1024
    return mem


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found = [root]
    for pid in found:
        found += children.get(pid, [])
    return found


def title(pid: int) -> str:
    """What a process is: Ray's title (`ray::ImplicitFunc`), else its script or program."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    if args[0].startswith("ray::"):
        return args[0].split()[0].split(".")[0]
    return Path(next((a for a in args[1:] if a.endswith(".py")), args[0])).name


def store_bytes(raylet: int) -> int:
    """Bytes allocated in the object store files (plasma*) that `raylet` maps."""
    ranges = {}
    for line in Path(f"/proc/{raylet}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and "plasma" in parts[5]:
            ranges[parts[4]] = parts[0]  # inode -> one mapped range of it
    return sum(os.stat(f"/proc/{raylet}/map_files/{r}").st_blocks * 512 for r in ranges.values())


def machine_used() -> int:
    """MemTotal - MemAvailable, bytes."""
    info = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


class Sampler(threading.Thread):
    """Polls a process tree every `interval` s from its creation until `stop`: peaks per
    process, of the object store, of the tree's private memory + store, and of the machine
    over its start."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict[str, int]] = {}
        self.titles: dict[int, str] = {}
        self.totals = {"store": 0, "run": 0, "machine": 0}
        self.machine0 = machine_used()
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while True:
            self.sample()
            if self.done.wait(self.interval):
                return

    def sample(self) -> None:
        anon = store = 0
        for pid in descendants(self.root):
            try:
                mem, name = status(pid), title(pid)
                store += store_bytes(pid) if name == "raylet" else 0
            except OSError:  # it exited between the listing and the read
                continue
            if not name:  # a zombie: exited, not yet reaped
                continue
            peak = self.peaks.setdefault(pid, dict.fromkeys(mem, 0))
            for key, value in mem.items():
                peak[key] = max(peak[key], value)
            if name != "ray::IDLE" or not self.titles.get(pid, "").startswith("ray::"):
                self.titles[pid] = name  # a worker keeps the name of what it last ran
            anon += mem["anon"]
        now = {"store": store, "run": anon + store, "machine": machine_used() - self.machine0}
        self.totals = {key: max(value, now[key]) for key, value in self.totals.items()}

    def stop(self) -> None:
        self.done.set()
        self.join()


def fail(what: str, rc: int, log: Path) -> NoReturn:
    """Exit with `what` failed and the last lines of its log (which lives in a temporary folder)."""
    tail = "\n".join(log.read_text().splitlines()[-20:])
    sys.exit(f"{what} failed (exit {rc}); the end of its log:\n{tail}")


def sampled(cmd: list[str], env: dict[str, str], interval: float, log: Path) -> tuple[Sampler, str, int]:
    """Run `cmd` (stderr to `log`) under a Sampler: (sampler, its stdout, exit code)."""
    with log.open("a") as err:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        sampler = Sampler(child.pid, interval)
        out, _ = child.communicate()
    sampler.stop()
    return sampler, out, child.returncode


# ---- what the children run --------------------------------------------------------

def build_child(data_dir: str, feature: str) -> None:
    """Build one feature set into $GENRE_RAY_CACHE; print this process's peak RSS last."""
    from genre_ray.features import build_features
    build_features(Path(data_dir), feature, config.load())
    print(status("self")["rss"])


def allowance_child(data_dir: str, configs: str) -> None:
    """Size each feature set, then run `one_batch` for each trial config in a fresh worker;
    print {"sizes": feature -> bytes, "tasks": [[worker pid, input bytes], ...]}."""
    import ray
    from genre_ray.features import build_features
    trials, sizes, shapes = json.loads(configs), {}, {}
    cfg = config.load()
    for feature in sorted({c["feature"] for c in trials}):
        fs = build_features(Path(data_dir), feature, cfg)
        sizes[feature] = sum(v.nbytes for s in fs.splits.values() for v in vars(s).values()
                             if hasattr(v, "nbytes"))
        shapes[feature] = [list(fs.input_shape), len(fs.classes)]
        del fs
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)
    task = ray.remote(max_calls=1)(one_batch)  # max_calls=1: a new process per task
    tasks = [ray.get(task.remote(c, *shapes[c["feature"]])) for c in trials]
    print(json.dumps({"sizes": sizes, "tasks": tasks}))


def one_batch(trial: dict[str, Any], shape: list[int], n_classes: int) -> tuple[int, int]:
    """Train the trial's model for 2 s on one evaluation batch of random inputs, as the
    trainable does: (this worker's pid, bytes of those inputs)."""
    import torch
    from genre_ray.transforms import batch_augmentation
    from genre_ray.models import build_model
    from genre_ray.trainable import on_cpu
    from genre_ray.training import Trainer
    keys, hyper = TrialKeys.split(trial)
    cfg = config.tuned(config.load(), hyper)
    n = cfg.training.eval_batch_size
    x, y = torch.randn(n, *shape), torch.randint(n_classes, (n,))
    model = build_model(keys.model, tuple(shape), n_classes, dataclasses.asdict(cfg.model))
    trainer = Trainer(model, (x, y), (x, y), cfg.training, n_classes=n_classes, epochs=1000,
                      transform=batch_augmentation(keys.feature, cfg.batch_augment.of(keys.feature)))
    end = time.monotonic() + 2
    while time.monotonic() < end:
        trainer.fit(trainer.epoch + 1)
        best = on_cpu(trainer.state_dict())  # the best state a trial holds between checkpoints
    del best
    return os.getpid(), x.nbytes + y.nbytes


# ---- phases -----------------------------------------------------------------------

def files(folder: Path) -> set[tuple[str, int]]:
    """(path, size) of every file under `folder`."""
    return {(str(p), p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def build(data_dir: Path, features: list[str], env: dict[str, str], log: Path) -> dict[str, tuple]:
    """feature -> (sampler of its build child, its peak RSS, bytes it wrote)."""
    folder, found = Path(env["GENRE_RAY_CACHE"]) / "features", {}
    code = "import sys; from bench.memory import build_child; build_child(*sys.argv[1:])"
    for feature in features:
        before = files(folder)
        sampler, out, rc = sampled([sys.executable, "-c", code, str(data_dir), feature], env, 0.2, log)
        if rc:
            fail(f"building {feature}", rc, log)
        found[feature] = (sampler, int(out.split()[-1]), sum(s for _, s in files(folder) - before))
    return found


def tune(args: argparse.Namespace, data_dir: Path, env: dict[str, str], tmp: Path) -> Sampler:
    """tune_main.py on 2 trial slots (each half the CPUs), sampled; its runs land in tmp/runs,
    its exports in tmp/out and its output in tmp/tune.log (tmp: --keep, if given)."""
    cmd = [sys.executable, str(ROOT / "tune_main.py"), "--data-dir", str(data_dir),
           "--models", *args.models, "--features", *args.features,
           "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
           "--wandb", "off", "--cpus-per-trial", str(max(1, (os.cpu_count() or 2) // 2)),
           "--storage-path", str(tmp / "runs"), "--output-dir", str(tmp / "out")]
    sampler, _, rc = sampled(cmd, env, 0.5, tmp / "tune.log")
    if rc:
        fail("tune_main.py", rc, tmp / "tune.log")
    return sampler


def workers(runs: Path) -> dict[int, set[str]]:
    """Trial worker pid -> configs (JSON) of the trials it ran, from Tune's result.json."""
    found: dict[int, set[str]] = {}
    for path in runs.glob("*/*/result.json"):
        for line in filter(None, path.read_text().splitlines()):
            result = json.loads(line)
            found.setdefault(result["pid"], set()).add(json.dumps(result["config"], sort_keys=True))
    return found


def allowances(data_dir: Path, configs: list[str], env: dict[str, str],
               log: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(config -> allowance bytes, feature -> feature set bytes)."""
    code = "import sys; from bench.memory import allowance_child; allowance_child(*sys.argv[1:])"
    payload = json.dumps([json.loads(c) for c in configs])
    sampler, out, rc = sampled([sys.executable, "-c", code, str(data_dir), payload], env, 0.2, log)
    if rc:
        fail("the allowance phase", rc, log)
    result = json.loads(out.splitlines()[-1])
    return ({c: sampler.peaks[pid]["anon"] - inputs for c, (pid, inputs) in zip(configs, result["tasks"])},
            result["sizes"])


# ---- report -----------------------------------------------------------------------

def row(name: str, mem: dict[str, int]) -> str:
    """One table line: peak RSS, private and shared MB ('-' where not measured)."""
    cells = (f"{mem[k] / MB:>9,.0f}" if k in mem else f"{'-':>9}" for k in ("rss", "anon", "shared"))
    return f"  {name:<64} {' '.join(cells)}"


def label(trial: str) -> str:
    """A trial config (JSON) in a few words: pair and hyperparameters."""
    keys, hyper = TrialKeys.split(json.loads(trial))
    return " ".join([keys.pair] + [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in sorted(hyper.items())])


def tune_rows(sampler: Sampler, trials: dict[int, set[str]]) -> list[str]:
    """Driver, each trial worker, every other kind of process (the largest of each)."""
    lines = [row(f"driver {sampler.titles[sampler.root]} ({sampler.root})", sampler.peaks[sampler.root])]
    for pid, configs in sorted(trials.items()):
        pairs = sorted(json.loads(c)["pair"] for c in configs)
        lines.append(row(f"trial worker {pid}: {' '.join(pairs)}", sampler.peaks.get(pid, {})))
    kinds: dict[str, list[int]] = {}
    for pid, name in sampler.titles.items():
        if pid != sampler.root and pid not in trials:
            kinds.setdefault(name, []).append(pid)
    for name, pids in sorted(kinds.items()):
        largest = {k: max(sampler.peaks[p][k] for p in pids) for k in ("rss", "anon", "shared")}
        lines.append(row(f"{name} (x{len(pids)}, largest)" if len(pids) > 1 else name, largest))
    return lines


def report(built: dict[str, tuple], sampler: Sampler, trials: dict[int, set[str]],
           allowance: dict[str, int], sizes: dict[str, int]) -> None:
    """The table of peaks, the allowances, the tune run's totals and the feature sets."""
    print(f"\n{'MB':<66} {'peak RSS':>9} {'private':>9} {'shared':>9}")
    for feature, (child, hwm, out) in built.items():
        print(row(f"build {feature} (wrote {out / MB:,.0f} MB)", {**child.peaks[child.root], "rss": hwm}))
    print("tune\n" + "\n".join(tune_rows(sampler, trials)))
    print("allowance (private memory of a worker training the trial's model on one batch)")
    for trial, value in allowance.items():
        print(row(label(trial), {"anon": value}))
    store, run, machine = (sampler.totals[k] / MB for k in ("store", "run", "machine"))
    print(f"tune peaks: object store {store:,.0f} MB (plasma files allocated), this run "
          f"{run:,.0f} MB (its processes' private memory + store), machine {machine:,.0f} MB "
          f"(MemTotal - MemAvailable over its start)")
    print("feature sets (train + val + test): "
          + ", ".join(f"{f} {b / MB:,.0f} MB" for f, b in sizes.items()))


def goals(built: dict[str, tuple], sampler: Sampler, trials: dict[int, set[str]],
          allowance: dict[str, int], sizes: dict[str, int]) -> None:
    """The three goals (docs/benchmarks.md), each with its ratio and PASS or FAIL."""
    print("\ngoals")
    for pid, configs in sorted(trials.items()):
        excess = sampler.peaks.get(pid, {"anon": 0})["anon"] - max(allowance[c] for c in configs)
        size = max(sizes[json.loads(c)["feature"]] for c in configs)
        print(f"  trial worker {pid}: private {excess / MB:,.0f} MB beyond model and batch "
              f"/ feature set {size / MB:,.0f} MB = {verdict(excess / size, 0.10)}")
    largest, machine = max(sizes.values()), sampler.totals["machine"]
    print(f"  machine peak {machine / MB:,.0f} MB / (1.5 x {largest / MB:,.0f} MB + 3 GB) "
          f"= {verdict(machine / (1.5 * largest + 3 * GB), 1)}")
    for feature, (_, hwm, out) in built.items():
        print(f"  build {feature}: peak RSS {hwm / MB:,.0f} MB / output {out / MB:,.0f} MB "
              f"= {verdict(hwm / out, 1.3)}")


def verdict(ratio: float, goal: float) -> str:
    """`ratio` beside its goal, PASS or FAIL."""
    return f"{ratio:.2f} (goal <= {goal:g}) {'PASS' if ratio <= goal else 'FAIL'}"


def main() -> None:
    run = config.load().run
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--models", nargs="+", default=run.models)
    parser.add_argument("--features", nargs="+", default=run.features)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="feature cache to fill (default: a temporary one)")
    parser.add_argument("--skip-build", action="store_true", help="reuse the features in --cache")
    parser.add_argument("--keep", type=Path, help="keep the tune run's folder, exports and log here")
    args = parser.parse_args()
    if args.skip_build and not args.cache:
        parser.error("--skip-build reuses a --cache an earlier run filled; pass --cache DIR")
    if args.cache and not args.skip_build and files(args.cache / "features"):
        parser.error(f"{args.cache}/features is not empty; pass --skip-build to reuse it, "
                     f"or an empty --cache")
    data_dir = (args.data_dir or embedded_dataset()).resolve()
    print(context())
    print(f"data {data_dir}; models {' '.join(args.models)}; features {' '.join(args.features)}; "
          f"{args.num_samples} trials per pair, {args.max_epochs} epochs")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cache = (args.cache or tmp / "cache").resolve()
        env = {**os.environ, "GENRE_RAY_CACHE": str(cache),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        built = {} if args.skip_build else build(data_dir, args.features, env, tmp / "build.log")
        kept = args.keep.resolve() if args.keep else tmp
        kept.mkdir(parents=True, exist_ok=True)
        sampler = tune(args, data_dir, env, kept)
        trials = workers(kept / "runs")
        allowance, sizes = allowances(data_dir, sorted(set().union(*trials.values())), env,
                                      tmp / "allowance.log")
    report(built, sampler, trials, allowance, sizes)
    goals(built, sampler, trials, allowance, sizes)


if __name__ == "__main__":
    main()
