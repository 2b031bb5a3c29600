"""Feature cache: the cached call over the first call, on the embedded dataset, same run.

    python -m bench.feature_cache [--feature spectrogram] [--data-dir D]

Goal: <= 1/20. The first call decodes, augments and computes; the second loads.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import context
from genre_ray import config
from genre_ray.features import build_features
from genre_ray.synthetic import embedded_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature", default="spectrogram")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    data_dir = args.data_dir or embedded_dataset()
    print(context())
    cfg = config.load()
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: the first call computes
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            fs = build_features(data_dir, args.feature, cfg, cache=Path(cache))
            timings.append(time.perf_counter() - start)
    first, cached = timings
    print(f"{args.feature} of {data_dir}: {sum(len(s.x) for s in fs.splits.values())} segments")
    print(f"first call {first:.2f} s, cached call {cached:.2f} s (from cache: {fs.from_cache})")
    print(f"ratio cached/first = {cached / first:.4f} (1/{first / cached:.0f}); goal <= 1/20")


if __name__ == "__main__":
    main()
