"""Serving an ONNX export with onnxruntime alone: torch is never imported on this path.

An export (`genre_ray.onnx_export`) is one graph from a batch of raw segments at the
model's sample rate to genre probabilities, (batch, samples) -> (batch, n_classes), the
feature front end and the training split's normalisation inside it. Its metadata
(META_KEY, a JSON document) carries the classes, the cutting rule and the scores.

A file whose rate is not the model's is resampled by scipy's polyphase filter, where the
torch path uses torchaudio's sinc resampler: the two differ by a fraction of a percent of
the signal, so a resampled file's probabilities may differ in the third decimal. Files
at the model's rate (GTZAN's 22,050 Hz) take the same samples on both paths.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from genre_ray import audio
from genre_ray.errors import UserError

FORMAT = "genre-ray-onnx/1"
META_KEY = "genre_ray"  # the model's metadata_props entry holding the JSON document
INPUT, OUTPUT = "segments", "probabilities"


def new_session(model: str | bytes) -> ort.InferenceSession:
    """An onnxruntime session of a model (its path, or its serialised bytes) on every CPU, as
    torch's threads: onnxruntime's default took one of this machine's 2 (bench.serving:
    0.47 -> 0.29 ms per waveform segment at batch 1)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(model, options, providers=ort.get_available_providers())


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX export, ready to classify: the fields genre_ray.predict reads from any
    export (as export.Exported has them) and the onnxruntime session."""

    model: str
    feature: str
    classes: list[str]
    sample_rate: int
    segment_seconds: float
    min_tail_seconds: float
    val: dict[str, float]
    test: dict[str, Any] | None
    session: Any  # onnxruntime.InferenceSession

    @classmethod
    def load(cls, path: Path) -> OnnxModel:
        """The export at `path`; UserError for a file that is not one of ours."""
        fix = "pass a .onnx exported by tune_main.py into best_models/"
        try:
            session = new_session(str(path))
        except Exception as err:  # onnxruntime raises its own classes for every bad file
            raise UserError(f"{path} is not an ONNX model onnxruntime reads "
                            f"({type(err).__name__}); {fix}") from None
        meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        doc = json.loads(meta) if meta else {}
        if doc.get("format") != FORMAT:
            raise UserError(f"{path} is not a genre-ray model (no {FORMAT} metadata); {fix}")
        return cls(doc["model"], doc["feature"], doc["classes"], doc["sample_rate"],
                   doc["segment_seconds"], doc["min_tail_seconds"], doc["val"], doc.get("test"),
                   session)

    def decode(self, path: Path) -> np.ndarray:
        """The file, mono at the model's rate: (samples,) float32. audio.Unusable if bad."""
        frames, rate = audio.read(path)
        wave = audio.mono(frames)
        if rate == self.sample_rate:
            return wave
        from scipy.signal import resample_poly  # only for a file at another rate

        ratio = audio.resampling_ratio(rate, self.sample_rate)
        return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)

    def probabilities(self, segments: np.ndarray) -> np.ndarray:
        """The mean of the segments' probabilities: (n, samples) -> (n_classes,)."""
        parts = [self.session.run([OUTPUT], {INPUT: segments[i:i + audio.BATCH]})[0]
                 for i in range(0, len(segments), audio.BATCH)]
        return np.concatenate(parts).mean(axis=0)
