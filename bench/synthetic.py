"""Synthetic dataset: generation on all cores over generation on one worker, same run.

    python -m bench.synthetic [--tracks-per-genre 10] [--seconds 30]

Goal: ~1/cores. Each run spawns its workers, so their start-up is in both figures. On a
busy machine the wall figures mean little; CPU seconds per track hold.
"""
from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

from bench import harness
from genre_ray.synthetic import GENRES, generate


def cpu_seconds() -> float:
    """User and system time of this process and its finished children so far."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def seconds_to_generate(tracks_per_genre: int, seconds: float, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds to write a fresh dataset with `workers` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), cpu_seconds()
        generate(Path(tmp) / "gtzan", tracks_per_genre, seed=0, seconds=seconds, workers=workers)
        return time.perf_counter() - start, cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--tracks-per-genre", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.tracks_per_genre, args.seconds = 1, 2.0
    cores = os.cpu_count() or 1
    tracks = args.tracks_per_genre * len(GENRES)
    print(harness.context())
    print(f"{tracks} tracks of {args.seconds:g} s")
    wall = {}
    for workers in sorted({1, cores}):
        wall[workers], cpu = seconds_to_generate(args.tracks_per_genre, args.seconds, workers)
        print(f"{workers} worker(s): {wall[workers]:.2f} s, {wall[workers] * workers / tracks:.3f} s per track "
              f"per core; CPU {cpu:.1f} s, {cpu / tracks:.3f} s per track (less if others load the cores)")
    print(harness.ratio(wall[cores] / wall[1], f"{cores} workers over 1, wall", 1 / cores))


if __name__ == "__main__":
    main()
