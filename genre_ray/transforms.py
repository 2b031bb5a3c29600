"""Feature transforms, thin nn.Modules over functions as torchaudio's are: each feature's
front end, from raw segments to a model's input, and the batch augmentations applied to
training batches on the device.

    waveform:     (n, samples) -> standardised per segment       -> (n, samples)
    spectrogram:  (n, samples) -> MelSpectrogram -> AmplitudeToDB -> per-mel-band
                  standardisation with the training split's stats -> (n, n_mels, frames)

`FrontEnd` is the whole path (`compute_feature` runs it a chunk at a time): the feature
store (genre_ray.features) caches its output, and the trainable, `genre_ray.predict` and
the ONNX export run it on raw segments.
"""
from __future__ import annotations

from typing import Any

import torch
import torchaudio.transforms as T

from genre_ray.errors import UserError

FEATURES = ("waveform", "spectrogram")
ALIASES = {"spectogram": "spectrogram"}  # the original notebook's spelling
CHUNK = 64  # segments per transform call: bounds peak memory


def canonical_feature(name: str) -> str:
    """The feature's canonical name; accepts the original notebook's `spectogram`."""
    name = ALIASES.get(name, name)
    if name not in FEATURES:
        raise UserError(f"unknown feature {name!r}; choose one of {', '.join(FEATURES)} "
                        "(`spectogram` is accepted for spectrogram)")
    return name


def standardise(waves: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per segment; silence stays zero: (n, samples) -> same."""
    std, mean = torch.std_mean(waves, dim=1, keepdim=True)
    return (waves - mean).div_(std.clamp_min(eps))


class Standardise(torch.nn.Module):
    """`standardise` as a module: (n, samples) -> same."""

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return standardise(waves)


class LogMel(torch.nn.Module):
    """Log-mel spectrogram in dB, each item clamped to its own top_db:
    (n, samples) -> (n, n_mels, frames)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
                 f_min: float, top_db: float) -> None:
        super().__init__()
        self.mel = T.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                    n_mels=n_mels, f_min=f_min)
        self.to_db = T.AmplitudeToDB(stype="power", top_db=top_db)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        # (n, 1, mels, frames): AmplitudeToDB applies top_db per item only with a channel dim
        return self.to_db(self.mel(waves).unsqueeze(1)).squeeze(1)


def transform(feature: str, sample_rate: int, params: dict[str, Any]) -> torch.nn.Module:
    """A feature's transform before normalisation: (n, samples) -> (n, *input_shape)."""
    return LogMel(sample_rate, **params) if feature == "spectrogram" else Standardise()


class FrontEnd(torch.nn.Module):
    """A feature's whole front end, its training statistics' normalisation included:
    (n, samples) -> (n, *input_shape), the model's input. `stats`: FeatureSet.stats."""

    def __init__(self, feature: str, sample_rate: int, params: dict[str, Any],
                 stats: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.feature = canonical_feature(feature)
        self.transform = transform(self.feature, sample_rate, params)
        self.stat_names = sorted(stats)
        for name, value in stats.items():
            self.register_buffer(name, value.detach().clone().float())

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        stats = {name: getattr(self, name) for name in self.stat_names}
        return normalise(self.transform(waves), self.feature, stats)


@torch.no_grad()
def compute_feature(waves: torch.Tensor, feature: str, sample_rate: int,
                    feature_params: dict[str, Any], stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """`feature` of segments, normalised with training `stats` (empty for waveform):
    (n, samples) -> (n, *input_shape), a chunk at a time (bounds peak memory). The one path
    from audio to model input, shared by the cached dataset features, `genre_ray.predict`
    and the ONNX export (FrontEnd)."""
    front = FrontEnd(feature, sample_rate, feature_params, stats)
    return torch.cat([front(chunk) for chunk in waves.split(CHUNK)])


def unnormalised(waves: torch.Tensor, feature: str, sample_rate: int,
                 params: dict[str, Any]) -> torch.Tensor:
    """`transform` of segments, a chunk at a time (bounds peak memory)."""
    step = transform(feature, sample_rate, params)
    return torch.cat([step(chunk) for chunk in waves.split(CHUNK)])


def normalise(x: torch.Tensor, feature: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """`x` of `feature` normalised with training `stats` (per mel band; none for waveform)."""
    if feature == "waveform":
        return x
    return (x - stats["mean"][:, None]) / stats["std"][:, None].clamp_min(1e-5)


def unit_stats(feature: str) -> dict[str, torch.Tensor]:
    """Statistics that leave a feature as it is (a probe of its shape needs some)."""
    return {} if feature == "waveform" else {"mean": torch.zeros(1), "std": torch.ones(1)}


class GaussianNoise(torch.nn.Module):
    """Adds N(0, std^2) noise: (batch, ...) -> same."""

    def __init__(self, noise_std: float) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise_std * torch.randn_like(x)


class SpecMasking(torch.nn.Module):
    """SpecAugment-style masks, drawn per item: (batch, n_mels, frames) -> same."""

    def __init__(self, freq_mask: int, time_mask: int) -> None:
        super().__init__()
        self.masks = torch.nn.Sequential(T.FrequencyMasking(freq_mask, iid_masks=True),
                                         T.TimeMasking(time_mask, iid_masks=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.masks(x.unsqueeze(1)).squeeze(1)  # iid masks need (batch, channel, ...)


BATCH_AUGMENTATIONS = {"waveform": GaussianNoise, "spectrogram": SpecMasking}


def batch_augmentation(feature: str, params: dict[str, Any]) -> torch.nn.Module:
    """The on-the-fly training augmentation of a feature (`params`: config.BatchAugment.of)."""
    return BATCH_AUGMENTATIONS[canonical_feature(feature)](**params)
