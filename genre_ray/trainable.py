"""Stage trainable: one Ray Tune trial trains one (model, feature, config) with the shared loop.

The trial reads its `TrialData` from the object store (put once per run by `share`):
the feature's train and val splits as numpy arrays, which Ray maps from the node's shared
memory without a copy (docs/design.md#pitfall-object-store-zero-copy), so every trial on a node reads one copy and
holds none of its own; the test split never reaches a trial. It builds the model and
runs `training.Trainer` on the device Ray assigned it (`training.pick_device`). It
reports every epoch and checkpoints its best epoch's state at ASHA's rungs and its last
epoch (`BestSaver`); the checkpoint holds everything a resume needs, so a retried or
restored trial continues from its best epoch, not from epoch 0. It reads no file but
its checkpoint.

A trial whose loss turns NaN or infinite ends itself: its last result carries
`diverged` (the reason) and a NaN `val_loss`, which the tuner tells Optuna as FAIL
(docs/design.md#pitfall-nan-losses), and Tune does not retry it. Any other error (out of memory, a lost
worker) fails the trial and Tune retries it from its checkpoint, a bounded number of times.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import torch
from ray import tune

from genre_ray import config, cost
from genre_ray.export import CHECKPOINT_METRIC
from genre_ray.features import FeatureSet, variant_of
from genre_ray.models import build_model
from genre_ray.training import Diverged, Evaluation, Trainer, pick_device, seed_everything
from genre_ray.transforms import FrontEnd, batch_augmentation, unit_stats
from genre_ray.trials import TrialKeys

STATE_FILE = "trial_state.pt"
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None  # glibc


@dataclass(frozen=True)
class TrialData:
    """What a trial trains on: x (n, *input_shape) float32 and labels (n,) int64 of the
    train and val splits of one feature, as numpy arrays (the object store shares those)."""

    feature: str
    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def share(fs: FeatureSet) -> ray.ObjectRef:
    """Put `fs`'s train and val splits in the object store, once per run. The arrays are
    plain views of the cache's memory maps: Ray copies them once into shared memory."""
    def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
        part = fs.splits[name]
        return np.asarray(part.x.numpy()), np.asarray(part.labels.numpy())

    return ray.put(TrialData(fs.feature, fs.classes, arrays("train"), arrays("val")))


