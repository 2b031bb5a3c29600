"""The synthetic GTZAN-shaped dataset: layout, format, determinism, atomicity, CLI."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from genre_ray import synthetic
from genre_ray.errors import UserError
from genre_ray.synthetic import GENRES, embedded_dataset, generate, render_track, track_rng
from tests.helpers import run_main

REPO = Path(__file__).resolve().parents[1]
SECONDS = 6.0
SR = 22050


def wavs(root: Path) -> list[Path]:
    """Every WAV under a dataset root, sorted, relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*.wav"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "gtzan", tracks_per_genre=2, seed=0, seconds=SECONDS)


def test_genres_are_gtzans():
    from torchaudio.datasets.gtzan import gtzan_genres

    assert list(GENRES) == gtzan_genres


def test_layout_is_the_rereleases(dataset):
    assert [p.name for p in dataset.iterdir()] == ["genres_original"]
    assert sorted(p.name for p in (dataset / "genres_original").iterdir()) == list(GENRES)
    expected = [Path("genres_original", g, f"{g}.{i:05d}.wav") for g in GENRES for i in range(2)]
    assert wavs(dataset) == sorted(expected)


def test_files_are_mono_16_bit_wav_of_the_right_length(dataset):
    for rel in wavs(dataset):
        info = sf.info(dataset / rel)
        assert (info.format, info.subtype) == ("WAV", "PCM_16")
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, round(SECONDS * SR))


def test_audio_is_finite_unclipped_and_audible(dataset):
    for rel in wavs(dataset):
        audio, _ = sf.read(dataset / rel, dtype="float32")
        assert np.isfinite(audio).all()
        assert np.abs(audio).max() < 0.995, rel
        assert np.sqrt(np.mean(audio**2)) > 0.01, rel  # louder than -40 dBFS


def test_render_track_shape_and_range():
    audio = render_track("jazz", track_rng(3, "jazz", 0), 2.5, 16000)
    assert audio.shape == (40000,) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0


def test_unknown_genre_is_refused():
    with pytest.raises(ValueError, match="polka"):
        render_track("polka", np.random.default_rng(0), 1.0, SR)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first, again, other = (generate(tmp_path / name, tracks_per_genre=1, seed=seed, seconds=2.0)
                           for name, seed in (("first", 0), ("again", 0), ("other", 1)))
    for rel in wavs(first):
        assert (again / rel).read_bytes() == (first / rel).read_bytes(), rel
        assert (other / rel).read_bytes() != (first / rel).read_bytes(), rel


def test_worker_count_does_not_change_a_byte(tmp_path):
    one = generate(tmp_path / "one", tracks_per_genre=2, seed=5, seconds=2.0, workers=1)
    two = generate(tmp_path / "two", tracks_per_genre=2, seed=5, seconds=2.0, workers=2)
    assert wavs(one) == wavs(two) and len(wavs(one)) == 2 * len(GENRES)
    for rel in wavs(one):
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_a_track_does_not_depend_on_what_else_is_generated(dataset):
    for genre in reversed(GENRES):
        rel = Path("genres_original", genre, f"{genre}.00001.wav")
        stored, _ = sf.read(dataset / rel, dtype="float32")
        fresh = render_track(genre, track_rng(0, genre, 1), SECONDS, SR)
        np.testing.assert_allclose(stored, fresh, atol=1.5 / 32768)


def test_tracks_differ_within_a_genre(dataset):
    a, _ = sf.read(dataset / "genres_original/rock/rock.00000.wav")
    b, _ = sf.read(dataset / "genres_original/rock/rock.00001.wav")
    assert not np.allclose(a, b)


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=str(tmp_path)) as err:
        generate(tmp_path, tracks_per_genre=1, seed=0, seconds=1.0)
    assert "new output directory" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_refuses_bad_sizes(tmp_path):
    with pytest.raises(UserError, match="pass 1 to 1000 tracks"):
        generate(tmp_path / "out", tracks_per_genre=0, seed=0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="pass 1 to 1024"):
        generate(tmp_path / "out", tracks_per_genre=1, seed=0, workers=0)
    assert list(tmp_path.iterdir()) == []


def test_fills_an_empty_existing_dir_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    generate(out, tracks_per_genre=1, seed=0, seconds=1.0)
    assert len(wavs(out)) == len(GENRES)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_dataset_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_tree = synthetic._write_tree

    def racing(root: Path, *args) -> None:
        write_tree(root, *args)
        out.mkdir()
        (out / "theirs.txt").write_text("finished first")

    monkeypatch.setattr(synthetic, "_write_tree", racing)
    assert generate(out, tracks_per_genre=1, seed=0, seconds=1.0) == out
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", tracks_per_genre=1, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_embedded_dataset_is_generated_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("GENRE_RAY_CACHE", str(tmp_path))
    calls = []
    write_tree = synthetic._write_tree

    def counting(root: Path, n: int, seed: int, seconds: float, sample_rate: int, workers: int) -> None:
        calls.append(n)
        write_tree(root, n, seed, 1.0, sample_rate, workers)

    monkeypatch.setattr(synthetic, "_write_tree", counting)
    first = embedded_dataset(tracks_per_genre=1, seed=7)
    assert first.parent == tmp_path / "embedded"
    assert f"v{synthetic.VERSION}-" in first.name and "-n1-" in first.name and "-seed7-" in first.name
    assert len(wavs(first)) == len(GENRES)
    assert embedded_dataset(tracks_per_genre=1, seed=7) == first
    assert calls == [1]
    assert embedded_dataset(tracks_per_genre=1, seed=8) != first
    assert calls == [1, 1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """python -m genre_ray.synthetic ARGS from the repository root, in this process."""
    return run_main("genre_ray.synthetic", *args)


def test_cli_writes_then_refuses_to_overwrite(tmp_path, caplog):
    out = tmp_path / "cli"
    with caplog.at_level(logging.INFO, logger="genre_ray.synthetic"):
        done = run_cli(str(out), "--tracks-per-genre", "1", "--seed", "3", "--seconds", "1", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout and "10 tracks" in done.stdout
    assert "10/10 tracks" in caplog.text  # progress (logged to stderr by the command)
    assert len(wavs(out)) == len(GENRES)

    again = run_cli(str(out), "--tracks-per-genre", "1", "--seconds", "1")
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and str(out) in again.stderr
    assert "Traceback" not in again.stderr
