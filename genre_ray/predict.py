"""Stage predict: the genre of audio files, from an exported model alone.

    python -m genre_ray.predict AUDIO [AUDIO ...] [--model PATH | --models-dir DIR]
                                [--runtime torch|onnx] [--top K] [--json]

A file (any format libsndfile reads) is decoded, resampled and cut into segments with
the model's own parameters, which its export carries (sample rate, segment length,
feature parameters, normalisation statistics), so nothing but the export is needed; the
file's probabilities are the mean of its segments'. A clip shorter than one segment is
zero-padded to one, and the output says so.

Runtimes (RUNTIMES): `torch` reads the .pth and runs each segment through the same
`transforms.compute_feature` as the training data; `onnx` reads the .onnx beside it (one
graph, front end included) with onnxruntime, and never imports torch: this module
imports a runtime only when it is chosen. The output is the same on both.

Model: `--model PATH` (a .onnx means the onnx runtime), or the best export of the
runtime's kind in `--models-dir` (default `best_models`): the highest held-out test
track accuracy when the exports carry test scores, else the highest validation accuracy.
The choice and its criterion are always printed (on stderr with `--json`, whose stdout
is one JSON document and nothing else).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genre_ray import audio, config
from genre_ray.errors import UserError, exit_on_user_error

# runtime -> (module, class, file suffix). The class loads an export (`load(path)`,
# UserError if not one) and has the fields and methods `Model` names.
RUNTIMES = {"torch": ("genre_ray.export", "Exported", ".pth"),
            "onnx": ("genre_ray.onnx_runtime", "OnnxModel", ".onnx")}
Model = Any  # export.Exported | onnx_runtime.OnnxModel: model, feature, classes, sample_rate,
# segment_seconds, min_tail_seconds, val, test; decode(path), probabilities(segments)


@dataclass
class Prediction:
    """One file's result; top: [{"genre", "probability"}], most probable first."""

    file: str
    model: str
    top: list[dict[str, Any]]
    segments: int
    padded: bool
    seconds: float


@dataclass
class Choice:
    """The export a prediction uses, and why it was chosen (for the user)."""

    path: Path
    exported: Model
    reason: str


# ---- choosing and loading a model -------------------------------------------------

def runtime(name: str) -> tuple[type, str]:
    """The class that loads `name`'s exports, and their suffix (imports that runtime)."""
    module, cls, suffix = RUNTIMES[name]
    return getattr(importlib.import_module(module), cls), suffix


def load_model(path: Path, runtime_name: str = "torch", reason: str = "given with --model") -> Choice:
    """The export at `path`; UserError when it is missing or not a genre-ray model."""
    loader, suffix = runtime(runtime_name)
    if not path.is_file():
        what = "is a folder (pass it as --models-dir)" if path.is_dir() else "does not exist"
        raise UserError(f"model file {path} {what}; pass a {suffix} from best_models/ "
                        "(run tune_main.py first to export models)")
    if path.suffix != suffix:
        raise UserError(f"model file {path} is not a {suffix} file, which --runtime "
                        f"{runtime_name} reads; pass the {suffix} export beside it")
    return Choice(path, loader.load(path), reason)


def choose_model(models_dir: Path, runtime_name: str = "torch") -> Choice:
    """The best export of the runtime's kind in `models_dir`: by test track accuracy when
    any export has test scores (ties: validation accuracy), else by validation accuracy
    (ties: lower validation loss). Files that are not genre-ray exports are skipped."""
    exports = _exports(models_dir, *runtime(runtime_name))
    tested = [p for p, pl in exports.items() if _score(pl, "test", "track_accuracy") > -math.inf]
    if tested:
        path = max(tested, key=lambda p: (_score(exports[p], "test", "track_accuracy"),
                                          _score(exports[p], "val", "val_acc")))
        score = f"best test track accuracy ({_score(exports[path], 'test', 'track_accuracy'):.3f})"
    else:
        path = max(exports, key=lambda p: (_score(exports[p], "val", "val_acc"),
                                           -_score(exports[p], "val", "val_loss", math.inf)))
        score = (f"best validation accuracy ({_score(exports[path], 'val', 'val_acc'):.3f}; "
                 "no export there has test scores)")
    reason = f"chosen from {len(exports)} export(s) in {models_dir} by {score}"
    return Choice(path, exports[path], reason)


