"""Stage export: each pair's best checkpoint becomes `{model}_{feature}_best_model.pth`.

Best means the lowest validation loss over every epoch of every trial of the pair (not
the last epoch: Tune's `get_best_result` defaults to that), read from the run's trial
records (trials.TrialRecord). The export is scored once on the test split, which no
trial and no selection ever touched, and carries those scores. The file holds the
model's state dict and plain metadata only, so `torch.load(path, weights_only=True)`
reads it and `rebuild` turns it back into a working model; it never runs pickled code.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchaudio
from torch import nn

from genre_ray import audio, config, data
from genre_ray.errors import UserError
from genre_ray.features import FeatureSet, FeatureSplit, variant_of
from genre_ray.files import atomic_path
from genre_ray.models import build_model, count_parameters
from genre_ray.training import evaluate, track_accuracy
from genre_ray.transforms import compute_feature
from genre_ray.trials import TrialKeys, TrialRecord

FORMAT = "genre-ray-model/2"  # 2: typed fields (sample_rate, segment_seconds, arch) at the top
# Reported by a trial with each checkpoint (trainable.BestSaver): the validation loss of the
# state it holds, its best epoch's; Tune ranks checkpoints by it. The epoch's own val_loss,
# reported beside it, may be worse.
CHECKPOINT_METRIC = "checkpoint_val_loss"


@dataclass
class Best:
    """The best checkpoint of a pair: its trial, epoch metrics and saved model state."""

    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def best_of_pair(records: list[TrialRecord], load_state: Callable[[Any], dict]) -> Best | None:
    """The lowest-val-loss checkpoint over one pair's trial records, or None.

    `load_state(checkpoint)` returns the trial's saved state (trainable.load_trial_state):
    the best epoch's model and metrics, which a checkpoint may have saved epochs later
    (trainable.BestSaver); a record's checkpoint loss is that state's.
    """
    best: Best | None = None
    for record in records:
        for checkpoint, loss in record.checkpoints:
            if math.isfinite(loss) and (best is None or loss < best.metrics["val_loss"]):
                state = load_state(checkpoint)
                best = Best(record.trial_id, dict(record.config), dict(state["metrics"]),
                            state["trainer"]["model"])
    return best


@dataclass
class TestScores:
    """Scores on the test split; confusion[i][j]: segments of class i predicted as j."""

    __test__ = False  # not a pytest test class, whatever its name

    accuracy: float
    track_accuracy: float
    macro_f1: float
    confusion: list[list[int]]

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "track_accuracy": self.track_accuracy,
                "macro_f1": self.macro_f1}


def test_scores(model: nn.Module, split: FeatureSplit, n_classes: int) -> TestScores:
    """Score `model` (eval mode) on a split's segments and tracks: accuracy per segment,
    per track (the argmax of its segments' mean probability), macro F1, confusion."""
    from sklearn.metrics import f1_score  # here: importing it takes a second, and every command imports this module

    result = evaluate(model, split.x, split.labels, n_classes)
    predicted = result.probs.argmax(dim=1)
    f1 = f1_score(split.labels.numpy(), predicted.numpy(), labels=list(range(n_classes)),
                  average="macro", zero_division=0)
    return TestScores(result.accuracy, track_accuracy(result.probs, split.track, split.labels),
                      float(f1), result.confusion.tolist())


@dataclass(frozen=True)
class Exported:
    """An exported model: its weights and everything needed to use them on audio.

    `arch`: the architecture's keys (models.build_model); `hyper`: the trial's searched
    hyperparameters; the audio is cut at `sample_rate` into `segment_seconds` segments (a
    tail of `min_tail_seconds` or more padded) and turned into `feature` with
    `feature_params`, normalised with the training split's `stats`. `provenance`: the
    split and augmentation that produced the training data. Saved as plain data
    (`save`), so `load` reads it with `torch.load(weights_only=True)`."""

    model: str
    feature: str
    classes: list[str]
    input_shape: list[int]
    arch: dict[str, Any]
    hyper: dict[str, Any]
    sample_rate: int
    segment_seconds: float
    min_tail_seconds: float
    feature_params: dict[str, Any]
    stats: dict[str, torch.Tensor]
    state_dict: dict[str, torch.Tensor]
    trial_id: str
    val: dict[str, float]
    provenance: dict[str, Any]
    test: dict[str, Any] | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "torch": str(torch.__version__), "torchaudio": str(torchaudio.__version__),
        "python": platform.python_version()})  # str: TorchVersion is not plain data

    @classmethod
    def of(cls, best: Best, fs: FeatureSet, arch: dict[str, Any], hyper: dict[str, Any]) -> Exported:
        """The export of a pair's best checkpoint, trained on `fs`."""
        data = fs.params["data"]
        return cls(best.config["model"], fs.feature, list(fs.classes), list(fs.input_shape),
                   arch, hyper, fs.params["sample_rate"], data["segment_seconds"],
                   data["min_tail_seconds"], fs.params["feature_params"], dict(fs.stats),
                   best.state_dict, best.trial_id,
                   {k: best.metrics[k] for k in ("val_loss", "val_acc", "epoch")},
                   {"split": fs.params["split"], "augment": fs.params["augment"]})

    def rebuild(self) -> nn.Module:
        """The exported model, weights loaded, in eval mode: (batch, *input_shape) -> logits."""
        model = build_model(self.model, tuple(self.input_shape), len(self.classes), self.arch)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:  # missing, unexpected or differently shaped tensors
            why = str(err).splitlines()[-1].strip()
            raise UserError(f"the export's weights do not fit its {self.model} ({why}); the file "
                            "is damaged or was edited: export it again with tune_main.py") from None
        return model.eval()

    @functools.cached_property
    def net(self) -> nn.Module:
        """`rebuild()`, once: what `probabilities` runs."""
        return self.rebuild()

    def decode(self, path: Path) -> np.ndarray:
        """The file, mono at the model's rate, as training read it: (samples,) float32.
        audio.Unusable if it cannot be used."""
        return data.decode(path, self.sample_rate).numpy()

    @torch.no_grad()
    def probabilities(self, segments: np.ndarray) -> np.ndarray:
        """The mean of the segments' softmax: (n, samples) -> (n_classes,). The same
        `transforms.compute_feature` as the training data."""
        x = compute_feature(torch.from_numpy(segments), self.feature, self.sample_rate,
                            self.feature_params, self.stats)
        if list(x.shape[1:]) != list(self.input_shape):
            raise UserError(f"the model expects input {tuple(self.input_shape)} but its own "
                            f"feature parameters give {tuple(x.shape[1:])}; the export is "
                            "damaged, export it again with tune_main.py")
        return torch.cat([self.net(chunk).softmax(dim=1) for chunk in x.split(audio.BATCH)]).mean(dim=0).numpy()

    def save(self, paths: list[Path]) -> None:
        """Write the export to every path in `paths`, each atomically."""
        contents = {"format": FORMAT, **{f.name: getattr(self, f.name)
                                         for f in dataclasses.fields(self)}}
        for path in paths:
            with atomic_path(path) as tmp:
                torch.save(contents, tmp)

    @classmethod
    def load(cls, path: Path) -> Exported:
        """The export at `path`; UserError for a file that is not one of ours."""
        try:
            with warnings.catch_warnings():  # torch warns about a plain pickle's protocol first
                warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                        category=UserWarning)
                contents = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # weights_only refuses code; anything unreadable is not ours
            raise UserError(f"{path} is not a genre-ray model ({type(err).__name__}); "
                            "pass a file exported by tune_main.py into best_models/") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        found = contents.get("format") if isinstance(contents, dict) else None
        if str(found).startswith("genre-ray-model/") and found != FORMAT:
            raise UserError(f"{path} was exported by another version of genre-ray ({found}, this "
                            f"one reads {FORMAT}); export it again with this tune_main.py")
        if found != FORMAT or not required <= set(contents):
            raise UserError(f"{path} is not a genre-ray model (no {FORMAT} metadata); pass a file "
                            "exported by tune_main.py into best_models/")
        exported = cls(**{k: v for k, v in contents.items() if k in fields})
        if exported.feature == "spectrogram" and not all(
                isinstance(exported.stats.get(k), torch.Tensor) and exported.stats[k].numel()
                for k in ("mean", "std")):
            raise UserError(f"{path} lacks the normalisation statistics of its log-mels (stats "
                            "mean and std); the file is damaged: export it again with tune_main.py")
        return exported


