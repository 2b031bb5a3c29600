"""Feature cache: the cached call over the first call, on the embedded dataset, same run.

    python -m bench.feature_cache [--feature spectrogram] [--data-dir D]

Goal: <= 1/20. The first call decodes, augments and computes; the second loads.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import harness
from genre_ray import config
from genre_ray.features import build_features


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--feature", default="spectrogram")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or harness.dataset(args.smoke)
    print(harness.context())
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
    print(harness.ratio(cached / first, f"cached call over first call, 1/{first / cached:.0f}", 1 / 20))


if __name__ == "__main__":
    main()
