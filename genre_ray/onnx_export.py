"""Stage export, ONNX: each pair's export as one self-contained graph for serving.

    `{model}_{feature}_best_model.onnx`: (batch, samples) float32 segments at the model's
    sample rate -> (batch, n_classes) genre probabilities

The graph is cost.Served: the feature front end (transforms.FrontEnd: standardisation, or
MelSpectrogram + AmplitudeToDB and the training split's per-band statistics), the
network and the softmax, so onnxruntime alone serves it (genre_ray.onnx_runtime). The
export's metadata (onnx_runtime.META_KEY) is a JSON document: classes, cutting rule,
feature parameters, searched hyperparameters, scores, the check below, and the graph's
SHA-256 (onnx_runtime.graph_digest), which serving checks.

Checked before it is written: onnxruntime runs the graph on real segments and every
probability must be within TOLERANCE of PyTorch's on the same segments, with the same
predicted genre for each. A graph that fails to export or to check is not written; the
reason is returned and the .pth stays the pair's export.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from genre_ray import internals, onnx_runtime
from genre_ray.cost import Served
from genre_ray.export import Exported, PairExport
from genre_ray.files import atomic_path
from genre_ray.transforms import FrontEnd

TOLERANCE = 1e-4  # max abs difference of a probability, onnxruntime vs PyTorch (seen: ~1e-7)
OPSET = 18  # the dynamo exporter's default; onnxruntime 1.31 runs up to 23


def served(exported: Exported) -> Served:
    """The export from raw segments to probabilities, in eval mode:
    (batch, samples) -> (batch, n_classes)."""
    front = FrontEnd(exported.feature, exported.sample_rate, exported.feature_params, exported.stats)
    return Served(front, exported.rebuild()).eval()


def onnx_name(model: str, feature: str) -> str:
    return f"{model}_{feature}_best_model.onnx"


def export_onnx(exported: Exported, segments: torch.Tensor, paths: list[Path]) -> str | None:
    """Write `exported` as a checked ONNX graph to every path of `paths` (atomically), or
    write nothing and return why it cannot be. `segments`: (n, samples) real audio at the
    model's rate, n >= 1, for the check."""
    model = served(exported)
    try:
        proto = _graph(model, segments)
    except Exception as err:  # the exporter's many failure types all mean "cannot export"
        return f"the graph does not export ({type(err).__name__}: {_first_line(err)})"
    with torch.no_grad():
        expected = model(segments).numpy()
    session = onnx_runtime.new_session(proto.SerializeToString())
    got = session.run([onnx_runtime.OUTPUT], {onnx_runtime.INPUT: segments.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE or (got.argmax(1) != expected.argmax(1)).any():
        return (f"onnxruntime's probabilities differ from PyTorch's by {diff:.2g} on "
                f"{len(segments)} segments (tolerance {TOLERANCE:g})")
    check = {"segments": len(segments), "max_abs_diff": diff, "tolerance": TOLERANCE}
    onnx.helper.set_model_props(proto, {onnx_runtime.META_KEY: json.dumps(
        {**_metadata(exported, check), "graph_sha256": onnx_runtime.graph_digest(proto)})})
    data = proto.SerializeToString()
    for path in paths:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
    return None


def export_pair_onnx(pair: PairExport, segments: torch.Tensor, folders: list[Path]) -> PairExport:
    """`pair` with its ONNX graph written into `folders` (its path in the first), or with why
    it could not be: then no graph of an earlier run is left there beside the new .pth."""
    paths = [folder / onnx_name(pair.exported.model, pair.exported.feature) for folder in folders]
    problem = export_onnx(pair.exported, segments, paths)
    if problem:
        for path in paths:
            path.unlink(missing_ok=True)
    return dataclasses.replace(pair, onnx_path=None if problem else paths[0], onnx_problem=problem or "")


def _graph(model: Served, segments: torch.Tensor) -> onnx.ModelProto:
    """The dynamo exporter's graph of `model`, its batch dimension dynamic; the exporter's
    progress lines and warnings kept off the run's output."""
    example = segments[:2] if len(segments) >= 2 else segments.repeat(2, 1)  # 1 would specialise
    batch = torch.export.Dim("batch", min=1)
    internals.onnx_functions_built_once()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[onnx_runtime.INPUT],
                                        output_names=[onnx_runtime.OUTPUT],
                                        dynamic_shapes=({0: batch},), verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model_proto


def _metadata(exported: Exported, check: dict) -> dict:
    return {"format": onnx_runtime.FORMAT, "model": exported.model, "feature": exported.feature,
            "classes": exported.classes, "sample_rate": exported.sample_rate,
            "segment_seconds": exported.segment_seconds,
            "min_tail_seconds": exported.min_tail_seconds,
            "feature_params": exported.feature_params, "hyper": exported.hyper,
            "trial_id": exported.trial_id, "val": exported.val, "test": exported.test,
            "check": check, "versions": exported.versions}


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
