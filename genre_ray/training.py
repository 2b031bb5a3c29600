"""Stage training: the one plain-PyTorch loop every trial runs (no Ray here).

Data stays resident on the device and is batched by index: a permutation per epoch,
one gather per batch, no DataLoader, no per-item Python. Optimisers are fused and
conv2d weights channels_last (docs/benchmarks.md says what each buys). With
`precision: bf16` forward passes run under bf16 autocast (CPU and CUDA) and losses are
taken in fp32 on the logits (bench/gpu_sharing.py measures what it buys). `Trainer.fit`
runs N epochs and calls `on_epoch(metrics, evaluation)` after each: the seam the Ray
trainable uses to report and checkpoint. `Trainer.state_dict()` holds everything a
resume needs.

    python -m genre_ray.training [--data-dir D] [--model CEL] [--feature spectrogram]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from genre_ray import config
from genre_ray.errors import UserError, exit_on_user_error
from genre_ray.optim import OPTIMIZERS, SCHEDULERS

RESIDENT_BUDGET = 0.5  # of a GPU's free memory, that a trial's data may take (`resident`)

# `precision` (defaults.yaml `training`) -> the dtype forward passes autocast to; None:
# no autocast, fp32 throughout. Parameters, gradients and optimiser state stay fp32.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Evaluation:
    """loss, accuracy; probs: (n, n_classes); confusion: (n_classes, n_classes), rows = truth."""

    loss: float
    accuracy: float
    probs: torch.Tensor
    confusion: torch.Tensor


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(gpu_ids: Sequence[Any] | None = None) -> torch.device:
    """The device to train on. `gpu_ids`: the GPUs Ray assigned the trial
    (`ray.get_gpu_ids()`), or None outside Ray. A trial assigned none runs on the CPU even
    where CUDA is visible: the pinned Ray no longer sets CUDA_VISIBLE_DEVICES for a worker
    given zero GPUs, so a CPU trial on a GPU node sees every GPU, and using one would be
    unaccounted for. A trial assigned GPUs sees just those (Ray sets CUDA_VISIBLE_DEVICES),
    the first as cuda:0. Outside Ray: CUDA when present."""
    if gpu_ids is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} but PyTorch sees "
                        f"no CUDA device (torch {torch.__version__}); install a CUDA build of torch "
                        "on the GPU nodes, or run with --gpus-per-trial 0")
    return torch.device("cuda", 0)


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast to `PRECISIONS[precision]` on `device`'s type; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) on `device`, shuffled when a (CPU) generator is given.
    The order moves to `device` once, not a batch at a time: a pageable index copied per
    batch would synchronise a CUDA stream at every step."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.to(device).split(batch_size)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, batch_size: int, generator: torch.Generator,
                transform: nn.Module | None = None, precision: str = "fp32",
                label_smoothing: float = 0.0, mixup: float = 0.0) -> float:
    """One pass over (x: (n, *shape), y: (n,)) in shuffled batches; returns the mean loss.
    `precision`: a key of PRECISIONS, the forward pass's autocast; `label_smoothing` and
    `mixup` (alpha, `mixed`): of the training loss only (validation losses stay plain
    cross-entropy, comparable)."""
    model.train()
    total = torch.zeros((), device=_device(model))
    for idx in batches(len(x), batch_size, generator, x.device):
        xb, yb = _on(model, x[idx]), _on(model, y[idx])
        if transform is not None:
            xb = transform(xb)
        xb, targets = mixed(xb, yb, mixup)
        with autocast(xb.device, precision):
            logits = model(xb).float()
        loss = sum(weight * nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing)
                   for weight, target in targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
    mean = total.item() / len(x)  # one device sync per epoch, not per batch
    if not math.isfinite(mean):
        raise Diverged(f"training loss is {mean}; lower the learning rate")
    return mean


def mixed(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, list]:
    """Mixup (Zhang et al. 2018): each item of x (batch, ...) blended with another of the
    batch, weights lam and 1 - lam, lam ~ Beta(alpha, alpha) per batch; returns the mixed
    batch and the loss's [(weight, labels (batch,))]. alpha 0: x as it is, [(1.0, y)]."""
    if alpha == 0:
        return x, [(1.0, y)]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # the CPU RNG, in state_dict
    other = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[other], [(lam, y), (1 - lam, y[other])]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int,
             batch_size: int = 256, precision: str = "fp32") -> Evaluation:
    """Loss, accuracy, class probabilities and confusion matrix of (x, y) in eval mode;
    forward passes autocast as `precision` says, the rest in fp32."""
    model.eval()
    y = _on(model, y)
    with autocast(y.device, precision):
        logits = torch.cat([model(_on(model, x[idx])) for idx in batches(len(x), batch_size,
                                                                          device=x.device)])
    logits = logits.float()
    loss = nn.functional.cross_entropy(logits, y).item()
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(y * n_classes + pred, minlength=n_classes ** 2)
    return Evaluation(loss, (pred == y).float().mean().item(), logits.softmax(dim=1).cpu(),
                      confusion.reshape(n_classes, n_classes).cpu())


