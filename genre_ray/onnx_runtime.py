"""Serving an ONNX export with onnxruntime alone: torch is never imported on this path.

An export (`genre_ray.onnx_export`) is one graph from a batch of raw segments at the
model's sample rate to genre probabilities, (batch, samples) -> (batch, n_classes), the
feature front end and the training split's normalisation inside it. Its metadata
(META_KEY, a JSON document) carries the classes, the cutting rule, the scores and the
SHA-256 of the graph (`graph_digest`): a file whose graph or metadata was damaged is
refused, never served with wrong weights.

A file whose rate is not the model's is resampled by scipy's polyphase filter, where the
torch path uses torchaudio's sinc resampler: the two differ by a fraction of a percent of
the signal, so a resampled file's probabilities may differ in the third decimal. Files
at the model's rate (GTZAN's 22,050 Hz) take the same samples on both paths.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx
import onnxruntime as ort
import pydantic

from genre_ray import audio
from genre_ray.errors import UserError

FORMAT = "genre-ray-onnx/1"
META_KEY = "genre_ray"  # the model's metadata_props entry holding the JSON document
INPUT, OUTPUT = "segments", "probabilities"
FIX = "pass a .onnx exported by tune_main.py into best_models/"


def graph_digest(proto: onnx.ModelProto) -> str:
    """SHA-256 of the model without its metadata: what the export records and load checks."""
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    return hashlib.sha256(bare.SerializeToString()).hexdigest()


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(allow_inf_nan=False))
class Meta:
    """The metadata fields serving reads, each in its range."""

    model: str
    feature: str
    classes: Annotated[list[str], pydantic.Field(min_length=2)]
    sample_rate: pydantic.PositiveInt
    segment_seconds: pydantic.PositiveFloat
    min_tail_seconds: pydantic.NonNegativeFloat
    val: dict[str, float]
    test: dict[str, Any] | None = None


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
        """The export at `path`; UserError for a file that is not one of ours or is damaged."""
        try:
            proto = onnx.load(str(path))
            session = new_session(proto.SerializeToString())
        except Exception as err:  # onnx and onnxruntime raise their own classes for every bad file
            raise UserError(f"{path} is not an ONNX model onnxruntime reads "
                            f"({type(err).__name__}); {FIX}") from None
        doc = json.loads(next((p.value for p in proto.metadata_props if p.key == META_KEY), "{}"))
        if doc.get("format") != FORMAT:
            raise UserError(f"{path} is not a genre-ray model (no {FORMAT} metadata); {FIX}")
        digest = graph_digest(proto)  # a copy and a serialisation of the whole model: once
        if doc.get("graph_sha256", digest) != digest:  # older exports lack it
            raise UserError(f"{path}'s graph does not match the SHA-256 its metadata records: the "
                            "file is damaged; copy it again whole or export it again")
        meta = _checked(path, doc, session.get_outputs()[0].shape[-1])
        return cls(meta.model, meta.feature, meta.classes, meta.sample_rate, meta.segment_seconds,
                   meta.min_tail_seconds, meta.val, meta.test, session)

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


def _checked(path: Path, doc: dict[str, Any], outputs: Any) -> Meta:
    """The metadata, each field in its range and one class per output of the graph."""
    try:
        meta = Meta(**{field: doc.get(field) for field in Meta.__dataclass_fields__})
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{path}'s metadata is damaged ({'.'.join(map(str, first['loc']))}: "
                        f"{first['msg'].lower()}, got {first.get('input')!r}); {FIX}") from None
    if isinstance(outputs, int) and outputs != len(meta.classes):
        raise UserError(f"{path}'s metadata names {len(meta.classes)} classes for a graph of "
                        f"{outputs} outputs: the file is damaged; {FIX}")
    return meta
