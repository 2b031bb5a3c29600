"""Feature build: today's streamed build over the same build with the former augmentation.

    python -m bench.feature_build --data-dir D [--features waveform spectrogram]

Both builds decode D, augment its training segments and compute every feature into an
empty cache, a chunk at a time (features._build); the baseline swaps genre_ray.augment
for the per-item T.PitchShift path it replaced (bench/augment.py's reference_augment),
which dominated issue 12's 198 s GTZAN-size build. Each build runs in its own child
process, so its wall time, CPU time and peak RSS (VmHWM) are its own.
Goal (issue 12): new/baseline <= 1/3.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import context

CHILD = """
import contextlib, json, sys, time
from unittest import mock
from genre_ray import config, features
from genre_ray.features import build_feature_sets
from bench.augment import reference_augment
data_dir, names, baseline = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1"
start, cpu = time.perf_counter(), time.process_time()
former = lambda waves, rate, params, generator, device=None: reference_augment(waves, rate, params, generator)
with mock.patch.object(features, "augment", former) if baseline else contextlib.nullcontext():
    sets = build_feature_sets(data_dir, names, config.load())
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "peak": hwm * 1024,
                  "bytes": sum(p.x.nbytes for fs in sets.values() for p in fs.splits.values())}))
"""


def build(data_dir: Path, features: list[str], baseline: bool) -> dict[str, float]:
    """One build into an empty cache, in a child process: wall, cpu, peak and bytes written."""
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), ",".join(features),
                              "1" if baseline else "0"], capture_output=True, text=True,
                             env={"GENRE_RAY_CACHE": cache, "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if out.returncode:
        sys.exit(f"the {'baseline' if baseline else 'new'} build failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--features", nargs="+", default=["waveform", "spectrogram"])
    args = parser.parse_args()
    print(context())
    runs = {name: build(args.data_dir, args.features, name == "baseline")
            for name in ("new", "baseline")}
    for name, r in runs.items():
        print(f"{name:<9} {r['wall']:7.1f} s wall, {r['cpu']:7.1f} s CPU, peak RSS "
              f"{r['peak'] / 2**30:.2f} GB for {r['bytes'] / 2**30:.2f} GB of features "
              f"({r['peak'] / r['bytes']:.2f} x)")
    new, old = runs["new"], runs["baseline"]
    print(f"ratio new/baseline = {new['wall'] / old['wall']:.3f} wall, "
          f"{new['cpu'] / old['cpu']:.3f} CPU; goal <= 1/3")


if __name__ == "__main__":
    main()
