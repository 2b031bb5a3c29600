"""GPU check: what only a GPU can show, in one short script (a few minutes on one GPU).

    python -m bench.gpu_check [--dry] [--data-dir D] [--epochs 4] [--repeats 1]

Each step prints one line per check, `PASS|FAIL|SKIP <check>: <why or figure>`; the exit
status is 1 if any check failed. With --dry, or without CUDA, the steps whose figures
mean something on a CPU (1 and 2) run there, and each SKIP line says what needed CUDA.

1. cluster tune: a Ray head started as a process of its own (`ray start --head`, its GPU
   `gpu_sharing.one_gpu`'s), then `tune_main.py --address` to it with two CEL trials at
   --gpus-per-trial 0.5, the driver seeing no GPU (CUDA_VISIBLE_DEVICES=""; a Ray the
   driver started itself would see none either, hence the head of its own). It must exit
   0; the export must load with a plain `torch.load(weights_only=True)` in a process
   that sees no GPU, every tensor on the CPU; the trials' checkpoints must show CUDA
   random draws (their dropout ran on the GPU they were given).
2. resume: `Trainer` 4 epochs straight vs 2, a checkpoint file written and read as a
   trial does, then 2 more, on CUDA: the same metrics and weights, bit for bit (CEL has
   dropout and batch augmentation, so the CUDA RNG must come back too). cuDNN runs
   deterministic here; if two straight runs still differ, the resumed run may differ by
   as much (10x), no more.
3. throughput: `bench.gpu_sharing`'s table, segments/s of 1 trial x 1 GPU vs 4 x 0.25
   GPU, fp32 vs bf16, on one GPU, and whether NVIDIA MPS is on.
4. per-batch sync: `train_epoch`'s segments/s with `training.batches` (the epoch's order
   moved to the GPU once) vs the loop before that fix (`per_batch_copies`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from ray import tune

from bench import gpu_sharing
from bench.harness import context
from genre_ray import config, training
from genre_ray.export import export_name
from genre_ray.features import FeatureSet, build_features
from genre_ray.models import build_model
from genre_ray.search_space import first_point
from genre_ray.synthetic import embedded_dataset
from genre_ray.trainable import STATE_FILE, load_trial_state, on_cpu
from genre_ray.transforms import batch_augmentation
from bench.cluster import free_port, kill_node, start_node, wait_for_nodes

REPO = Path(__file__).resolve().parents[1]
MODEL, FEATURE = gpu_sharing.MODEL, gpu_sharing.FEATURE  # CEL: dropout
EPOCHS = 4  # of the resume check, interrupted after half
TIMED_EPOCHS = 5  # of each loop in the per-batch sync check
CURRENT_BATCHES = training.batches
# A file's tensor devices, loaded as a machine without a GPU loads it: no map_location.
LOAD = ("import sys, torch\n"
        "from bench.gpu_check import tensor_devices\n"
        "print(*sorted(tensor_devices(torch.load(sys.argv[1], weights_only=True))))\n")

Line = tuple[str, str, str]  # (PASS | FAIL | SKIP, check, why or figure)
Run = tuple[list[dict[str, float]], dict[str, torch.Tensor]]  # a fit's metrics, final weights


@dataclass(frozen=True)
class Setup:
    """What every step gets: the data, whether to use CUDA, a scratch folder, bench sizes."""

    data_dir: Path
    fs: FeatureSet
    cuda: bool
    work: Path
    epochs: int
    repeats: int


def tensor_devices(obj: Any) -> set[str]:
    """The device types of every tensor in `obj`, a loaded file of nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        obj = list(obj.values())
    return set().union(*map(tensor_devices, obj)) if isinstance(obj, (list, tuple)) else set()


@contextlib.contextmanager
def ray_head(folder: Path, cpus: int, gpus: int) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head of its own (bench/cluster.py's way) with `gpus` (0 or 1) GPUs: yields its
    address and the environment a process joining it needs."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", **(gpu_sharing.one_gpu() if gpus else {})}
    address = f"127.0.0.1:{free_port()}"
    head = start_node(["--head", "--port", address.split(":")[1], "--num-cpus", str(cpus),
                   "--num-gpus", str(gpus), "--include-dashboard", "false",
                   "--temp-dir", str(folder)], env, folder / "head.log")
    try:
        wait_for_nodes(address, 1, env)
        yield address, env
    finally:
        kill_node(head)


def run_tune(s: Setup) -> subprocess.CompletedProcess:
    """tune_main.py with two trials, joining a new Ray head, its driver seeing no GPU."""
    with ray_head(s.work / "ray", os.cpu_count() or 1, int(s.cuda)) as (address, env):
        return subprocess.run(
            [sys.executable, str(REPO / "tune_main.py"), "--address", address,
             "--data-dir", str(s.data_dir), "--models", MODEL, "--features", FEATURE,
             "--num-samples", "2", "--max-epochs", "2", "--cpus-per-trial", "1",
             "--gpus-per-trial", "0.5" if s.cuda else "0", "--wandb", "off",
             "--storage-path", str(s.work / "runs"), "--name", "check",
             "--output-dir", str(s.work / "best")],
            cwd=s.work, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
            timeout=600)


