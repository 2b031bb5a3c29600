"""Stage features: waveform | log-mel spectrogram, augmentation, and their disk cache.

    segments (data)  -> time stretch + pitch shift copies of training segments (once)
                     -> `waveform`: per-segment standardised samples      (n, samples)
                     -> `spectrogram`: MelSpectrogram -> AmplitudeToDB ->
                        per-mel-band standardisation with training stats  (n, n_mels, frames)

Both steps are cached on disk, keyed by the dataset's files (names, sizes, mtimes),
the split, every parameter and the library versions, so a second call loads instead
of recomputing. Entries are written atomically and carry a checksum: a corrupt entry
is reported, rebuilt and replaced. Masking (spectrogram) and noise (waveform) are
applied on the fly to training batches, on the device, by `batch_augmentation`.
`compute_feature` is the one path from segments to model input: the cached splits and
`genre_ray.predict` both go through it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchaudio
import torchaudio.transforms as T

from genre_ray import data
from genre_ray.config import cache_dir, defaults
from genre_ray.errors import UserError
from genre_ray.files import atomic_path

FEATURES = ("waveform", "spectrogram")
ALIASES = {"spectogram": "spectrogram"}  # the seed notebook's spelling
CACHE_VERSION = 2  # bump when the computation changes, so old entries are not reused
CHUNK = 64  # segments per transform call: bounds peak memory

log = logging.getLogger(__name__)


def canonical_feature(name: str) -> str:
    """The feature's canonical name; accepts the seed's `spectogram`."""
    name = ALIASES.get(name, name)
    if name not in FEATURES:
        raise UserError(f"unknown feature {name!r}; choose one of {', '.join(FEATURES)} "
                        "(`spectogram` is accepted for spectrogram)")
    return name


@dataclass
class FeatureSplit:
    """x: (n, *input_shape) float32; labels, track: (n,) int64 (track indexes track_ids)."""

    x: torch.Tensor
    labels: torch.Tensor
    track: torch.Tensor
    track_ids: list[str]


@dataclass
class FeatureSet:
    """One feature of a dataset, every split, plus what produced it (plain data)."""

    feature: str
    classes: list[str]
    splits: dict[str, FeatureSplit]
    params: dict[str, Any]  # sample rate, segment length, split, augmentation, feature params
    stats: dict[str, torch.Tensor]  # normalisation statistics from the training split
    report: dict[str, list[str]] = field(default_factory=dict)  # data.SegmentSet.notes()
    from_cache: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].x.shape[1:])


def build_features(data_dir: Path, feature: str, *, split: str | Path | None = None,
                   seed: int | None = None, cache: Path | None = None) -> FeatureSet:
    """The feature set of `data_dir` for `feature`, from the cache when it is there."""
    feature = canonical_feature(feature)
    split_params = defaults("split")
    params = {"data": defaults("data"), "augment": defaults("augment"),
              "split": {"kind": str(split or split_params["kind"]),
                        "seed": split_params["seed"] if seed is None else seed,
                        "fractions": split_params["fractions"]}}
    root = Path(cache or cache_dir()) / "features"
    segments_key = _key(params, _fingerprint(data_dir, params["split"]["kind"]))
    feature_params = defaults("features")[feature]
    feature_key = _key({"segments": segments_key, "feature": feature, "params": feature_params})
    entry = root / f"{feature}-{feature_key}.pt"
    cached = _read_entry(entry)
    if cached is not None:
        return _feature_set(cached, from_cache=True)
    waves = _read_entry(root / f"segments-{segments_key}.pt")
    if waves is None:
        waves = _segments_entry(data_dir, params)
        _write_entry(root / f"segments-{segments_key}.pt", waves)
    built = _feature_entry(waves, feature, feature_params)
    _write_entry(entry, built)
    return _feature_set(built, from_cache=False)


# ---- computation -----------------------------------------------------------------

def augment(waves: torch.Tensor, sample_rate: int, params: dict[str, Any],
            generator: torch.Generator) -> torch.Tensor:
    """Time-stretched and pitch-shifted copies: (n, samples) -> (2 * copies * n, samples)."""
    out = []
    for _ in range(params["copies"]):
        low, high = params["time_stretch"]
        rates = low + (high - low) * torch.rand(len(waves), generator=generator)
        out.append(torch.stack([time_stretch(w, r) for w, r in zip(waves, rates.tolist())]))
        low, high = params["pitch_shift"]
        out.append(pitch_shift(waves, sample_rate,
                               torch.randint(low, high + 1, (len(waves),), generator=generator)))
    return torch.cat(out)


def pitch_shift(waves: torch.Tensor, sample_rate: int, steps: torch.Tensor) -> torch.Tensor:
    """Shift each segment by its own whole number of semitones: (n, samples) -> same."""
    shifted = waves.clone()
    for n in steps.unique().tolist():
        shift = T.PitchShift(sample_rate, n)  # builds its resampling kernel once per step
        chosen = (steps == n).nonzero().squeeze(1)
        for idx in chosen.split(CHUNK):
            shifted[idx] = shift(waves[idx])
    return shifted


def time_stretch(wave: torch.Tensor, rate: float, n_fft: int = 1024) -> torch.Tensor:
    """Change tempo by `rate` keeping pitch (phase vocoder); zero-padded or cut to the
    input's length: (samples,) -> (samples,)."""
    hop = n_fft // 4
    spec = T.Spectrogram(n_fft=n_fft, hop_length=hop, power=None)(wave)
    stretched = T.TimeStretch(hop_length=hop, n_freq=n_fft // 2 + 1)(spec, rate)
    out = T.InverseSpectrogram(n_fft=n_fft, hop_length=hop)(stretched)
    return torch.nn.functional.pad(out, (0, max(0, wave.numel() - out.numel())))[: wave.numel()]


def standardise(waves: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per segment; silence stays zero: (n, samples) -> same."""
    centred = waves - waves.mean(dim=1, keepdim=True)
    return centred / centred.std(dim=1, keepdim=True).clamp_min(eps)


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


@torch.no_grad()
def compute_feature(waves: torch.Tensor, feature: str, sample_rate: int,
                    feature_params: dict[str, Any], stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """`feature` of segments, normalised with training `stats` (empty for waveform):
    (n, samples) -> (n, *input_shape). The one path from audio to model input, shared by
    the cached dataset features and `genre_ray.predict`."""
    feature = canonical_feature(feature)
    return _normalise(_unnormalised(waves, feature, sample_rate, feature_params), feature, stats)


def _unnormalised(waves: torch.Tensor, feature: str, sample_rate: int,
                  params: dict[str, Any]) -> torch.Tensor:
    """Standardised segments, or log-mels in chunks (bounds peak memory)."""
    if feature == "waveform":
        return standardise(waves)
    logmel = LogMel(sample_rate, **params)
    return torch.cat([logmel(c) for c in waves.split(CHUNK)])


def _feature_stats(x: torch.Tensor, feature: str) -> dict[str, torch.Tensor]:
    """Normalisation statistics of the training split's unnormalised feature."""
    if feature == "waveform":
        return {}
    return {"mean": x.mean(dim=(0, 2)), "std": x.std(dim=(0, 2))}  # per mel band


def _normalise(x: torch.Tensor, feature: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    if feature == "waveform":
        return x
    return (x - stats["mean"][:, None]) / stats["std"][:, None].clamp_min(1e-5)


@torch.no_grad()
def _feature_entry(waves: dict[str, Any], feature: str, params: dict[str, Any]) -> dict[str, Any]:
    """Compute one feature for every split of a segments entry (a plain dict): the steps
    of `compute_feature`, with the statistics taken from the training split in between
    (so its log-mels are computed once)."""
    splits, rate = waves["splits"], waves["meta"]["sample_rate"]
    raw = {name: _unnormalised(part["x"], feature, rate, params) for name, part in splits.items()}
    stats = _feature_stats(raw["train"], feature)
    meta = {**waves["meta"], "feature": feature, "feature_params": params}
    return {"meta": meta, "stats": stats,
            "splits": {name: {**part, "x": _normalise(raw[name], feature, stats)}
                       for name, part in splits.items()}}


@torch.no_grad()  # T.PitchShift's lazy kernel is a Parameter: keep its graph out of the data
def _segments_entry(data_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Decode and cut the dataset, and add the augmented training copies."""
    log.info("decoding %s and augmenting its training segments (cached after this run)", data_dir)
    segs = data.load_segments(data_dir, params["split"]["kind"], seed=params["split"]["seed"],
                              fractions=params["split"]["fractions"])
    splits = {name: {"x": part.waves, "labels": part.labels, "track": part.track,
                     "track_ids": part.track_ids} for name, part in segs.splits.items()}
    train = splits["train"]
    if train["x"].numel() and params["augment"]["copies"]:
        generator = torch.Generator().manual_seed(params["split"]["seed"])
        extra = augment(train["x"], segs.sample_rate, params["augment"], generator)
        repeats = len(extra) // len(train["x"])
        train.update(x=torch.cat([train["x"], extra]),
                     labels=torch.cat([train["labels"], train["labels"].repeat(repeats)]),
                     track=torch.cat([train["track"], train["track"].repeat(repeats)]))
    meta = {"classes": segs.classes, "sample_rate": segs.sample_rate, "params": params,
            "report": segs.notes()}
    return {"meta": meta, "splits": splits}


def _feature_set(entry: dict[str, Any], from_cache: bool) -> FeatureSet:
    meta = entry["meta"]
    splits = {name: FeatureSplit(**part) for name, part in entry["splits"].items()}
    params = {**meta["params"], "sample_rate": meta["sample_rate"],
              "feature_params": meta["feature_params"]}
    return FeatureSet(meta["feature"], meta["classes"], splits, params, entry["stats"],
                      meta["report"], from_cache)


# ---- cache -----------------------------------------------------------------------

def _fingerprint(data_dir: Path, split: str) -> list[Any]:
    """Every input file's relative path, size and mtime; a split file's content."""
    root = data.find_root(data_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    listing = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if split not in ("random", "fault-filtered"):
        listing.append(["split", data.split_file(split).read_text()])
    return [str(root), listing, torch.__version__, torchaudio.__version__, CACHE_VERSION]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _checksum(entry: dict[str, Any]) -> int:
    """CRC32 over every tensor's bytes and the metadata (torch.load does not check)."""
    crc = zlib.crc32(json.dumps(entry["meta"], sort_keys=True, default=str).encode())
    for _, tensor in sorted(_tensors(entry)):
        crc = zlib.crc32(tensor.contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _tensors(entry: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    found = [(f"stats.{k}", t) for k, t in entry.get("stats", {}).items()]
    for name, part in entry["splits"].items():
        found += [(f"{name}.{k}", t) for k, t in part.items() if isinstance(t, torch.Tensor)]
    return found


def _write_entry(path: Path, entry: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({**entry, "crc32": _checksum(entry)}, tmp)


def _read_entry(path: Path) -> dict[str, Any] | None:
    """The entry at `path`, or None if absent; a corrupt entry is reported and removed."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        if entry.pop("crc32") == _checksum(entry):
            return entry
        reason = "checksum mismatch"
    except Exception as err:  # any failure to read means the entry cannot be trusted
        reason = f"{type(err).__name__}: {err}"
    log.warning("feature cache entry %s is corrupt (%s); rebuilding it", path, reason)
    path.unlink(missing_ok=True)
    return None


# ---- on-the-fly batch augmentation ------------------------------------------------

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


def batch_augmentation(feature: str) -> torch.nn.Module:
    """The on-the-fly training augmentation of a feature, parameters from defaults.yaml."""
    feature = canonical_feature(feature)
    return BATCH_AUGMENTATIONS[feature](**defaults("batch_augment")[feature])
