"""The architectures (MLP, MLP2, CEL, CEL2, CEL3), built from (input shape, classes, config).

Inputs are batches of one feature kind: waveforms `(batch, samples)` or log-mel
spectrograms `(batch, n_mels, frames)`; every model returns logits `(batch, n_classes)`.
The CEL family is one class, `ConvNet`, whose activation comes from the registry.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from genre_ray import config
from genre_ray.errors import UserError


def is_int(value: Any) -> bool:
    """An integer that is not a bool (config values: `True` is not 1 layer)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


class MLP(nn.Module):
    """The notebook's MLP: `(batch, *input_shape) -> (batch, n_classes)`, three linear layers."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, nodes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), nodes), nn.ReLU(),
            nn.Linear(nodes, nodes), nn.ReLU(), nn.Linear(nodes, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLP2(nn.Module):
    """`hidden_layers` blocks of [Linear, BatchNorm1d, ReLU, Dropout], then a linear head.

    `(batch, *input_shape) -> (batch, n_classes)`; the input width is derived from
    `input_shape`, so spectrograms work too (the notebook hard-coded the waveform length).
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int,
                 nodes: int, hidden_layers: int, dropout_prob: float):
        super().__init__()
        widths = [math.prod(input_shape)] + [nodes] * hidden_layers
        blocks = [
            nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(), nn.Dropout(dropout_prob))
            for i, o in zip(widths, widths[1:])]
        self.net = nn.Sequential(nn.Flatten(), *blocks, nn.Linear(nodes, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """The CEL family: conv blocks, average over time, dense blocks, linear head.

    `(batch, samples) -> (batch, n_classes)` with 1-D convolutions, or
    `(batch, n_mels, frames) -> (batch, n_classes)` with 2-D ones. Each of the
    `hidden_layers` blocks is [conv (kernel 3, padding 1), BatchNorm, activation,
    MaxPool 2, Dropout]. Block i is `min(nodes, max(8, nodes // 2**(hidden_layers-1-i)))`
    channels wide, so the last is `nodes` wide: each pool quarters the area of a 2-D map,
    so doubling channels keeps every block's cost about equal; at the notebook's settings on
    a 64x108 spectrogram that is ~17M multiply-adds per item instead of ~85M at a constant
    width of 64, which matters on a 2-core CPU. 1-D input first goes through a strided stem
    conv (`stem_kernel`, `stem_stride`) as width-3 convs over 110,250 raw samples cost far
    too much; the stem keys are ignored on 2-D input. Pools use `ceil_mode`, so each halves
    a dimension rounding up and a dimension never falls below 1: any input size works,
    except a waveform shorter than `stem_kernel` (UserError).

    The conv maps are summarised over time only (`pooling`: their mean, or mean and max
    side by side, which keeps how strong a pattern's peak is, not only how common): a
    spectrogram keeps its pooled frequency axis, since where in frequency a pattern sits is
    what tells genres apart (averaging over frequency too made pure tones an octave apart
    indistinguishable). The head thus takes `stats * nodes * ceil(n_mels / 2**hidden_layers)`
    inputs (`stats * nodes` for waveforms; stats 1 or 2): small
    whatever the clip length (the notebook flattened conv maps into 100M-parameter heads).
    Then `dense_layers` blocks of [Linear(-> nodes), activation, Dropout] and
    Linear(nodes, n_classes).
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int,
                 activation: Callable[[], nn.Module], nodes: int, hidden_layers: int,
                 dropout_prob: float, dense_layers: int, stem_kernel: int, stem_stride: int,
                 pooling: str):
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise UserError(f"convolutional models take (samples,) or (n_mels, frames) input, "
                            f"not shape {tuple(input_shape)}")
        conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if len(input_shape) == 1
                            else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
        widths = [min(nodes, max(8, nodes // 2 ** (hidden_layers - 1 - i)))
                  for i in range(hidden_layers)]
        stem = ([] if len(input_shape) == 2
                else _stem(input_shape[0], widths[0], activation, stem_kernel, stem_stride))
        blocks = [nn.Sequential(conv(i, o, 3, padding=1), norm(o), activation(),
                                pool(2, ceil_mode=True), nn.Dropout(dropout_prob))
                  for i, o in zip([widths[0] if stem else 1] + widths, widths)]
        bands = math.ceil(input_shape[0] / 2 ** hidden_layers) if len(input_shape) == 2 else 1
        self.pool, stats = POOLINGS[pooling]
        widths_in = [nodes * bands * stats] + [nodes] * dense_layers
        dense = [nn.Sequential(nn.Linear(i, nodes), activation(), nn.Dropout(dropout_prob))
                 for i in widths_in[:-1]]
        self.features = nn.Sequential(*stem, *blocks)
        self.head = nn.Sequential(*dense, nn.Linear(widths_in[-1], n_classes))

    def forward(self, x: Tensor) -> Tensor:
        maps = self.features(x.unsqueeze(1))  # (batch, nodes, [bands,] time)
        return self.head(self.pool(maps).flatten(1))


# Keys added after models were exported, with the value every model had before: an older
# export (which lacks them) rebuilds as it was trained.
ADDED_LATER = {"pooling": "mean"}
# How ConvNet summarises its maps over time: (batch, nodes, [bands,] time) ->
# (batch, stats * nodes[, bands]), and `stats`, the statistics per channel.
POOLINGS: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {
    "mean": (lambda maps: maps.mean(dim=-1), 1),
    "meanmax": (lambda maps: torch.cat([maps.mean(dim=-1), maps.amax(dim=-1)], dim=1), 2),
}


def _stem(samples: int, width: int, activation: Callable[[], nn.Module],
          kernel: int, stride: int) -> list[nn.Module]:
    """Conv1d(1, width, kernel, stride), BatchNorm, activation.

    `(batch, 1, samples) -> (batch, width, (samples - kernel) // stride + 1)`.
    """
    if samples < kernel:
        raise UserError(f"a waveform of {samples} samples is shorter than stem_kernel={kernel}; "
                        f"lower stem_kernel or use longer segments")
    return [nn.Conv1d(1, width, kernel, stride), nn.BatchNorm1d(width), activation()]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture: `build(input_shape, n_classes, **keys)`."""

    build: Callable[..., nn.Module]
    keys: frozenset[str]


_CONV_KEYS = frozenset({"nodes", "hidden_layers", "dropout_prob", "dense_layers", "stem_kernel",
                        "stem_stride", "pooling"})
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "CEL": nn.ReLU, "CEL2": functools.partial(nn.LeakyReLU, 0.1), "CEL3": nn.ELU}
MODELS: dict[str, ModelSpec] = {
    "MLP": ModelSpec(MLP, frozenset({"nodes"})),
    "MLP2": ModelSpec(MLP2, frozenset({"nodes", "hidden_layers", "dropout_prob"})),
    **{name: ModelSpec(functools.partial(ConvNet, activation=act), _CONV_KEYS)
       for name, act in ACTIVATIONS.items()},
}


def model_keys(name: str) -> frozenset[str]:
    """The config keys architecture `name` reads (others are ignored by it)."""
    return _spec(name).keys


def build_model(name: str, input_shape: tuple[int, ...], n_classes: int,
                arch: Mapping[str, Any]) -> nn.Module:
    """Architecture `name` for inputs `(batch, *input_shape)` and `n_classes` outputs.

    `arch`: a value for each key the architecture takes (config.Model's fields: the run's
    `model` section with a trial's searched keys in place); other keys are ignored. A
    missing key (but those of ADDED_LATER) or a bad value raises UserError.
    """
    spec = _spec(name)
    arch = {**ADDED_LATER, **arch}
    missing = sorted(spec.keys - set(arch))
    if missing:
        raise UserError(f"model {name} needs config key(s) {', '.join(missing)}")
    values = {key: config.checked("model", key, arch[key]) for key in sorted(spec.keys)}
    return spec.build(tuple(input_shape), n_classes, **values)


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters in `model`."""
    return sum(p.numel() for p in model.parameters())


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]