def track_accuracy(probs: torch.Tensor, track: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy per track, a track's class being the argmax of its segments' mean
    probability. probs: (n, n_classes); track (index of each segment's track), labels: (n,)."""
    n_tracks = int(track.max()) + 1
    sums = torch.zeros(n_tracks, probs.shape[1]).index_add_(0, track, probs)
    truth = torch.zeros(n_tracks, dtype=torch.long).scatter_(0, track, labels)
    return (sums.argmax(dim=1) == truth).float().mean().item()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """`t` on the model's device (a no-op when the data is resident there). A batch of
    host-resident data is pinned first: a copy from pageable memory would block the host
    until the GPU has it, a per-batch synchronisation; from pinned memory it is queued
    (PyTorch's pinned-memory cache keeps the block until the copy is done)."""
    device = _device(model)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Trainer:
    """A model, its optimiser and schedule, and the train/val tensors it fits.

    train, val: (x: (n, *input_shape), y: (n,)). Data is moved to the device once when
    it fits (see `resident`), else kept in host memory and sent batch by batch.
    `device_share`: the fraction of the device this trainer was given (Ray's 0.25 GPU):
    trials sharing a GPU start together and each sees the same free memory, so each
    may take only its share of the budget.
    """

    def __init__(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], settings: config.Training, *,
                 n_classes: int, epochs: int, seed: int = 0, device: torch.device | None = None,
                 transform: nn.Module | None = None, device_share: float = 1.0) -> None:
        self.device = device or pick_device()
        # channels_last changes only 4-D (conv2d) weights: oneDNN and cuDNN run those
        # fastest so (CEL epochs about 1/5 shorter on the CPU: docs/benchmarks.md)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.train_xy = resident(train, self.device, RESIDENT_BUDGET * device_share)
        self.val_xy = resident(val, self.device, RESIDENT_BUDGET * device_share)
        self.n_classes, self.batch_size = n_classes, settings.batch_size
        self.eval_batch_size, self.precision = settings.eval_batch_size, settings.precision
        self.label_smoothing, self.mixup = settings.label_smoothing, settings.mixup
        self.transform = transform.to(self.device) if transform is not None else None
        self.optimizer = OPTIMIZERS[settings.optimizer](model.parameters(), settings.learning_rate,
                                                        settings.weight_decay)
        self.scheduler = SCHEDULERS[settings.scheduler](self.optimizer, epochs)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def evaluate(self) -> Evaluation:
        return evaluate(self.model, *self.val_xy, self.n_classes, self.eval_batch_size,
                        self.precision)

    def fit(self, epochs: int, on_epoch: Callable[[dict[str, float], Evaluation], bool | None]
            = lambda metrics, evaluation: None) -> list[dict[str, float]]:
        """Train until `epochs` in total (continuing after a resume); `on_epoch` may
        return True to stop early. Returns the metrics of each epoch run here."""
        history = []
        while self.epoch < epochs:
            train_loss = train_epoch(self.model, self.optimizer, *self.train_xy, self.batch_size,
                                     self.generator, self.transform, self.precision,
                                     self.label_smoothing, self.mixup)
            result = self.evaluate()
            if not math.isfinite(result.loss):
                raise Diverged(f"validation loss is {result.loss}; lower the learning rate")
            self.epoch += 1
            metrics = {"epoch": self.epoch, "train_loss": train_loss, "val_loss": result.loss,
                       "val_acc": result.accuracy, "lr": self.optimizer.param_groups[0]["lr"]}
            self._step_scheduler(result.loss)
            history.append(metrics)
            if on_epoch(metrics, result):
                break
        return history

    def _step_scheduler(self, val_loss: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        elif self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser, scheduler, RNGs (shuffling; dropout, masks and noise on the CPU
        and on the trainer's GPU) and epoch: everything a resume needs to continue exactly
        as an uninterrupted run. Only the trainer's own GPU: a CPU trial on a GPU node
        must not open a CUDA context on every GPU it can see, and a resume may see fewer."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":  # dropout, masks, noise
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch = state["epoch"]


def resident(split: tuple[torch.Tensor, ...], device: torch.device,
             budget: float = RESIDENT_BUDGET) -> tuple[torch.Tensor, ...]:
    """A split's tensors (x, y) moved to `device` together if they take under `budget` of
    its free memory; otherwise all left where they are (a trial's data: the node's shared
    copy), and batches are copied as they are used. Never pinned: pinning copies the
    whole tensor, a second host copy of data every trial on the node already shares."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(t.nbytes for t in split) >= budget * free:
            return split
    return tuple(t.to(device) for t in split)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Train one model on one feature without Ray and print its per-epoch metrics."""
    from genre_ray.features import build_features
    from genre_ray.transforms import batch_augmentation, canonical_feature
    from genre_ray.models import build_model, count_parameters
    from genre_ray.search_space import first_point

    run = config.load()
    parser = argparse.ArgumentParser(prog="python -m genre_ray.training", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, help="GTZAN folder (default: the embedded dataset)")
    parser.add_argument("--model", default="CEL")
    parser.add_argument("--feature", default="spectrogram")
    parser.add_argument("--epochs", type=int, default=run.search.max_epochs)
    parser.add_argument("--seed", type=int, default=run.run.seed)
    parser.add_argument("--config", default="{}", help='JSON hyperparameters over the search space\'s '
                                                       'first point, e.g. \'{"learning_rate": 3e-4}\'')
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= config.MAX_EPOCHS:
        raise UserError(f"--epochs must be in [1, {config.MAX_EPOCHS}], got {args.epochs}")
    try:
        hyper = json.loads(args.config)
    except ValueError as err:
        raise UserError(f"--config is not JSON ({err}); write e.g. '{{\"learning_rate\": 3e-4}}'") from None
    if not isinstance(hyper, dict):
        raise UserError(f"--config must be a JSON object of hyperparameters, got {args.config}")
    run, feature = config.replaced(run, {"run.seed": args.seed}), canonical_feature(args.feature)
    cfg = config.tuned(run, {**first_point(args.model, run.run.search_spaces, feature), **hyper}, feature)
    if args.data_dir is None:
        from genre_ray.synthetic import embedded_dataset

        args.data_dir = embedded_dataset()
    fs = build_features(args.data_dir, feature, cfg)
    seed_everything(args.seed)
    model = build_model(args.model, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    print(f"{args.model} on {fs.feature} {fs.input_shape}: {count_parameters(model):,} parameters")
    split = {name: (s.x, s.labels) for name, s in fs.splits.items()}
    trainer = Trainer(model, split["train"], split["val"], cfg.training, n_classes=len(fs.classes),
                      epochs=args.epochs, seed=args.seed,
                      transform=batch_augmentation(fs.feature, cfg.batch_augment.of(fs.feature)))
    trainer.fit(args.epochs, lambda m, _: print(
        f"epoch {m['epoch']:3d}  train_loss {m['train_loss']:.3f}  val_loss {m['val_loss']:.3f}  "
        f"val_acc {m['val_acc']:.3f}", flush=True))
    return 0


if __name__ == "__main__":
    main()
