"""Stage export: each pair's best checkpoint becomes `{model}_{feature}_best_model.pth`.

Best means the lowest validation loss over every epoch of every trial of the pair (not
the last epoch: Tune's `get_best_result` defaults to that). The file holds the model's
state dict and plain metadata only, so `torch.load(path, weights_only=True)` reads it
and `rebuild` turns it back into a working model; it never runs pickled code.
"""
from __future__ import annotations

import math
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torchaudio
from torch import nn

from genre_ray.errors import UserError
from genre_ray.features import FeatureSet
from genre_ray.files import atomic_path
from genre_ray.models import build_model

FORMAT = "genre-ray-model/1"
# Reported by a trial with each checkpoint (trainable.BestSaver): the validation loss of the
# state it holds, its best epoch's; Tune ranks checkpoints by it. The epoch's own val_loss,
# reported beside it, may be worse.
CHECKPOINT_METRIC = "checkpoint_val_loss"
REQUIRED = ("format", "state_dict", "model", "feature", "config", "classes", "input_shape",
            "feature_params", "stats")


@dataclass
class Best:
    """The best checkpoint of a pair: its trial, epoch metrics and saved model state."""

    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def best_of_pair(results: Iterable, load_state) -> Best | None:
    """The lowest-val-loss checkpoint over one pair's trials (Tune `Result`s), or None.

    `load_state(checkpoint)` returns the trial's saved state (trainable.load_trial_state):
    the best epoch's model and metrics, which a checkpoint may have saved epochs later
    (trainable.BestSaver); Tune's checkpoint metrics are those of the epoch it was saved
    at, with the state's loss as CHECKPOINT_METRIC.
    """
    best: Best | None = None
    for result in results:
        for checkpoint, metrics in result.best_checkpoints:
            loss = metrics.get(CHECKPOINT_METRIC, math.inf)
            if math.isfinite(loss) and (best is None or loss < best.metrics["val_loss"]):
                state = load_state(checkpoint)
                best = Best(result.metrics.get("trial_id", ""), dict(result.config),
                            dict(state["metrics"]), state["trainer"]["model"])
    return best


def payload(best: Best, fs: FeatureSet, hyper: dict[str, Any]) -> dict[str, Any]:
    """What an export file holds: the best state dict and plain metadata."""
    return {
        "format": FORMAT, "state_dict": best.state_dict,
        "model": best.config["model"], "feature": fs.feature, "config": hyper,
        "classes": list(fs.classes), "input_shape": list(fs.input_shape),
        "feature_params": fs.params, "stats": dict(fs.stats), "trial_id": best.trial_id,
        "val": {k: best.metrics[k] for k in ("val_loss", "val_acc", "epoch")},
        "versions": {"torch": str(torch.__version__), "torchaudio": str(torchaudio.__version__),
                     "python": platform.python_version()},  # str: TorchVersion is not plain data
    }


def save(payload: dict[str, Any], paths: list[Path]) -> None:
    """Write an export to every path in `paths`, each atomically."""
    for path in paths:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)


def load_exported(path: Path) -> dict[str, Any]:
    """An exported model's contents; UserError for a file that is not one of ours."""
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol first
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # weights_only refuses code; anything unreadable is not ours
        raise UserError(f"{path} is not a genre-ray model ({type(err).__name__}); "
                        "pass a file exported by tune_main.py into best_models/") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or \
            any(key not in payload for key in REQUIRED):
        raise UserError(f"{path} is not a genre-ray model (no {FORMAT} metadata); pass a file "
                        "exported by tune_main.py into best_models/")
    return payload


def rebuild(payload: dict[str, Any]) -> nn.Module:
    """The exported model, weights loaded, in eval mode: (batch, *input_shape) -> logits."""
    model = build_model(payload["model"], tuple(payload["input_shape"]), len(payload["classes"]),
                        payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def export_name(model: str, feature: str) -> str:
    return f"{model}_{feature}_best_model.pth"