def export_name(model: str, feature: str) -> str:
    return f"{model}_{feature}_best_model.pth"


@dataclass(frozen=True)
class PairExport:
    """A pair's export: the saved model, its test scores, its size, and its files (the
    .pth in --output-dir; the ONNX graph beside it, or why there is none)."""

    exported: Exported
    scores: TestScores
    params: int
    path: Path
    onnx_path: Path | None = None
    onnx_problem: str = ""


def export_pair(records: list[TrialRecord], sets: dict[str, FeatureSet], cfg: config.Config,
                folders: list[Path], load_state: Callable[[Any], dict]) -> PairExport | None:
    """The best checkpoint of one pair's `records` as an export, scored on the test split of
    the feature variant it trained on (`sets`: variant name -> set), saved into every
    folder of `folders` (the first is --output-dir); None if no trial saved a checkpoint."""
    best = best_of_pair(records, load_state)
    if best is None:
        return None
    _, hyper = TrialKeys.split(best.config)
    trained = config.tuned(cfg, hyper, best.config["feature"])
    fs = sets[variant_of(trained, best.config["feature"])]
    return save_scored(best, fs, dataclasses.asdict(trained.model), hyper, folders)


def save_scored(best: Best, fs: FeatureSet, arch: dict, hyper: dict, folders: list[Path]) -> PairExport:
    """`best` (built with `arch`, trained on `fs`) as an export scored on fs's test split,
    saved into every folder of `folders` (its path in the first)."""
    exported = Exported.of(best, fs, arch, hyper)
    net = exported.rebuild()
    scores = test_scores(net, fs.splits["test"], len(fs.classes))
    exported = dataclasses.replace(exported, test=scores.summary())
    name = export_name(exported.model, fs.feature)
    exported.save([folder / name for folder in folders])
    return PairExport(exported, scores, count_parameters(net), folders[0] / name)
