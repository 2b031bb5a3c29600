"""Stage features: shapes, normalisation, augmentation, and the disk cache."""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from genre_ray import cache as cache_entry, transforms
from genre_ray import config, features
from genre_ray.augment import augment
from genre_ray.errors import UserError
from genre_ray.features import build_features
from genre_ray.files import atomic_path
from genre_ray.transforms import LogMel
from tests.helpers import make_tree

RATE, SEG = 22050, 110250
CFG = config.load()  # defaults.yaml: run.seed 0, a random split


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 genres x 3 tracks of 11 s: one track per genre per split, 2 segments each."""
    return make_tree(tmp_path_factory.mktemp("tree"), tracks=3, seconds=11.0)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    """Both features of `tree`, computed once for the module's read-only tests."""
    cache = tmp_path_factory.mktemp("module-cache")
    return {f: build_features(tree, f, CFG, cache=cache) for f in transforms.FEATURES}


def _peak_hz(wave: torch.Tensor) -> float:
    return torch.fft.rfft(wave).abs().argmax().item() * RATE / wave.numel()


def _tone(freq: float, seconds: float = 5.0) -> torch.Tensor:
    return torch.sin(2 * torch.pi * freq * torch.arange(int(seconds * RATE)) / RATE)


@pytest.mark.parametrize("feature,shape", [("waveform", (SEG,)), ("spectrogram", (64, 108))])
def test_shapes_and_augmented_training_copies(built, feature, shape):
    fs = built[feature]
    assert fs.input_shape == shape and fs.classes == ["blues", "classical", "jazz"]
    # 3 original training tracks x 2 segments, plus one time-stretched and one pitch-shifted copy
    assert [len(fs.splits[n].x) for n in ("train", "val", "test")] == [18, 6, 6]
    for part in fs.splits.values():
        assert torch.isfinite(part.x).all() and part.x.dtype == torch.float32
        assert not part.x.requires_grad  # plain data, no autograd graph attached
        assert part.labels.shape == part.track.shape == (len(part.x),)
    train = fs.splits["train"]
    assert torch.equal(train.labels[6:12], train.labels[:6])  # copies keep their labels