def tensors(arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    """Torch views of the object store's read-only arrays, without a copy. No code writes
    to them: the training loop gathers batches into new tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return tuple(torch.from_numpy(a) for a in arrays)


def train_pair(trial_config: Mapping[str, Any], feature_refs: Mapping[str, ray.ObjectRef],
               run_cfg: config.Config) -> None:
    """The function trainable: `trial_config` = TrialKeys + sampled hyperparameters;
    `run_cfg`: the run's configuration, which the hyperparameters go into; `feature_refs`:
    features.variant_name -> its shared TrialData (the features of the trial's front end)."""
    release_memory()  # what an earlier trial in this (reused) worker freed
    quiet_exit_in_callbacks()
    keys, hyper = TrialKeys.split(trial_config)
    cfg = config.tuned(run_cfg, hyper, keys.feature)
    _train(keys, cfg, feature_refs[variant_of(cfg, keys.feature)])


def _train(keys: TrialKeys, cfg: config.Config, feature_ref: ray.ObjectRef) -> None:
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint
    data: TrialData = ray.get(feature_ref)
    seed_everything(keys.seed)
    model = build_model(keys.model, data.input_shape, len(data.classes), dataclasses.asdict(cfg.model))
    trainer = Trainer(model, tensors(data.train), tensors(data.val), cfg.training,
                      n_classes=len(data.classes), epochs=keys.max_epochs, seed=keys.seed,
                      device=pick_device(ray.get_gpu_ids()),
                      transform=batch_augmentation(data.feature, cfg.batch_augment.of(data.feature)),
                      device_share=ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    spent = _cost(model, data.feature, cfg, trainer.device)
    excluded = cost.violations(spent, cfg.search)
    if excluded:  # pruned before training: no epoch, no checkpoint, so never exported
        tune.report({"epoch": 0, "val_loss": math.nan, "excluded": "; ".join(excluded),
                     **spent.metrics()})  # Tune wants the metric in every result
        return
    saver = BestSaver(trainer, set(keys.checkpoint_epochs), spent.metrics())
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        saver.resume(load_trial_state(checkpoint))
    try:
        trainer.fit(keys.max_epochs, saver.report)
    except Diverged as err:  # ends the trial, never retried: the same config diverges again
        saver.report_end({"epoch": trainer.epoch + 1, "val_loss": math.nan, "diverged": str(err)})


def _cost(model: torch.nn.Module, feature: str, cfg: config.Config,
          device: torch.device) -> cost.Cost:
    """The trial's model served from raw segments (front end included), measured on its device."""
    front = FrontEnd(feature, cfg.data.sample_rate, cfg.features.of(feature), unit_stats(feature))
    samples = round(cfg.data.segment_seconds * cfg.data.sample_rate)
    return cost.measure(cost.Served(front.to(device), model), samples, device)


class BestSaver:
    """Reports every epoch; checkpoints the best epoch's state, but only at
    `checkpoint_epochs` (ASHA's rungs and the last epoch, tuning.checkpoint_epochs) or when
    the trial ends early, and only when a better epoch came since the last checkpoint.

    Why not at every improvement (docs/design.md#trainable-checkpoint-contract): with ~1 s
    epochs on a GPU, a full checkpoint (up to ~170 MB with Adam's state for MLP on
    waveforms) plus the experiment snapshot Tune takes after each one would make storage
    and the driver the limit. ASHA
    reads a trial's loss only at rungs, where it may stop it, so a checkpoint there holds
    the best state the trial will ever have had. In between, the best state waits in host
    memory (copied off the device, so checkpoints are device-neutral: CPU tensors on disk).
    A retried or resumed trial continues from the last checkpoint's best epoch and, its
    RNGs restored, replays the epochs after it exactly."""

    def __init__(self, trainer: Trainer, checkpoint_epochs: set[int],
                 constant: dict[str, Any] | None = None) -> None:
        self.trainer, self.checkpoint_epochs = trainer, checkpoint_epochs
        self.constant = constant or {}  # reported with every epoch (the model's cost)
        self.best_loss, self.pending = math.inf, None

    def resume(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.best_loss = state["metrics"]["val_loss"]

    def report(self, metrics: dict[str, float], evaluation: Evaluation) -> None:
        metrics = {**metrics, **self.constant}
        if metrics["val_loss"] < self.best_loss:
            self.best_loss = metrics["val_loss"]
            self.pending = {"trainer": on_cpu(self.trainer.state_dict()), "metrics": metrics,
                            "device": str(self.trainer.device)}  # where it trained, for bench.gpu_check
            metrics = {**metrics, "val_confusion": evaluation.confusion.tolist()}
        if metrics["epoch"] in self.checkpoint_epochs:
            self.report_end(metrics)
        else:
            tune.report(metrics)

    def report_end(self, metrics: dict[str, Any]) -> None:
        """Report `metrics` with a checkpoint of the best state, if one is pending."""
        metrics = {**metrics, **self.constant}
        if self.pending is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(self.pending, Path(folder) / STATE_FILE)
            tune.report({**metrics, CHECKPOINT_METRIC: self.pending["metrics"]["val_loss"]},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        self.pending = None


def on_cpu(state: Any) -> Any:
    """A copy of `state` (nested dicts, lists and tensors) with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(value) for value in state)
    return state


def release_memory() -> None:
    """Give what earlier trials freed back to the node: Tune reuses a worker for trial after
    trial (reuse_actors), and freed memory that glibc's heap or PyTorch's CUDA cache keeps
    would count against the next trial (bench/memory.py: a worker's private memory grew
    with the trials it hosted) and, on a GPU, look used to `training.resident`. Called as a
    trial starts, not as one ends: Tune gives an ending trial's thread 2 s to finish
    before it reuses the worker, and a release that ran over that failed the next trial."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def quiet_exit_in_callbacks() -> None:
    """Keep a worker's exit out of the run's output. Ray ends a worker with SIGTERM, whose
    handler raises SystemExit; when it lands in a weakref callback or a `__del__` (the
    garbage collector's work), Python cannot raise it there and prints it with a traceback
    as "Exception ignored", which the driver shows as the trial's. Other exceptions there
    are still printed."""
    if sys.unraisablehook is not _unraisable:
        _unraisable.printed_by = sys.unraisablehook
        sys.unraisablehook = _unraisable


def _unraisable(args: Any) -> None:
    if not issubclass(args.exc_type, SystemExit):
        _unraisable.printed_by(args)


def load_trial_state(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """The state a trial saved in `checkpoint`: {"trainer": ..., "metrics": its epoch's}, tensors
    on the CPU whatever device saved them (a GPU trial's, read by a driver without one)."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
