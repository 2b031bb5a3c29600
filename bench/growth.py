"""Growing a finished search: a run of 3 samples per pair grown by 3, against a fresh run
of 6 samples, same seed, same data, one after the other on this machine.

    python -m bench.growth [--seeds 0 1 2] [--models CEL2 MLP2] [--first 3] [--more 3]
                           [-- extra tune_main.py flags]

Each side is `tune_main.py` as a user runs it (W&B off; the embedded dataset unless
--data-dir is given after `--`): `--num-samples FIRST` then `--name R --more-samples
MORE`, against `--num-samples FIRST+MORE`. Printed per seed and pair: the best validation
loss of each side (its export's, the lowest of any epoch of any trial) and the epochs
its trials ran (the cost); then the mean over seeds. Checked per grown run: every pair's
study holds FIRST+MORE trials and no trial of the first round ran again (its folders'
files unchanged). Goal: the grown runs' best validation loss, averaged over seeds and
pairs, no worse than the fresh runs'.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import context

ROOT = Path(__file__).resolve().parents[1]


def tune(storage: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tune_main.py"), "--storage-path",
                          str(storage), "--wandb", "off", *args], cwd=storage.parent,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"tune_main.py {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")


def best(run: Path) -> dict[str, tuple[float, int]]:
    """pair -> (best val loss, epochs its trials ran), from the leaderboard and results."""
    with open(run / "leaderboard.csv", newline="") as f:
        losses = {r["pair"]: float(r["val_loss"]) for r in csv.DictReader(f)}
    epochs = dict.fromkeys(losses, 0)
    for result in run.glob("**/result.json"):
        rows = [json.loads(line) for line in result.open()]
        if rows:
            epochs[rows[-1]["config"]["pair"]] += max(r["training_iteration"] for r in rows)
    return {pair: (loss, epochs[pair]) for pair, loss in losses.items()}


def first_round(run: Path) -> dict[str, str]:
    """Trial folder -> hash of its files, for the run's first round."""
    return {d.name: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file())).hexdigest()
            for d in run.iterdir() if (d / "params.json").is_file()}


def checked_growth(run: Path, before: dict[str, str], per_pair: int) -> None:
    """SystemExit unless every study holds `per_pair` trials and no first-round trial changed."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run / "optuna.journal")))
    for summary in optuna.get_all_study_summaries(storage):
        if summary.n_trials != per_pair:
            raise SystemExit(f"{summary.study_name}: {summary.n_trials} trials, not {per_pair}")
    if first_round(run) != before:
        raise SystemExit(f"{run}: a first-round trial ran again")


def one_seed(seed: int, args: argparse.Namespace, storage: Path) -> dict[str, dict[str, tuple[float, int]]]:
    common = ["--models", *args.models, "--features", "spectrogram", "--seed", str(seed),
              "--output-dir", str(storage.parent / f"best-{seed}"), *args.extra]
    grown, fresh = f"grown-{seed}", f"fresh-{seed}"
    tune(storage, *common, "--num-samples", str(args.first), "--name", grown)
    before = first_round(storage / grown)
    tune(storage, "--name", grown, "--more-samples", str(args.more))
    checked_growth(storage / grown, before, args.first + args.more)
    tune(storage, *common, "--num-samples", str(args.first + args.more), "--name", fresh)
    return {"grown": best(storage / grown), "fresh": best(storage / fresh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["CEL2", "MLP2"])
    parser.add_argument("--first", type=int, default=3)
    parser.add_argument("--more", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="tune_main.py flags, after --")
    args = parser.parse_args()
    print(context())
    print(f"{args.first} samples per pair grown by {args.more} vs {args.first + args.more} fresh; "
          f"models {' '.join(args.models)} on spectrograms; {' '.join(args.extra) or 'defaults'}")
    print(f"{'seed':<6}{'pair':<20}{'grown loss':>12}{'fresh loss':>12}{'grown epochs':>14}{'fresh epochs':>14}")
    grown_losses, fresh_losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            sides = one_seed(seed, args, Path(tmp) / "runs")
            for pair, (loss, epochs) in sorted(sides["grown"].items()):
                fresh_loss, fresh_epochs = sides["fresh"][pair]
                print(f"{seed:<6}{pair:<20}{loss:>12.3f}{fresh_loss:>12.3f}{epochs:>14}{fresh_epochs:>14}")
                grown_losses.append(loss)
                fresh_losses.append(fresh_loss)
    grown_mean, fresh_mean = statistics.mean(grown_losses), statistics.mean(fresh_losses)
    print(f"mean best val loss: grown {grown_mean:.3f}, fresh {fresh_mean:.3f}, ratio "
          f"{grown_mean / fresh_mean:.3f}; goal <= 1: {'holds' if grown_mean <= fresh_mean else 'MISSED'}")
    print("every grown study held its trials once; no first-round trial ran again")


if __name__ == "__main__":
    main()
