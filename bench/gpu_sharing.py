"""GPU sharing and bf16: training throughput of one trial per GPU vs four at 0.25 GPU each.

    python -m bench.gpu_sharing [--epochs 4] [--repeats 2]
    python -m bench.gpu_sharing --smoke    # fp32 only, 2 epochs, 1 run: checks the bench

CEL on spectrograms of the embedded dataset trains for `--epochs` epochs as real trials
of the Tuner (`tuning.fit`: features from the object store, a report every epoch,
checkpoints at ASHA's rungs and the last epoch; W&B off), every trial with the same configuration (the
search space's first point), in two layouts and two precisions (`training.PRECISIONS`):
(a) one trial with a whole GPU, (b) four trials with 0.25 GPU each, sharing it. Each
layout gets all the machine's CPUs, split evenly among its trials. Without a GPU the
CPU analogue runs instead: one trial with every CPU vs min(4, CPUs) trials sharing them.

On a node with several GPUs the layouts run on a Ray that sees only the first of them
(`one_gpu`: CUDA_VISIBLE_DEVICES names that GPU for the Ray this script starts, which
then has 1 GPU): otherwise Ray could spread the four 0.25-GPU trials over four GPUs,
and (b) would measure four GPUs, not four trials sharing one. It prints whether NVIDIA
MPS is on (`mps_status`): without MPS the four trials' processes time-slice the GPU;
with it their kernels can run side by side.

Throughput = per-trial segments/s summed over a layout's trials (they all run side by
side: the layout's resources fit exactly its trials): a trial's training segments over
its median epoch time (Tune's `time_this_iter_s`: training, evaluation, report,
checkpoint; the first epoch, with setup and warm-up, dropped). Each figure is the best
of `--repeats` runs, the runs going through the four cases forwards, then backwards, so
drift in machine load falls on every case. Ratios are against layout (a) in fp32,
measured in the same run.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch
from optuna.distributions import CategoricalDistribution

from bench import harness
from genre_ray import config
from genre_ray.features import FeatureSet, build_features
from genre_ray.search_space import SearchSpace, load_space
from genre_ray.training import PRECISIONS
from genre_ray.trainable import share

MODEL, FEATURE = "CEL", "spectrogram"
SHARED = 4  # trials on one GPU at 0.25 GPU each, as the issue asks


@dataclasses.dataclass(frozen=True)
class Layout:
    """`trials` side by side, each with `cpus` CPUs and `gpus` GPUs."""

    trials: int
    cpus: float
    gpus: float

    def __str__(self) -> str:
        unit, share = ("GPU", self.gpus) if self.gpus else ("CPU", self.cpus)
        return f"{self.trials} trial{'s' * (self.trials > 1)} x {share:g} {unit}"


def layouts(cpus: int, gpu: bool) -> list[Layout]:
    """(a) one trial with all of the machine, (b) trials sharing it evenly."""
    shared = SHARED if gpu else min(SHARED, cpus)
    return [Layout(1, cpus, 1.0 if gpu else 0),
            Layout(shared, cpus / shared, 1 / shared if gpu else 0)]


def one_point_space(precision: str) -> SearchSpace:
    """MODEL's first point on FEATURE, plus `precision`, as a space of single choices:
    every trial trains the same configuration (on the first point's front end, `fs`)."""
    space = load_space(MODEL).of(FEATURE)
    point = {**space.first_point, "precision": precision}
    return dataclasses.replace(space, first_point=point, distributions={
        key: CategoricalDistribution([value]) for key, value in point.items()})


def throughput(fs: FeatureSet, refs: dict, layout: Layout, precision: str, epochs: int,
               folder: Path) -> float:
    """Segments/s of `layout` in `precision`, as the module docstring defines it."""
    cfg = config.load(values={
        "search.num_samples": layout.trials, "search.max_epochs": epochs,
        "search.grace_period": epochs, "search.reduction_factor": 2,
        "search.n_startup_trials": 1, "run.seed": 0})
    grid = harness.tune([(MODEL, FEATURE)], refs, cfg, folder, f"{layout.trials}-{precision}",
                        layout.trials, spaces={MODEL: one_point_space(precision)},
                        cpus_per_trial=layout.cpus, gpus_per_trial=layout.gpus)
    if grid.errors:
        raise RuntimeError(f"{layout}, {precision}: {grid.errors[0]}")
    segments = len(fs.splits["train"].x)
    return sum(segments / statistics.median(r.metrics_dataframe["time_this_iter_s"].iloc[1:])
               for r in grid)


def one_gpu() -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES naming only the first GPU this process sees: a Ray started
    under it has one GPU, so every trial of a layout lands on that GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": "0" if visible is None else visible.split(",")[0]}


def mps_status() -> str:
    """Whether NVIDIA MPS serves this machine's CUDA processes: on, off or unknown, and
    why. Its control daemon makes a `control` pipe in CUDA_MPS_PIPE_DIRECTORY (default
    /tmp/nvidia-mps), the one way CUDA clients reach it."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps")
    try:
        found = (pipe / "control").exists()
    except OSError as err:
        return f"unknown ({pipe}: {err.strerror})"
    return (f"on (control pipe in {pipe})" if found else
            f"off (no control pipe in {pipe}): trials sharing a GPU time-slice it")


def measure(fs: FeatureSet, plan: list[Layout], precisions: list[str], epochs: int,
            repeats: int) -> dict[tuple[Layout, str], float]:
    """Segments/s of every (layout, precision) of `plan` x `precisions`, the best of
    `repeats` runs, on a local Ray holding `plan`'s first layout: every CPU and, with a
    GPU, `one_gpu`'s."""
    cases = [(layout, precision) for precision in precisions for layout in plan]
    rate = dict.fromkeys(cases, 0.0)
    gpu_env = one_gpu() if plan[0].gpus else {}  # what Ray's processes inherit
    with mock.patch.dict(os.environ, gpu_env), tempfile.TemporaryDirectory() as tmp, \
            harness.local_ray(num_cpus=int(plan[0].cpus), num_gpus=int(plan[0].gpus)):
        refs = {fs.variant: share(fs)}
        for i in range(repeats):
            for case in cases[::-1] if i % 2 else cases:
                rate[case] = max(rate[case], throughput(fs, refs, *case, epochs,
                                                        Path(tmp) / f"run{i}"))
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=4, help="per trial; at least 2")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case; the best counts")
    args = parser.parse_args(argv)
    precisions = list(PRECISIONS)
    if args.smoke:
        args.epochs, args.repeats, precisions = 2, 1, precisions[:1]
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is dropped)")
    gpu, cpus = torch.cuda.is_available(), os.cpu_count() or 1
    fs = build_features(harness.dataset(args.smoke), FEATURE, config.load())
    print(harness.context())
    print(f"NVIDIA MPS: {mps_status()}" if gpu else "no GPU found: running on the CPU")
    plan = layouts(cpus, gpu)
    rate = measure(fs, plan, precisions, args.epochs, args.repeats)
    print(f"{MODEL} on {FEATURE}, {args.epochs} epochs per trial, best of {args.repeats} runs; "
          f"seg/s summed over a layout's trials")
    print_table(rate, *plan)


def print_table(rate: dict[tuple[Layout, str], float], one: Layout, shared: Layout) -> None:
    """Each figure against (one, fp32), then sharing's ratios, and bf16's where measured."""
    fp32, bf16 = PRECISIONS
    measured = [p for p in PRECISIONS if (one, p) in rate]
    print(f"{'layout':<20}{'precision':<11}{'seg/s':>8}{f'vs {one}, {fp32}':>26}")
    for (layout, precision), value in rate.items():
        print(f"{str(layout):<20}{precision:<11}{value:>8.0f}{value / rate[one, fp32]:>26.2f}")
    print(f"sharing ({shared} / {one}): "
          + ", ".join(f"{p} {rate[shared, p] / rate[one, p]:.2f}" for p in measured))
    if bf16 in measured:
        print(f"{bf16} / {fp32}: "
              + ", ".join(f"{layout} {rate[layout, bf16] / rate[layout, fp32]:.2f}"
                          for layout in (one, shared)))
    print(harness.ratio(rate[shared, fp32] / rate[one, fp32], f"{shared} over {one}, {fp32} seg/s"))


if __name__ == "__main__":
    main()
