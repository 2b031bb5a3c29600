"""Tuning that pays: does the search find CNNs that clearly beat a linear
baseline, and configurations that beat the first point, at a fixed budget?

    python -m bench.quality [--sets realistic embedded] [--seeds 0 1 2]
                            [--num-samples 3] [--max-epochs 8] [--grace-period 2]
                            [--models CEL CEL2 CEL3]

For each set and seed, `tune_main.py` tunes the CEL family on spectrograms (the budget:
`--num-samples` trials of up to `--max-epochs` epochs per pair, ASHA stopping the
laggards; the trial-epochs actually trained are printed), with the seed as the run's
seed (its split too, on a random split). Then on the same split and training segments:
the baseline, a logistic regression on each segment's log-mel mean and standard
deviation (bench.baseline). Printed: per pair, the first point's best validation loss
beside the winner's and which won; per set, the best pair's test error (the pair with the
lowest validation loss, as a user would pick it) over the baseline's, per segment (goal
<= 0.5) and per track (goal <= 1); and in how many pairs a searched configuration beat the
first point (goal: 2 of 3, in each seed).

Sets: `realistic` is bench/realistic.py's (20 tracks per genre of 30 s, its own 60/20/20
split; generated once into the cache), `embedded` the default run's dataset.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import realistic
from bench.baseline import logistic_baseline
from bench.harness import context
from genre_ray import config
from genre_ray.features import build_features
from genre_ray.synthetic import embedded_dataset

REPO = Path(__file__).resolve().parents[1]
REALISTIC = {"tracks_per_genre": 20, "seconds": 30.0, "seed": 0}


def dataset(name: str) -> tuple[Path, str]:
    """(data folder, --split value) of a set; the realistic one is generated once, cached."""
    if name == "embedded":
        return embedded_dataset(), "random"
    folder = config.cache_dir() / "realistic" / "v1-{tracks_per_genre}x{seconds:g}s-seed{seed}".format(**REALISTIC)
    if not folder.is_dir():
        realistic.generate(folder, **REALISTIC)
    return folder, str(folder / "split.json")


def tune(data: Path, split: str, seed: int, args: argparse.Namespace, work: Path) -> Path:
    """One tune_main.py run; its run folder."""
    cmd = [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(data), "--split", split,
           "--seed", str(seed), "--models", *args.models, "--features", "spectrogram",
           "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
           "--grace-period", str(args.grace_period),
           "--storage-path", str(work / "runs"), "--name", f"s{seed}",
           "--output-dir", str(work / f"best{seed}"), "--wandb", "off"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"tune_main.py exited {out.returncode}:\n{out.stderr[-3000:]}")
    return work / "runs" / f"s{seed}"


def trial_epochs(run: Path) -> int:
    """Epochs trained over every trial of a run (each trial's result.json: a line per epoch)."""
    return sum(len(p.read_text().splitlines()) for p in run.glob("*/result.json"))


def one_seed(name: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    data, split = dataset(name)
    run = tune(data, split, seed, args, work)
    with open(run / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cfg = config.load(values={"split.kind": split, "run.seed": seed})
    base = logistic_baseline(build_features(data, "spectrogram", cfg))
    return {"rows": rows, "baseline": base, "epochs": trial_epochs(run)}


def report(name: str, seed: int, found: dict) -> dict[str, float]:
    """Print one seed's table; returns its figures."""
    rows, base = found["rows"], found["baseline"]
    print(f"\n{name}, seed {seed}: {found['epochs']} trial-epochs trained")
    print(f"{'pair':<18}{'seed val_loss':>14}{'best val_loss':>14}{'winner':>12}{'test':>7}{'track':>7}")
    for r in rows:
        print(f"{r['pair']:<18}{float(r['first_point_val_loss']):>14.3f}{float(r['val_loss']):>14.3f}"
              f"{r['winner']:>12}{float(r['test_acc']):>7.3f}{float(r['test_track_acc']):>7.3f}")
    best = min(rows, key=lambda r: float(r["val_loss"]))
    searched = sum(r["winner"] == "searched" and float(r["val_loss"]) < float(r["first_point_val_loss"])
                   for r in rows)
    figures = {"segment": (1 - float(best["test_acc"])) / max(1 - base["test"], 1e-9),
               "track": (1 - float(best["test_track_acc"])) / max(1 - base["test_track"], 1e-9),
               "searched": searched}
    print(f"{'logistic baseline':<18}{'':>40}{base['test']:>7.3f}{base['test_track']:>7.3f}")
    print(f"best pair by val loss {best['pair']}: test error / baseline's = {figures['segment']:.2f} "
          f"per segment (goal <= 0.5), {figures['track']:.2f} per track (goal <= 1); "
          f"searched beat the first point in {searched} of {len(rows)} pairs (goal >= 2)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["realistic", "embedded"], choices=["realistic", "embedded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--grace-period", type=int, default=config.load().search.grace_period,
                        help="ASHA's: epochs before a trial can be stopped")
    parser.add_argument("--models", nargs="+", default=["CEL", "CEL2", "CEL3"])
    args = parser.parse_args()
    print(context())
    print(f"budget: {args.num_samples} trials x up to {args.max_epochs} epochs per pair "
          f"(ASHA grace period {args.grace_period}), "
          f"pairs {', '.join(m + '_spectrogram' for m in args.models)}")
    for name in args.sets:
        figures = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as work:
                figures.append(report(name, seed, one_seed(name, seed, args, Path(work))))
        mean = {k: statistics.mean(f[k] for f in figures) for k in ("segment", "track")}
        held = sum(f["searched"] >= 2 for f in figures)
        print(f"\n{name}: mean test error / baseline's {mean['segment']:.2f} per segment, "
              f"{mean['track']:.2f} per track; searched beat the first point in >= 2 pairs in "
              f"{held} of {len(figures)} seeds\n" + json.dumps({"set": name, **mean, "seeds_held": held}))


if __name__ == "__main__":
    main()