def cluster_tune(s: Setup) -> list[Line]:
    """Step 1: the tune, its export loaded without a GPU, the device its trials used."""
    out = run_tune(s)
    if out.returncode:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        return [("FAIL", "cluster tune", f"tune_main.py exited {out.returncode} (its output's "
                                         "end is on stderr above)")]
    share = "0.5 GPU" if s.cuda else "0 GPU (dry)"
    return [("PASS", "cluster tune", f"tune_main.py --address to its own Ray head, 2 trials x "
                                     f"{share}, driver with CUDA_VISIBLE_DEVICES='': exit 0"),
            exports_on_cpu([s.work / "best" / export_name(MODEL, FEATURE)]),
            trials_device(s.work / "runs" / "check", s.cuda)]


def exports_on_cpu(paths: list[Path]) -> Line:
    """Whether every export loads with a plain torch.load(weights_only=True), no
    map_location, in a process that sees no GPU, holding CPU tensors only."""
    check = "exports load without a GPU"
    for path in paths:
        if not path.is_file():
            return "FAIL", check, f"{path} was not written"
        out = subprocess.run([sys.executable, "-c", LOAD, str(path)], cwd=REPO, text=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                             capture_output=True, timeout=300)
        if out.returncode:
            why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
            return "FAIL", check, f"{path.name}: {why}"
        if out.stdout.split() != ["cpu"]:
            return "FAIL", check, f"{path.name}: tensors on {out.stdout.strip() or 'nothing'}"
    return ("PASS", check, f"{', '.join(p.name for p in paths)}: torch.load(weights_only=True) "
                           "with CUDA_VISIBLE_DEVICES='', every tensor on the CPU")


def trials_device(run_dir: Path, cuda: bool) -> Line:
    """Whether the trials trained on the GPU, as each trial's newest checkpoint records it
    (trainable.BestSaver saves the device beside the state's CPU tensors)."""
    devices = [torch.load(f, weights_only=True)["device"] for f in sorted(run_dir.rglob(STATE_FILE))]
    seen = f"{len(devices)} trials' checkpoints, trained on: {', '.join(devices) or '-'}"
    if not cuda:
        return "SKIP", "trials on the GPU", f"needs CUDA; dry, at 0 GPU: {seen}"
    return ("PASS" if len(devices) == 2 and all(d.startswith("cuda") for d in devices) else "FAIL",
            "trials on the GPU", seen)