def test_waveform_is_standardised_per_segment_and_silence_stays_finite():
    x = torch.cat([torch.randn(3, 1000) * 5 + 2, torch.zeros(1, 1000)])
    z = transforms.standardise(x)
    assert torch.allclose(z[:3].mean(dim=1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z[:3].std(dim=1), torch.ones(3), atol=1e-4)
    assert torch.equal(z[3], torch.zeros(1000))


def test_silent_training_split_normalises_to_finite_values(tmp_path):
    """Every training segment silent: each mel band has zero variance, and its statistics
    must not divide by zero (silence is the padding of every short clip, too)."""
    tree = make_tree(tmp_path / "silent", tracks=3, seconds=5.0)
    for path in tree.rglob("*.wav"):
        sf.write(str(path), np.zeros(5 * RATE), RATE, subtype="PCM_16")
    spec = build_features(tree, "spectrogram", CFG, cache=tmp_path / "cache")
    assert torch.equal(spec.stats["std"], torch.zeros(64))  # the case the guard is for
    for fs in (spec, build_features(tree, "waveform", CFG, cache=tmp_path / "cache")):
        for part in fs.splits.values():
            assert torch.isfinite(part.x).all(), fs.feature


def test_spectrogram_uses_training_statistics_for_every_split(built):
    fs = built["spectrogram"]
    train = fs.splits["train"].x
    assert torch.allclose(train.mean(dim=(0, 2)), torch.zeros(64), atol=1e-4)
    assert torch.allclose(train.std(dim=(0, 2)), torch.ones(64), atol=1e-3)
    assert fs.stats["mean"].shape == fs.stats["std"].shape == (64,)
    val = fs.splits["val"].x  # normalised with train's stats: not its own zero mean
    assert val.mean(dim=(0, 2)).abs().max() > 1e-2


def test_logmel_batch_equals_per_item():
    logmel = LogMel(RATE, n_fft=1024, hop_length=512, n_mels=64, f_min=0.0, top_db=80.0)
    waves = torch.stack([_tone(440.0), 1e-3 * _tone(880.0)])  # very different loudness
    batch = logmel(waves)
    assert batch.shape == (2, 64, 216)
    for i in range(2):
        assert torch.allclose(batch[i], logmel(waves[i:i + 1])[0], atol=1e-4)


def test_cache_hit_recomputes_nothing(tree, isolated_cache):
    first = build_features(tree, "spectrogram", CFG)
    entries = {p: p.stat().st_mtime_ns for p in (isolated_cache / "features").iterdir()}
    again = build_features(tree, "spectogram", CFG)  # the notebook's spelling hits the same entry
    assert not first.from_cache and again.from_cache
    assert {p: p.stat().st_mtime_ns for p in (isolated_cache / "features").iterdir()} == entries
    for name, part in first.splits.items():
        assert torch.equal(part.x, again.splits[name].x)


def test_front_end_variants_are_each_cached_once_and_share_one_pass(tree, isolated_cache, caplog):
    """A search over the front end (search_space.py) asks for one entry per parameter set:
    each computed once, in one pass over the audio, and read back by every later run."""
    front = CFG.features.of("spectrogram")
    hops = [("spectrogram", {**front, "hop_length": hop}) for hop in (1024, 512)]
    with caplog.at_level(logging.INFO, logger="genre_ray.features"):
        first = features.build_variants(tree, hops, CFG)
    assert sum("decoding" in r.getMessage() for r in caplog.records) == 1  # one pass for both
    assert [fs.input_shape for fs in first.values()] == [(64, 108), (64, 216)]
    assert [fs.variant for fs in first.values()] == list(first)
    assert {fs.params["feature_params"]["hop_length"] for fs in first.values()} == {1024, 512}
    # the same labels and tracks: one set of segments, two front ends
    a, b = first.values()
    assert torch.equal(a.splits["train"].labels, b.splits["train"].labels)
    entries = {p: p.stat().st_mtime_ns for p in (isolated_cache / "features").iterdir()}
    assert len(entries) == 2
    mels = ("spectrogram", {**front, "n_mels": 32})
    again = features.build_variants(tree, [*hops, mels], CFG)
    assert [fs.from_cache for fs in again.values()] == [True, True, False]  # only the new one built
    assert again[features.variant_name(*mels)].input_shape == (32, 108)
    after = {p: p.stat().st_mtime_ns for p in (isolated_cache / "features").iterdir()}
    assert len(after) == 3 and all(after[p] == t for p, t in entries.items())
    # the memory preflight counts every variant of a feature
    sizes = features.estimated_bytes(tree, [*hops, mels], CFG)["spectrogram"]
    assert sizes["val"] == sum(fs.splits["val"].x.numel() * 4 for fs in again.values())


def test_the_cache_keeps_to_its_bound_removing_the_least_recently_used(tree, isolated_cache):
    small = config.replaced(CFG, {"run.cache_gb": 1e-9})  # below any entry: only the run's stay
    root = isolated_cache / "features"
    wave = build_features(tree, "waveform", CFG)
    spec = build_features(tree, "spectrogram", small)
    assert [p.name.split("-")[0] for p in root.iterdir()] == ["spectrogram"]  # waveform went
    assert np.isfinite(wave.splits["train"].x.numpy()).all()  # a mapped entry stays readable
    assert not build_features(tree, "waveform", small).from_cache
    assert [p.name.split("-")[0] for p in root.iterdir()] == ["waveform"]
    assert spec.splits["val"].x.shape[1:] == (64, 108)


def test_trim_removes_the_entries_read_longest_ago_first(tmp_path):
    for i, name in enumerate("abc"):
        with cache_entry.Writer(tmp_path / name) as writer:
            writer.put("x", np.zeros(1000, dtype=np.float32))  # an entry: 4 kB and its meta
            writer.commit({})
        os.utime(tmp_path / name / "meta.json", ns=(i * 10**9, i * 10**9))  # written a, b, c
    assert cache_entry.read(tmp_path / "a") is not None  # read now: the newest use
    removed = cache_entry.trim(tmp_path, keep={(tmp_path / "b").resolve()}, max_bytes=9000)
    assert removed == [tmp_path / "c"] and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_changed_input_file_or_parameter_misses_the_cache(tree, tmp_path):
    cache = tmp_path / "cache"
    build_features(tree, "waveform", CFG, cache=cache)
    reseeded = config.replaced(CFG, {"run.seed": 1})
    assert not build_features(tree, "waveform", reseeded, cache=cache).from_cache
    assert build_features(tree, "waveform", CFG, cache=cache).from_cache
    target = next((tree / "genres_original" / "jazz").iterdir())
    target.write_bytes(target.read_bytes())  # same content, new mtime
    assert not build_features(tree, "waveform", CFG, cache=cache).from_cache


@pytest.mark.parametrize("target,damage", [
    ("train.x.npy", lambda b: b[: len(b) // 2]),                                   # truncated
    ("train.x.npy", lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:]),
    ("train.labels.npy", lambda b: b"garbage"),
    ("meta.json", lambda b: b"garbage"),
])
def test_corrupt_entry_is_detected_and_rebuilt(tree, tmp_path, caplog, target, damage):
    cache = tmp_path / "cache"
    clean = {k: v.clone() for k, v in vars(build_features(tree, "spectrogram", CFG, cache=cache)
                                          .splits["train"]).items() if k != "track_ids"}
    entry = next((cache / "features").glob("spectrogram-*"))
    (entry / target).write_bytes(damage((entry / target).read_bytes()))
    with caplog.at_level(logging.WARNING):
        rebuilt = build_features(tree, "spectrogram", CFG, cache=cache)
    assert not rebuilt.from_cache and "corrupt" in caplog.text and entry.name in caplog.text
    assert torch.equal(rebuilt.splits["train"].x, clean["x"])
    assert build_features(tree, "spectrogram", CFG, cache=cache).from_cache


def test_cached_features_are_memory_maps_that_writes_never_reach(tree, tmp_path):
    cache = tmp_path / "cache"
    fs = build_features(tree, "waveform", CFG, cache=cache)
    x = fs.splits["train"].x
    assert _mapped_file(x.data_ptr()).endswith("/train.x.npy")  # the file itself, not a copy
    x[0] = 7.0  # copy-on-write: this process's page only
    again = build_features(tree, "waveform", CFG, cache=cache)
    assert again.from_cache and not torch.equal(again.splits["train"].x[0], x[0])


def _mapped_file(address: int) -> str:
    """The file this process maps at `address` ('' for anonymous memory)."""
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in fields[0].split("-"))
        if low <= address < high:
            return fields[5].strip() if len(fields) > 5 else ""
    return ""


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "entry.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["entry.pt"]


def test_interrupted_entry_leaves_nothing_and_a_committed_one_reads_back(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with cache_entry.Writer(tmp_path / "entry") as writer:
            writer.append("x", np.ones((3, 4), dtype=np.float32))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with cache_entry.Writer(tmp_path / "entry") as writer:
        for start in range(0, 1000, 64):  # grown in chunks, the header rewritten at the end
            writer.append("x", np.arange(start, min(start + 64, 1000), dtype=np.float32)[:, None]
                          .repeat(3, axis=1))
        writer.put("stats.mean", np.arange(5.0))
        writer.commit({"note": "n"})
    meta, arrays = cache_entry.read(tmp_path / "entry")
    assert meta == {"note": "n"} and arrays["x"].shape == (1000, 3)
    assert np.array_equal(arrays["x"][:, 2], np.arange(1000.0)) and list(arrays["stats.mean"]) == [0, 1, 2, 3, 4]


def test_an_error_after_an_entry_committed_is_the_error_raised(tmp_path):
    """features._build commits one entry per feature in one `with`: an error after the first
    committed reaches the caller as itself (the writer lets go of its lock once)."""
    with pytest.raises(KeyboardInterrupt):
        with cache_entry.Writer(tmp_path / "entry") as writer:
            writer.put("x", np.arange(3.0))
            writer.commit({})
            raise KeyboardInterrupt
    assert cache_entry.read(tmp_path / "entry") is not None


def test_unknown_feature_is_a_clear_error(tree):
    with pytest.raises(UserError, match="unknown feature 'mfcc'.*waveform, spectrogram"):
        build_features(tree, "mfcc", CFG)


def test_batch_augmentations_keep_shape_and_mask_each_item_differently():
    torch.manual_seed(0)
    spec = transforms.batch_augmentation("spectrogram", CFG.batch_augment.of("spectrogram"))
    x = torch.ones(8, 64, 216)
    masked = spec(x)
    assert masked.shape == x.shape and (masked == 0).any()
    zero_cols = [(m == 0).all(dim=0).nonzero().flatten().tolist() for m in masked]
    assert len({tuple(c) for c in zero_cols}) > 1  # masks are drawn per item
    noisy = transforms.batch_augmentation("waveform", CFG.batch_augment.of("waveform"))(torch.zeros(4, 1000))
    assert 0.005 < noisy.std().item() < 0.02


# Per CACHE_VERSION, what the cached computation gives on fixed tones: each output row's
# mean |value| (augmented copies, then both features before normalisation). A change to
# the computation changes these: bump features.CACHE_VERSION and record the new values.
# Within 1e-3: the log-mels' near-silent bins of the pitch-shifted copies move a row's
# mean by up to 3e-4 from one CPU to another (the FFT's vector paths round differently).
FINGERPRINTS = {5: [0.381972, 0.381972, 0.381974, 0.331976, 0.324952, 0.343752, 0.076777, 0.116862,
                    0.248703, 0.814363, 0.814362, 0.814366, 0.759473, 0.751306, 0.772767, 0.800535,
                    0.810695, 0.81438, 25.641304, 24.412317, 25.592627, 25.370211, 24.192629,
                    25.800503, 31.53174, 30.707621, 28.260172]}


def computation_fingerprint() -> list[float]:
    t = torch.arange(110250) / 22050
    tones = torch.stack([torch.sin(2 * torch.pi * f * t) * (0.6 + 0.4 * torch.sin(2 * torch.pi * t))
                         for f in (110.0, 330.0, 1250.0)])
    cfg = config.load()
    waves = torch.cat([tones, augment(tones, 22050, dataclasses.asdict(cfg.augment),
                                      torch.Generator().manual_seed(0))])
    rows = [transforms.unnormalised(waves, f, 22050, cfg.features.of(f)) for f in transforms.FEATURES]
    return [round(v, 6) for x in (waves, *rows) for v in x.abs().flatten(1).mean(dim=1).tolist()]


def test_the_cache_version_names_the_computation():
    found = computation_fingerprint()
    assert features.CACHE_VERSION in FINGERPRINTS, f"record {features.CACHE_VERSION}: {found}"
    assert found == pytest.approx(FINGERPRINTS[features.CACHE_VERSION], rel=1e-3), \
        f"the computation changed: bump features.CACHE_VERSION and record {found}"