def _score(exported: Model, section: str, metric: str, missing: float = -math.inf) -> float:
    """The export's `section` (val or test) score `metric`, or `missing` when it has none."""
    value = (getattr(exported, section) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else missing


def _exports(models_dir: Path, loader: type, suffix: str) -> dict[Path, Model]:
    fix = "run tune_main.py first to export models there, or pass --model PATH"
    if not models_dir.is_dir():
        raise UserError(f"models folder {models_dir} does not exist; {fix}")
    found = {}
    for path in sorted(models_dir.glob(f"*{suffix}")):
        try:
            found[path] = loader.load(path)
        except UserError:
            continue  # a foreign or damaged file is not a candidate
    if not found:
        raise UserError(f"models folder {models_dir} holds no genre-ray export (*{suffix}); {fix}")
    return found


# ---- one file -----------------------------------------------------------------------

def read_segments(path: Path, model: Model) -> tuple[np.ndarray, float, bool]:
    """`path` cut as the model's data was: (segments (n, samples), clip seconds, padded).

    A clip shorter than one segment is zero-padded to one; longer clips follow the
    training rule (a tail of at least min_tail_seconds is padded, a shorter one dropped)."""
    rate = model.sample_rate
    length = round(model.segment_seconds * rate)
    wave = _decode(path, model)
    seconds, padded = len(wave) / rate, len(wave) < length
    if padded:
        wave = np.pad(wave, (0, length - len(wave)))
    return audio.segment(wave, length, round(model.min_tail_seconds * rate)), seconds, padded


def _decode(path: Path, model: Model) -> np.ndarray:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"audio file {path} {what}; pass the path of an audio file")
    try:
        wave = model.decode(path)
    except audio.Unusable as err:
        raise UserError(f"audio file {path} {err}") from None
    if not len(wave):
        raise UserError(f"audio file {path} holds no samples; pass a non-empty recording")
    return wave


def predict_file(path: Path, choice: Choice, top: int) -> Prediction:
    """Classify one audio file with the chosen model."""
    segments, seconds, padded = read_segments(path, choice.exported)
    probs = choice.exported.probabilities(segments)
    ranked = [{"genre": choice.exported.classes[i], "probability": round(float(probs[i]), 6)}
              for i in np.argsort(-probs, kind="stable")[:top]]
    return Prediction(str(path), str(choice.path), ranked, len(segments), padded, round(seconds, 3))


# ---- output -------------------------------------------------------------------------

def describe(choice: Choice) -> str:
    """One line: which export, what it is, why it was chosen."""
    exported = choice.exported
    return f"model: {choice.path} ({exported.model} on {exported.feature}; {choice.reason})"


def format_prediction(pred: Prediction, segment_seconds: float) -> str:
    """A file's block of plain text: header, optional padding note, ranked genres."""
    lines = [f"{pred.file}: {pred.seconds:.1f} s, {pred.segments} segment(s) of "
             f"{segment_seconds:g} s"]
    if pred.padded:
        lines.append(f"  padded: {pred.seconds:.1f} s clip < {segment_seconds:g} s segment "
                     "(zero-padded to one segment)")
    width = max(len(t["genre"]) for t in pred.top)
    lines += [f"  {rank}. {t['genre']:<{width}}  {t['probability']:.3f}"
              for rank, t in enumerate(pred.top, 1)]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genre_ray.predict",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("audio", nargs="+", type=Path, help="audio files to classify")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="an exported model (.pth)")
    source.add_argument("--models-dir", type=Path,
                        help="pick the best export in this folder (default: run.output_dir "
                             "of genre_ray/defaults.yaml)")
    parser.add_argument("--runtime", choices=sorted(RUNTIMES),
                        help="torch (the .pth) or onnx (the .onnx, with onnxruntime alone; "
                             "default: onnx for a --model ending in .onnx, else torch)")
    parser.add_argument("--top", type=int, default=3, help="genres shown per file (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (a list, one entry per file) and nothing else")
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top {args.top} must be at least 1")
    name = args.runtime or ("onnx" if args.model and args.model.suffix == ".onnx" else "torch")
    choice = load_model(args.model, name) if args.model else \
        choose_model(args.models_dir or Path(config.load().run.output_dir), name)
    print(describe(choice), file=sys.stderr if args.json else sys.stdout, flush=True)
    preds = [predict_file(path, choice, args.top) for path in args.audio]
    if args.json:
        print(json.dumps([asdict(p) for p in preds], indent=2))
    else:
        seconds = choice.exported.segment_seconds
        print("\n".join(format_prediction(p, seconds) for p in preds))
    return 0


if __name__ == "__main__":
    main()