def trainer(fs: FeatureSet, device: torch.device, seed: int) -> training.Trainer:
    """MODEL's first point on `fs`, seeded as a trial seeds it."""
    training.seed_everything(seed)
    cfg = config.tuned(config.load(), first_point(MODEL))
    model = build_model(MODEL, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    train, val = ((fs.splits[name].x, fs.splits[name].labels) for name in ("train", "val"))
    return training.Trainer(model, train, val, cfg.training, n_classes=len(fs.classes),
                            epochs=EPOCHS, seed=seed, device=device,
                            transform=batch_augmentation(fs.feature, cfg.batch_augment.of(fs.feature)))


def deviation(a: Run, b: Run) -> float:
    """The largest difference between two runs' metrics and final weights (0.0: bit for bit)."""
    (history_a, weights_a), (history_b, weights_b) = a, b
    metrics = [abs(x[k] - y[k]) for x, y in zip(history_a, history_b, strict=True) for k in x]
    weights = [(weights_a[k].double() - weights_b[k].double()).abs().max().item()
               for k in weights_a]
    return max(metrics + weights)


def resumed_run(fs: FeatureSet, device: torch.device, folder: Path) -> Run:
    """EPOCHS // 2 epochs, a checkpoint file saved and read as a trial does (onto the CPU),
    the rest in a trainer built with another seed: everything must come from the file."""
    first = trainer(fs, device, seed=3)
    first.fit(EPOCHS // 2)
    folder.mkdir()
    torch.save({"trainer": on_cpu(first.state_dict())}, folder / STATE_FILE)
    resumed = trainer(fs, device, seed=99)
    resumed.load_state_dict(load_trial_state(tune.Checkpoint.from_directory(folder))["trainer"])
    return resumed.fit(EPOCHS), resumed.model.state_dict()


def resume_on(fs: FeatureSet, device: torch.device, work: Path) -> Line:
    """Whether a resumed run continues exactly as the run straight through."""
    check = f"resume on {device.type}"
    runs = []
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for _ in range(2):
            straight = trainer(fs, device, seed=3)
            runs.append((straight.fit(EPOCHS), straight.model.state_dict()))
        resumed = resumed_run(fs, device, work / f"resume-{device.type}")
    (history, weights), rerun = runs[0], deviation(*runs)
    off = deviation((history[EPOCHS // 2:], weights), resumed)
    what = f"{EPOCHS} epochs straight vs {EPOCHS // 2}, checkpoint file, {EPOCHS // 2} more"
    if off == 0.0:
        return "PASS", check, f"{what}: metrics and weights identical bit for bit"
    verdict = "PASS" if off <= 10 * rerun else "FAIL"
    return verdict, check, (f"{what}: differ by {off:.1e} (two straight runs differ by "
                            f"{rerun:.1e}: nondeterministic kernels)")


def resume(s: Setup) -> list[Line]:
    """Step 2: resume exactness on CUDA, or on the CPU when dry."""
    if s.cuda:
        return [resume_on(s.fs, torch.device("cuda"), s.work)]
    return [resume_on(s.fs, torch.device("cpu"), s.work),
            ("SKIP", "resume on cuda", "needs CUDA: the CUDA RNG's save and restore")]


def throughput(s: Setup) -> list[Line]:
    """Step 3: bench.gpu_sharing's table, on the GPU only (`python -m bench.gpu_sharing`
    measures its CPU analogue)."""
    if not s.cuda:
        return [("SKIP", "throughput on the GPU", "needs CUDA (1 trial x 1 GPU vs 4 x 0.25 GPU, "
                                                  "fp32 vs bf16); `python -m bench.gpu_sharing` "
                                                  "measures the CPU analogue")]
    plan = gpu_sharing.layouts(os.cpu_count() or 1, s.cuda)
    gpu_sharing.print_table(gpu_sharing.measure(s.fs, plan, s.epochs, s.repeats), *plan)
    sizes = f"{MODEL} on {FEATURE}, {s.epochs} epochs per trial, best of {s.repeats}"
    return [("PASS", "throughput on the GPU", f"table above ({sizes}); NVIDIA MPS "
                                              f"{gpu_sharing.mps_status()}")]


def per_batch_copies(n: int, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """BASELINE, not the project's loop: `training.batches` before the per-batch sync fix.
    The order is split on the CPU and each batch's indices are copied to `device` as the
    batch is used: on CUDA a copy from pageable memory, which synchronises the stream."""
    for idx in CURRENT_BATCHES(n, batch_size, generator):
        yield idx.to(device)


def epoch_seconds(t: training.Trainer, batching: Callable[..., Iterator[torch.Tensor]]) -> float:
    """Seconds of one training epoch of `t`, its batches drawn by `batching`."""
    with mock.patch.object(training, "batches", batching):
        start = time.perf_counter()
        training.train_epoch(t.model, t.optimizer, *t.train_xy, t.batch_size, t.generator,
                             t.transform, t.precision)  # ends with .item(): a device sync
        return time.perf_counter() - start


def sync_fix(s: Setup) -> list[Line]:
    """Step 4: training segments/s, current batching vs the baseline (epochs alternating,
    the median of TIMED_EPOCHS each after a warm-up epoch of each). Not measured on the
    CPU, where neither loop copies anything, so that the ratio would mean nothing."""
    if not s.cuda:
        return [("SKIP", "per-batch sync", "needs CUDA (on the CPU neither loop copies a batch)")]
    t = trainer(s.fs, torch.device("cuda"), seed=0)
    times = {CURRENT_BATCHES: [], per_batch_copies: []}
    for _ in range(TIMED_EPOCHS + 1):
        for batching, seconds in times.items():
            seconds.append(epoch_seconds(t, batching))
    fixed, before = (len(t.train_xy[0]) / statistics.median(v[1:]) for v in times.values())
    figures = (f"{fixed:.0f} seg/s with training.batches vs {before:.0f} with per-batch "
               f"copies (the loop before the fix): x{fixed / before:.2f}")
    return [("PASS", "per-batch sync", figures)]


STEPS = (cluster_tune, resume, throughput, sync_fix)


def run_step(step: Callable[[Setup], list[Line]], s: Setup) -> list[Line]:
    """`step`'s lines, printed; an error is a FAIL line, its traceback on stderr."""
    try:
        lines = step(s)
    except Exception as err:
        traceback.print_exc()
        lines = [("FAIL", step.__name__.replace("_", " "), f"{type(err).__name__}: {err}")]
    for status, check, detail in lines:
        print(f"{status} {check}: {detail}", flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run every step; 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="run on the CPU even with CUDA")
    parser.add_argument("--data-dir", type=Path, help="GTZAN folder (absent: the embedded dataset)")
    parser.add_argument("--epochs", type=int, default=4, help="per throughput trial; at least 2")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each throughput case")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is dropped)")
    print(context(), flush=True)
    cuda = torch.cuda.is_available() and not args.dry
    if not torch.cuda.is_available() and not args.dry:
        print("no GPU found: running dry, on the CPU", flush=True)
    data_dir = args.data_dir or embedded_dataset()
    with tempfile.TemporaryDirectory() as work:
        s = Setup(data_dir, build_features(data_dir, FEATURE, config.load()), cuda, Path(work),
                  args.epochs, args.repeats)
        lines = [line for step in STEPS for line in run_step(step, s)]
    return int(any(status == "FAIL" for status, _, _ in lines))


if __name__ == "__main__":
    sys.exit(main())
