"""Stage features: the feature store. Each feature set of a dataset, built once and cached.

    segments (data)  -> time stretch + pitch shift copies of training segments (once)
                     -> each feature's transform (genre_ray.transforms), then normalised
                        with the training split's statistics

Features are built streaming: the audio is decoded, augmented and turned into every
requested feature a chunk of segments at a time, each appended to its cache entry
(genre_ray.cache), so building holds a chunk in memory, not the dataset; the log-mels
are then normalised in a second streamed pass over the entry. Entries are keyed by the
dataset's files (names, sizes, mtimes), the split, every parameter and the library
versions, written atomically with checksums, and read back as memory maps: loading a
cached feature set copies nothing into memory, and a corrupt entry is reported and
rebuilt. The transforms are genre_ray.transforms' `FrontEnd`, the one path from segments
to model input that `genre_ray.predict` and the ONNX export run too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchaudio

from genre_ray import cache as cache_entry
from genre_ray import data
from genre_ray.augment import augment
from genre_ray.config import Config, cache_dir
from genre_ray.transforms import canonical_feature, compute_feature, normalise, unit_stats, unnormalised

# Bump when the computation or the split changes, so old entries are not reused;
# tests/test_features.py holds a fingerprint of the computation per version and fails
# until it is bumped.
CACHE_VERSION = 5
CHUNK = data.CHUNK  # segments decoded and built at a time: bounds peak memory

log = logging.getLogger(__name__)




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

    @property
    def variant(self) -> str:
        """Its variant_name: the feature and the front end that computed it."""
        return variant_name(self.feature, self.params["feature_params"])


# A feature computed with one setting of its front end (all its parameters): a run whose
# search space searches front-end keys wants several of one feature (search_space.py).
Variant = tuple[str, dict[str, Any]]


def variant_name(feature: str, params: dict[str, Any]) -> str:
    """What a variant's feature set is known by in a run (its shared object's key)."""
    return f"{feature} {json.dumps(params, sort_keys=True)}"


def variant_of(cfg: Config, feature: str) -> str:
    """The variant_name of `feature` with the front end `cfg` (a trial's: config.tuned) gives it."""
    return variant_name(feature, cfg.features.of(feature))


def as_configured(features: list[str], cfg: Config) -> list[Variant]:
    """Each feature with the front end `cfg` gives it."""
    return [(f, cfg.features.of(f)) for f in map(canonical_feature, features)]


def build_variants(data_dir: Path, variants: list[Variant], cfg: Config,
                   cache: Path | None = None) -> dict[str, FeatureSet]:
    """The feature sets of `data_dir` (`variant_name` -> its set) as `cfg` describes the
    data, split and augmentation, from the cache where an entry is there; the missing
    ones are computed together in one streaming pass over the audio and cached."""
    entries = _entries(data_dir, variants, cfg, cache)
    found = {name: cache_entry.read(path) for name, (_, _, path) in entries.items()}
    missing = {name: entry for name, entry in entries.items() if found[name] is None}
    if missing:
        _build(data_dir, cfg, missing)
        found.update({name: cache_entry.read(path) for name, (_, _, path) in missing.items()})
        paths = {path.resolve() for _, _, path in entries.values()}
        cache_entry.trim(next(iter(paths)).parent, paths, int(cfg.run.cache_gb * (1 << 30)))
    return {name: _feature_set(*found[name], from_cache=name not in missing) for name in entries}


def build_feature_sets(data_dir: Path, features: list[str], cfg: Config,
                       cache: Path | None = None) -> dict[str, FeatureSet]:
    """Each of `features` (name -> its set) with the front end `cfg` gives it."""
    sets = build_variants(data_dir, as_configured(features, cfg), cfg, cache)
    return {fs.feature: fs for fs in sets.values()}


def build_features(data_dir: Path, feature: str, cfg: Config,
                   cache: Path | None = None) -> FeatureSet:
    """The feature set of `data_dir` for `feature`, from the cache when it is there."""
    return build_feature_sets(data_dir, [feature], cfg, cache)[canonical_feature(feature)]


def probe_segments(data_dir: Path, cfg: Config, n: int = 16) -> torch.Tensor:
    """Up to `n` segments of the test split's first tracks, raw audio cut as the features
    were: (n, samples). What an export is checked on."""
    return next(_plan(data_dir, cfg).chunks("test", n)).waves[:n]


def estimated_bytes(data_dir: Path, variants: list[Variant], cfg: Config) -> dict[str, dict[str, int]]:
    """Bytes each feature's splits will take (x only, augmented copies included, summed
    over its variants), from the audio files' headers: what the memory preflight needs
    before anything is computed."""
    plan = _plan(data_dir, cfg, estimate=True)
    copies = 1 + 2 * cfg.augment.copies
    rows = {name: plan.estimated_segments(name) * (copies if name == "train" else 1)
            for name in data.SPLITS}
    out: dict[str, dict[str, int]] = {}
    for feature, params in variants:
        probe = compute_feature(torch.zeros(1, plan.cutter.length), feature, plan.sample_rate,
                                params, unit_stats(feature))
        sums = out.setdefault(feature, dict.fromkeys(data.SPLITS, 0))
        for name, n in rows.items():
            sums[name] += n * probe[0].nbytes
    return out


def _params(cfg: Config) -> dict[str, Any]:
    """What shapes the segments: data, augmentation and split parameters (plain data: the
    cache key, and what a FeatureSet says produced it)."""
    return {"data": dataclasses.asdict(cfg.data), "augment": dataclasses.asdict(cfg.augment),
            "split": {"kind": cfg.split.kind, "seed": cfg.run.seed, "fractions": cfg.split.fractions}}


def _plan(data_dir: Path, cfg: Config, estimate: bool = False) -> data.Plan:
    """The dataset scanned and split as `cfg` says (`data.plan`)."""
    return data.plan(data_dir, cfg.data, cfg.split, cfg.run.seed, estimate=estimate)


def _entries(data_dir: Path, variants: list[Variant], cfg: Config,
             cache: Path | None) -> dict[str, tuple[str, dict[str, Any], Path]]:
    """variant_name -> (feature, params, its cache entry's folder, keyed by every input
    it depends on)."""
    segments_key = _key(_params(cfg), _fingerprint(data_dir, cfg.split.kind))
    root = Path(cache or cache_dir()) / "features"
    entries = {}
    for feature, params in variants:
        feature = canonical_feature(feature)
        key = _key({"segments": segments_key, "feature": feature, "params": params})
        entries[variant_name(feature, params)] = (feature, params, root / f"{feature}-{key}")
    return entries


@torch.no_grad()
def _build(data_dir: Path, cfg: Config, entries: dict[str, tuple[str, dict[str, Any], Path]]) -> None:
    """Decode, augment and compute every variant of `entries` (_entries') in one pass over
    the audio, a chunk of segments at a time, each streamed into its own cache entry."""
    log.info("decoding %s and computing %s (cached after this run)", data_dir, ", ".join(entries))
    plan, params = _plan(data_dir, cfg), _params(cfg)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    rate = plan.sample_rate
    with contextlib.ExitStack() as stack:
        writers = {name: (feature, front, stack.enter_context(cache_entry.Writer(path)))
                   for name, (feature, front, path) in entries.items()}
        for name in data.SPLITS:
            for chunk in plan.chunks(name, CHUNK):
                if name == "train":
                    chunk = _augmented(chunk, rate, params["augment"], generator)
                for feature, front, writer in writers.values():
                    writer.append(f"{name}.x", unnormalised(chunk.waves, feature, rate, front).numpy())
                    writer.append(f"{name}.labels", chunk.labels.numpy())
                    writer.append(f"{name}.track", chunk.track.numpy())
        segs = plan.finish()  # UserError here (a split or genre left without audio) aborts
        meta = {"classes": segs.classes, "sample_rate": rate, "params": params,
                "report": segs.notes(), "track_ids": {n: p.track_ids for n, p in segs.splits.items()}}
        for feature, front, writer in writers.values():
            _normalise_entry(writer, feature)
            writer.commit({**meta, "feature": feature, "feature_params": front})
    if torch.cuda.is_available():  # what augmenting on the GPU cached, given back to the trials
        torch.cuda.empty_cache()


def _augmented(chunk: data.Chunk, rate: int, params: dict[str, Any],
               generator: torch.Generator) -> data.Chunk:
    """The chunk followed by its time-stretched and pitch-shifted copies (same labels)."""
    if not params["copies"]:
        return chunk
    extra = augment(chunk.waves, rate, params, generator,
                    device="cuda" if torch.cuda.is_available() else None)
    repeats = 1 + len(extra) // len(chunk.waves)
    return data.Chunk(torch.cat([chunk.waves, extra]), chunk.labels.repeat(repeats),
                      chunk.track.repeat(repeats))


def _normalise_entry(writer: cache_entry.Writer, feature: str) -> None:
    """Normalise every split's x with statistics of the training split (the log-mels; a
    waveform is standardised per segment already), streamed from its file into a new one
    of the same name: the old file, unlinked, stays readable through its memory map."""
    raw = {name: writer.finish(f"{name}.x") for name in data.SPLITS}
    stats = _streamed_stats(raw["train"], feature)
    for key, value in stats.items():
        writer.put(f"stats.{key}", value.numpy())
    if not stats:
        return
    for name, x in raw.items():
        writer.drop(f"{name}.x")
        for rows in _rows(x):
            writer.append(f"{name}.x", normalise(rows, feature, stats).numpy())


def _streamed_stats(x: np.ndarray, feature: str) -> dict[str, torch.Tensor]:
    """Per-mel-band mean and std of the training split's log-mels (n, n_mels, frames),
    read CHUNK rows at a time and summed in float64."""
    if feature == "waveform":
        return {}
    total = squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for rows in map(torch.Tensor.double, _rows(x)):
        total = total + rows.sum(dim=(0, 2))
        squares = squares + (rows ** 2).sum(dim=(0, 2))
    count = x.shape[0] * x.shape[2]
    mean = total / count
    var = (squares - count * mean ** 2) / max(count - 1, 1)  # unbiased, as torch.std
    return {"mean": mean.float(), "std": var.clamp_min(0).sqrt().float()}


def _rows(x: np.ndarray) -> Iterator[torch.Tensor]:
    """A memory-mapped array's rows, CHUNK at a time, each chunk read into memory."""
    for start in range(0, len(x), CHUNK):
        yield torch.from_numpy(np.array(x[start:start + CHUNK]))


def _feature_set(meta: dict[str, Any], arrays: dict[str, np.ndarray], from_cache: bool) -> FeatureSet:
    """A FeatureSet over a cache entry's memory-mapped arrays (torch views, no copies)."""
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    splits = {name: FeatureSplit(tensors[f"{name}.x"], tensors[f"{name}.labels"],
                                 tensors[f"{name}.track"], meta["track_ids"][name])
              for name in data.SPLITS}
    stats = {k.removeprefix("stats."): t for k, t in tensors.items() if k.startswith("stats.")}
    params = {**meta["params"], "sample_rate": meta["sample_rate"],
              "feature_params": meta["feature_params"]}
    return FeatureSet(meta["feature"], meta["classes"], splits, params, stats,
                      meta["report"], from_cache)


# ---- cache -----------------------------------------------------------------------

def _fingerprint(data_dir: Path, split: str) -> list[Any]:
    """Every input file's relative path, size and mtime; a split file's content."""
    root = data.find_root(data_dir)
    listing = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
               for p in data.files(root)]  # through links: a file added behind one is seen
    if split not in ("random", "fault-filtered"):
        listing.append(["split", data.split_file(split).read_bytes().hex()])
    return [str(root), listing, torch.__version__, torchaudio.__version__, CACHE_VERSION]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


