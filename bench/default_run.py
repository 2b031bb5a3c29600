"""The default run (`python tune_main.py`) at a baseline revision and at the working tree,
one after the other on this machine: per-pair results side by side, and the wall-time ratio.

    python -m bench.default_run --baseline 8ea56de        # a refactor: same results, no slower?
    python -m bench.default_run --baseline HEAD --against HEAD   # the run's own noise

The baseline is `git archive`d into a temporary folder and run from there with this
interpreter; both sides use W&B off, their own storage and output folders, and one new
cache folder ($GENRE_RAY_CACHE), so neither reuses features an older version computed.
Each side first runs a one-trial warm-up (untimed) that generates the embedded dataset
and builds the features; the timed run then finds them cached, as a user's second run
does. Extra tune_main.py flags go after `--`.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import context

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("val_loss", "val_acc", "test_acc", "test_track_acc", "epochs", "finished", "pruned")


def tune_main(tree: Path, work: Path, cache: Path, *flags: str) -> tuple[float, str]:
    """Run tune_main.py in `tree` with `flags`, its files under `work`: (wall seconds, output)."""
    cmd = [sys.executable, "tune_main.py", "--wandb", "off", "--name", "bench",
           "--storage-path", str(work / "runs"), "--output-dir", str(work / "best_models"), *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "GENRE_RAY_CACHE": str(cache)})
    if done.returncode:
        sys.exit(f"{tree}: tune_main.py exited {done.returncode}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout + done.stderr


def run_side(tree: Path, work: Path, cache: Path, extra: list[str]) -> tuple[float, dict[str, dict], str]:
    """The warm-up, then the timed run: (wall seconds, leaderboard rows by pair, its output)."""
    tune_main(tree, work / "warm-up", cache, "--num-samples", "1", "--max-epochs", "1", *extra)
    wall, out = tune_main(tree, work, cache, *extra)
    with open(work / "runs" / "bench" / "leaderboard.csv") as f:
        rows = {row["pair"]: row for row in csv.DictReader(f)}
    return wall, rows, out


def checkout(revision: str, into: Path) -> Path:
    """The files of `revision` in `into` (git archive: no worktree left behind)."""
    into.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def differences(base: dict[str, dict], now: dict[str, dict]) -> float:
    """Print each pair's results side by side; returns the largest |difference| of a float."""
    worst = 0.0
    print(f"{'pair':<22}" + "".join(f"{key:>28}" for key in SHOWN))
    for pair in sorted(set(base) | set(now)):
        a, b = base.get(pair, {}), now.get(pair, {})
        cells = []
        for key in SHOWN:
            x, y = a.get(key, ""), b.get(key, "")
            cells.append(f"{x[:9]:>13} {y[:9]:>13} ")
            if x and y:
                worst = max(worst, abs(float(x) - float(y)))
            elif x != y:
                worst = float("inf")
        print(f"{pair:<22}" + "".join(cells))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--against", help="a revision to run in place of the working tree")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    print(context())
    with tempfile.TemporaryDirectory(prefix="default-run-") as tmp:
        tmp = Path(tmp)
        tree = checkout(args.baseline, tmp / "baseline-tree")
        base_s, base, base_out = run_side(tree, tmp / "baseline", tmp / "cache", extra)
        current = checkout(args.against, tmp / "current-tree") if args.against else ROOT
        now_s, now, now_out = run_side(current, tmp / "current", tmp / "cache", extra)
    print(f"columns: baseline {args.baseline} | {args.against or 'working tree'}")
    worst = differences(base, now)
    for side, out in (("baseline", base_out), ("current", now_out)):
        print(f"{side}: " + next((line for line in out.splitlines() if line.startswith("tuning took")), "?"))
    print(f"largest difference of a result: {worst:.2g}")
    print(f"wall time: baseline {base_s:.0f} s, working tree {now_s:.0f} s, "
          f"ratio {now_s / base_s:.3f} (goal: <= 1, within this machine's noise)")


if __name__ == "__main__":
    main()
