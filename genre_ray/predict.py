"""Stage predict: the genre of audio files, from an exported model alone.

    python -m genre_ray.predict AUDIO [AUDIO ...] [--model PATH | --models-dir DIR] [--top K] [--json]

A file (any format libsndfile reads) is decoded, resampled and cut into segments with
the model's own parameters, which its export carries (sample rate, segment length,
feature parameters, normalisation statistics), so nothing but the .pth is needed. Each
segment goes through the same `features.compute_feature` as the training data; the
file's probabilities are the mean of its segments' softmax. A clip shorter than one
segment is zero-padded to one, and the output says so.

Model: `--model PATH`, or the best export in `--models-dir` (default `best_models`):
the highest held-out test track accuracy when the exports carry test scores, else the
highest validation accuracy. The choice and its criterion are always printed (on
stderr with `--json`, whose stdout is one JSON document and nothing else).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genre_ray import config, data
from genre_ray.export import Exported
from genre_ray.errors import UserError, exit_on_user_error
from genre_ray.features import compute_feature

BATCH = 64  # segments per forward pass: bounds memory on long files


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
    exported: Exported
    reason: str


# ---- choosing and loading a model -------------------------------------------------

def load_model(path: Path, reason: str = "given with --model") -> Choice:
    """The export at `path`; UserError when it is missing or not a genre-ray model."""
    if not path.is_file():
        what = "is a folder (pass it as --models-dir)" if path.is_dir() else "does not exist"
        raise UserError(f"model file {path} {what}; pass a .pth from best_models/ "
                        "(run tune_main.py first to export models)")
    return Choice(path, Exported.load(path), reason)


def choose_model(models_dir: Path) -> Choice:
    """The best export in `models_dir`: by test track accuracy when any export has test
    scores (ties: validation accuracy), else by validation accuracy (ties: lower validation
    loss). Files that are not genre-ray exports are skipped."""
    exports = _exports(models_dir)
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


def _score(exported: Exported, section: str, metric: str, missing: float = -math.inf) -> float:
    """The export's `section` (val or test) score `metric`, or `missing` when it has none."""
    value = (getattr(exported, section) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else missing


def _exports(models_dir: Path) -> dict[Path, Exported]:
    fix = "run tune_main.py first to export models there, or pass --model PATH"
    if not models_dir.is_dir():
        raise UserError(f"models folder {models_dir} does not exist; {fix}")
    found = {}
    for path in sorted(models_dir.glob("*.pth")):
        try:
            found[path] = Exported.load(path)
        except UserError:
            continue  # a foreign or damaged file is not a candidate
    if not found:
        raise UserError(f"models folder {models_dir} holds no genre-ray export (*.pth); {fix}")
    return found


# ---- one file -----------------------------------------------------------------------

def read_segments(path: Path, exported: Exported) -> tuple[torch.Tensor, float, bool]:
    """`path` cut as the model's data was: (segments (n, samples), clip seconds, padded).

    A clip shorter than one segment is zero-padded to one; longer clips follow the
    training rule (a tail of at least min_tail_seconds is padded, a shorter one dropped)."""
    rate = exported.sample_rate
    length = round(exported.segment_seconds * rate)
    min_tail = round(exported.min_tail_seconds * rate)
    wave = _decode(path, rate)
    seconds, padded = wave.numel() / rate, wave.numel() < length
    if padded:
        wave = nn.functional.pad(wave, (0, length - wave.numel()))
    return data.segment(wave, length, min_tail), seconds, padded


def _decode(path: Path, rate: int) -> torch.Tensor:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"audio file {path} {what}; pass the path of an audio file")
    try:
        wave = data.decode(path, rate)
    except data.Unusable as err:
        raise UserError(f"audio file {path} {err}") from None
    if not wave.numel():
        raise UserError(f"audio file {path} holds no samples; pass a non-empty recording")
    return wave


@torch.no_grad()
def probabilities(model: nn.Module, exported: Exported, segments: torch.Tensor) -> torch.Tensor:
    """The mean of the segments' softmax: (n, samples) -> (n_classes,)."""
    x = compute_feature(segments, exported.feature, exported.sample_rate,
                        exported.feature_params, exported.stats)
    if list(x.shape[1:]) != list(exported.input_shape):
        raise UserError(f"the model expects input {tuple(exported.input_shape)} but its own "
                        f"feature parameters give {tuple(x.shape[1:])}; the export is damaged, "
                        "export it again with tune_main.py")
    return torch.cat([model(chunk).softmax(dim=1) for chunk in x.split(BATCH)]).mean(dim=0)


def predict_file(path: Path, choice: Choice, model: nn.Module, top: int) -> Prediction:
    """Classify one audio file with the chosen model."""
    segments, seconds, padded = read_segments(path, choice.exported)
    probs = probabilities(model, choice.exported, segments)
    values, indices = probs.topk(min(top, len(probs)))
    ranked = [{"genre": choice.exported.classes[i], "probability": round(v, 6)}
              for v, i in zip(values.tolist(), indices.tolist())]
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
    parser.add_argument("--top", type=int, default=3, help="genres shown per file (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (a list, one entry per file) and nothing else")
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top {args.top} must be at least 1")
    choice = load_model(args.model) if args.model else \
        choose_model(args.models_dir or Path(config.load().run.output_dir))
    print(describe(choice), file=sys.stderr if args.json else sys.stdout, flush=True)
    model = choice.exported.rebuild()
    preds = [predict_file(path, choice, model, args.top) for path in args.audio]
    if args.json:
        print(json.dumps([asdict(p) for p in preds], indent=2))
    else:
        seconds = choice.exported.segment_seconds
        print("\n".join(format_prediction(p, seconds) for p in preds))
    return 0


if __name__ == "__main__":
    main()
