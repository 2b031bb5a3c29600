"""Serving: onnxruntime on the whole exported graph vs PyTorch (features + model), same run.

    python -m bench.serving [--models-dir best_models] [--repeats 30] [--cold 3]

For the best spectrogram and the best waveform export in --models-dir (tune_main.py's,
chosen as `predict` chooses: test track accuracy), on real audio of the embedded dataset:

- latency: one 5 s segment (batch 1), one 30 s clip (its 6 segments as one batch) and a
  batch of 64 segments; median of --repeats runs after a warm-up run. PyTorch runs the
  export's front end and network as prebuilt modules under no_grad (onnx_export.served,
  the strongest PyTorch baseline: no per-call set-up); onnxruntime runs the .onnx.
- cold start: `python -m genre_ray.predict CLIP --model X.pth` against `--model X.onnx`
  (`--runtime onnx`, torch never imported), wall time from start to answer, the median of
  --cold processes each.

Goals: onnxruntime <= 1/2 of PyTorch's time at batch 1; a cold `predict --runtime onnx`
<= 1/3 of a cold `predict` (the torch runtime).
"""
from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import harness
from genre_ray import config, export, predict
from genre_ray.export import Exported
from genre_ray.features import build_features, probe_segments
from genre_ray.models import build_model
from genre_ray.onnx_export import export_pair_onnx
from genre_ray.onnx_export import served as served_model
from genre_ray.onnx_runtime import OnnxModel
from genre_ray.search_space import first_point

REPO = Path(__file__).resolve().parent.parent


def untrained_export(folder: Path, data_dir: Path, model: str = "CEL",
                     feature: str = "spectrogram") -> Path:
    """`model`'s export on `feature` at its first point, untrained, .pth and .onnx in
    `folder` as tune_main.py writes them: what --smoke serves (latency does not depend on
    the weights)."""
    cfg, hyper = config.load(), first_point(model)
    fs = build_features(data_dir, feature, cfg)
    arch = dataclasses.asdict(config.tuned(cfg, hyper, feature).model)
    net = build_model(model, fs.input_shape, len(fs.classes), arch)
    best = export.Best("smoke", {"model": model, **hyper}, {"val_loss": 1.0, "val_acc": 0.0, "epoch": 0},
                       net.state_dict())
    pair = export.save_scored(best, fs, arch, hyper, [folder])
    export_pair_onnx(pair, probe_segments(data_dir, cfg), [folder])
    return folder


def best_exports(models_dir: Path) -> dict[str, Path]:
    """feature -> the .pth predict would choose among that feature's exports having a .onnx."""
    found = {}
    for feature in ("spectrogram", "waveform"):
        with_graph = [p for p in models_dir.glob(f"*_{feature}_best_model.pth")
                      if p.with_suffix(".onnx").is_file()]
        if with_graph:
            found[feature] = max(with_graph, key=lambda p: Exported.load(p).test["track_accuracy"])
    if not found:
        raise SystemExit(f"no exports with an .onnx beside them in {models_dir}: run tune_main.py first")
    return found


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latencies(pth: Path, clip: np.ndarray, repeats: int) -> dict[str, tuple[float, float]]:
    """case -> (PyTorch s, onnxruntime s) for one export."""
    served = served_model(Exported.load(pth))
    graph = OnnxModel.load(pth.with_suffix(".onnx"))
    cases = {"segment (batch 1)": clip[:1], "30 s clip (6 segments)": clip[:6],
             "batch 64": np.concatenate([clip] * 11)[:64]}
    result = {}
    for case, segments in cases.items():
        x = torch.from_numpy(segments)

        def run_torch():
            with torch.no_grad():
                served(x)

        def run_onnx():
            graph.session.run(["probabilities"], {"segments": segments})

        result[case] = (median_seconds(run_torch, repeats), median_seconds(run_onnx, repeats))
    return result


def cold_start(model: Path, audio: Path, runs: int) -> float:
    """Median wall seconds of `python -m genre_ray.predict AUDIO --model MODEL`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "genre_ray.predict", str(audio), "--model", str(model)],
                       cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path(config.load().run.output_dir))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cold", type=int, default=3, help="processes per cold-start case")
    args = parser.parse_args(argv)
    print(harness.context())
    data_dir = harness.dataset(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.models_dir, args.repeats, args.cold = untrained_export(Path(tmp), data_dir), 2, 1
        serve(args.models_dir, sorted(data_dir.rglob("*.wav"))[0], args.repeats, args.cold)


def serve(models_dir: Path, audio: Path, repeats: int, cold_runs: int) -> None:
    """The latency table and the cold-start line of the best exports in `models_dir`."""
    exports = best_exports(models_dir)
    print(f"audio: {audio} ({torch.get_num_threads()} torch threads)")
    first = Exported.load(next(iter(exports.values())))
    clip = predict.read_segments(audio, first)[0]
    ratios = []
    print(f"{'export':<36}{'case':<26}{'PyTorch ms':>12}{'onnxruntime ms':>16}{'ratio':>8}")
    for feature, pth in exports.items():
        for case, (torch_s, onnx_s) in latencies(pth, clip, repeats).items():
            print(f"{pth.name:<36}{case:<26}{torch_s * 1e3:>12.2f}{onnx_s * 1e3:>16.2f}"
                  f"{onnx_s / torch_s:>8.2f}")
            if case.startswith("segment"):
                ratios.append(onnx_s / torch_s)
    print(harness.ratio(max(ratios), "onnxruntime over PyTorch at batch 1, the worst export", 0.5))
    pth = exports.get("spectrogram") or next(iter(exports.values()))
    cold = {suffix: cold_start(pth.with_suffix(suffix), audio, cold_runs) for suffix in (".pth", ".onnx")}
    print(f"cold predict ({pth.stem}): torch runtime {cold['.pth']:.2f} s, onnx runtime "
          f"{cold['.onnx']:.2f} s")
    print(harness.ratio(cold[".onnx"] / cold[".pth"], "cold predict, onnx runtime over torch runtime",
                        1 / 3))


if __name__ == "__main__":
    main()
