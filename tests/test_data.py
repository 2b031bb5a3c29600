"""Stage data on real audio files written by the tests (soundfile), no mocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from torchaudio.datasets import gtzan

from genre_ray import config, data, features
from genre_ray.errors import UserError
from tests.helpers import GENRES, REPO, make_tree, run_main, run_module, write_tone

SEG = 110250  # 5 s at 22050 Hz


def _load(data_dir: Path, seed: int = 0) -> data.SegmentSet:
    """data.load_segments with defaults.yaml's data section and a random split seeded `seed`."""
    cfg = config.load(values={"split.kind": "random", "run.seed": seed})
    return data.load_segments(data_dir, cfg.data, cfg.split, cfg.run.seed)


@pytest.mark.parametrize("layout,ext", [("genres", ".au"), ("genres_original", ".wav"),
                                        (".", ".wav"), ("genres", ".wav")])
def test_reads_every_gtzan_layout(tmp_path, layout, ext):
    make_tree(tmp_path, layout=layout, ext=ext, tracks=3, seconds=11.0)
    segs = _load(tmp_path)
    assert segs.classes == sorted(GENRES)
    total = sum(len(s.labels) for s in segs.splits.values())
    assert total == 3 * 3 * 2  # 11 s: two full segments, a 1 s tail dropped
    for part in segs.splits.values():
        assert part.waves.shape[1:] == (SEG,) and part.waves.dtype == torch.float32
        assert len(part.track_ids) == len(set(part.track.tolist()))


def test_segments_keep_a_long_tail_padded_and_drop_a_short_one():
    wave = torch.ones(2 * SEG + SEG // 2 + 10)  # tail just over half a segment
    cut = data.segment(wave, SEG, SEG // 2)
    assert cut.shape == (3, SEG)
    assert cut[2, : SEG // 2 + 10].eq(1).all() and cut[2, SEG // 2 + 10:].eq(0).all()
    assert data.segment(torch.ones(2 * SEG + 100), SEG, SEG // 2).shape == (2, SEG)
    assert data.segment(torch.ones(100), SEG, SEG // 2).shape == (0, SEG)


def test_stereo_and_44k_are_downmixed_and_resampled(tmp_path):
    path = write_tone(tmp_path / "x.wav", 440.0, 2.0, rate=44100, channels=2)
    wave = data.decode(path, 22050)
    assert wave.shape == (44100,)
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(spectrum.argmax().item() / 2.0 - 440.0) < 2  # the tone survives resampling


def test_broken_file_is_skipped_and_reported(tmp_path):
    make_tree(tmp_path, tracks=3)
    broken = tmp_path / "genres_original" / "jazz" / "jazz.00054.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (tmp_path / "genres_original" / "jazz" / ".DS_Store").write_bytes(b"\x00")
    segs = _load(tmp_path)
    assert [p.name for p, _ in segs.skipped] == ["jazz.00054.wav"]
    assert "does not decode" in segs.skipped[0][1]
    assert [p.name for p in segs.ignored] == [".DS_Store"]
    assert all("jazz.00054" not in s.track_ids for s in segs.splits.values())


def test_short_nan_and_hidden_files_and_folders_without_audio_are_reported(tmp_path):
    make_tree(tmp_path, tracks=3, seconds=5.0)
    blues = tmp_path / "genres_original" / "blues"
    write_tone(blues / "blues.00003.wav", 300.0, 3.0)  # >= 2.5 s: padded to one segment
    write_tone(blues / "blues.00004.wav", 300.0, 2.0)  # < 2.5 s: skipped
    nan = np.full(SEG, np.nan, np.float32)
    sf.write(str(blues / "blues.00005.wav"), nan, 22050, subtype="FLOAT")
    (blues / "._blues.00000.wav").write_bytes(b"\x00\x05\x16\x07")  # a macOS copy's shadow file
    (tmp_path / "genres_original" / "disco").mkdir()  # no audio: not a genre
    segs = _load(tmp_path)
    assert [(p.name, note) for p, note in segs.padded] == \
        [("blues.00003.wav", "3.0 s, zero-padded to one 5 s segment")]
    assert {p.name: why.split(";")[0] for p, why in segs.skipped} == {
        "blues.00004.wav": "2.0 s, shorter than 2.5 s: too short to pad to a 5 s segment",
        "blues.00005.wav": "holds NaN or infinite samples"}
    assert [p.name for p in segs.ignored] == ["._blues.00000.wav"]
    assert [p.name for p in segs.not_genres] == ["disco"] and "disco" not in segs.classes
    split = next(s for s in segs.splits.values() if "blues.00003" in s.track_ids)
    wave = split.waves[split.track == split.track_ids.index("blues.00003")]
    assert wave.shape == (1, SEG) and wave[0, 3 * 22050:].eq(0).all()
    assert all(torch.isfinite(s.waves).all() for s in segs.splits.values())


def _assert_disjoint(assigned):
    ids = [set(t.track_id for t in assigned[name]) for name in data.SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    return ids


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_split_is_by_track_stratified_and_seeded(tmp_path, seed):
    tracks = data.scan(make_tree(tmp_path, tracks=10, seconds=0.1)).tracks
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    assigned = data.split_tracks(tracks, "random", seed=seed, fractions=fractions)
    train, val, test = _assert_disjoint(assigned)
    assert len(train | val | test) == len(tracks)
    for genre in GENRES:  # stratified: 6/2/2 of each genre
        assert [sum(tid.startswith(genre) for tid in s) for s in (train, val, test)] == [6, 2, 2]
    again = data.split_tracks(tracks, "random", seed=seed, fractions=fractions)
    assert again == assigned


def _standin_gtzan(root: Path) -> list[data.Track]:
    """Empty-of-music stand-ins named as every track of the fault-filtered lists."""
    for tid in gtzan.filtered_train + gtzan.filtered_valid + gtzan.filtered_test:
        genre = tid.split(".")[0]
        write_tone(root / "genres" / genre / f"{tid}.au", 100.0, 0.01)
    return data.scan(root).tracks


def test_fault_filtered_counts_match_torchaudio_lists(tmp_path):
    tracks = _standin_gtzan(tmp_path)
    assigned = data.split_tracks(tracks, "fault-filtered", seed=0, fractions={})
    assert [len(assigned[n]) for n in data.SPLITS] == [443, 197, 290]
    _assert_disjoint(assigned)
    (tmp_path / "genres" / "blues" / "blues.00029.au").unlink()  # the first listed train track
    tracks = data.scan(tmp_path).tracks
    assert [len(data.split_tracks(tracks, "fault-filtered", seed=0, fractions={})[n])
            for n in data.SPLITS] == [442, 197, 290]
    assert data.missing_tracks(tracks, "fault-filtered") == ["blues.00029"]


def test_split_file_assigns_listed_tracks(tmp_path):
    tracks = data.scan(make_tree(tmp_path, tracks=3, seconds=0.1)).tracks
    lists = {"train": [f"{g}.00000" for g in GENRES] + [f"{g}.00001" for g in GENRES],
             "val": ["blues.00002", "jazz.00002"], "test": ["classical.00002"]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(lists))
    assigned = data.split_tracks(tracks, str(path), seed=0, fractions={})
    assert {n: sorted(t.track_id for t in assigned[n]) for n in data.SPLITS} == \
        {n: sorted(v) for n, v in lists.items()}


@pytest.mark.parametrize("lists,message", [
    ({"train": ["blues.00000", "nope.00001"], "val": ["jazz.00000"], "test": ["classical.00000"]},
     "not in the dataset"),
    ({"train": ["blues.00000"], "val": [], "test": ["classical.00000"]}, "val split has no track"),
    ({"train": ["blues.00000"], "val": ["blues.00000"], "test": ["jazz.00000"]}, "in both train and val"),
    ({"train": ["blues.00000"]}, "exactly the keys train, val and test"),
])
def test_bad_split_files_are_refused(tmp_path, lists, message):
    tracks = data.scan(make_tree(tmp_path, tracks=2, seconds=0.1)).tracks
    path = tmp_path / "split.json"
    path.write_text(json.dumps(lists))
    with pytest.raises(UserError, match=message):
        data.split_tracks(tracks, str(path), seed=0, fractions={})


def test_repeated_stems_across_genres_get_genre_prefixed_ids(tmp_path):
    for genre in ("rock", "jazz"):
        write_tone(tmp_path / genre / "01.wav", 300.0, 0.1)
    write_tone(tmp_path / "jazz" / "02.wav", 300.0, 0.1)
    ids = sorted(t.track_id for t in data.scan(tmp_path).tracks)
    assert ids == ["02", "jazz/01", "rock/01"]


def _text_only_genres(root: Path) -> None:
    for genre in ("rock", "jazz"):
        (root / genre).mkdir(parents=True)
        (root / genre / "notes.txt").write_text("no audio here")


@pytest.mark.parametrize("setup,message", [
    (lambda root: root.rmdir(), "does not exist"),
    (lambda root: None, "no genre folders"),
    (_text_only_genres, "no genre folders"),
    (lambda root: write_tone(root / "rock" / "rock.00000.wav", 300.0, 6.0), "at least two genre"),
])
def test_bad_data_dirs_are_one_clear_error(tmp_path, setup, message):
    root = tmp_path / "d"
    root.mkdir()
    setup(root)
    with pytest.raises(UserError, match=message):
        data.scan(root)


def test_genre_folder_without_usable_audio_is_a_clear_error(tmp_path):
    make_tree(tmp_path, genres=["blues", "jazz", "rock"], tracks=3)
    for path in (tmp_path / "genres_original" / "jazz").iterdir():
        path.write_bytes(b"not audio at all")
    with pytest.raises(UserError, match="genre folder 'jazz' has no usable audio.*3 file"):
        _load(tmp_path)


def test_cli_reports_tracks_segments_and_skips(tmp_path):
    make_tree(tmp_path, tracks=3, seconds=11.0)
    (tmp_path / "genres_original" / "blues" / "blues.00009.wav").write_bytes(b"broken")
    out = run_main("genre_ray.data", tmp_path, "--split", "random")
    assert out.returncode == 0, out.stderr
    assert "classical" in out.stdout and "skipped 1 file(s)" in out.stdout
    assert "blues.00009.wav" in out.stdout
    total_line = next(line for line in out.stdout.splitlines() if line.startswith("total"))
    cells = [tuple(map(int, c.split("/"))) for c in total_line.split()[1:]]
    assert len(cells) == 3 and all(tracks >= 3 for tracks, _ in cells)  # a track per genre
    assert sum(t for t, _ in cells) == 9 and sum(s for _, s in cells) == 18  # 11 s: 2 segments


CAPPED = """
import resource, sys
import torch
cap = 1 << 30  # bytes of data memory: a resampling kernel built whole for 44,101 Hz takes 3.9 GB
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
from genre_ray import data
wave = data.decode(sys.argv[1], 22050)
spectrum = torch.fft.rfft(wave).abs()
print(wave.numel(), int(spectrum.argmax()) * 22050 / wave.numel())
"""


@pytest.mark.slow  # a subprocess under a memory cap
def test_an_odd_sample_rate_resamples_in_bounded_memory_keeping_the_pitch(tmp_path):
    path = write_tone(tmp_path / "odd.wav", 440.0, 6.0, rate=44101)
    out = subprocess.run([sys.executable, "-c", CAPPED, str(path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    samples, peak_hz = map(float, out.stdout.split())
    assert abs(samples - 6 * 22050) <= 6 * 22050 * 1e-4 and abs(peak_hz - 440.0) < 1.0


@pytest.mark.parametrize("rate", [44100, 48000, 16000, 8000])
def test_the_usual_rates_resample_exactly_as_torchaudio_does(rate):
    wave = torch.randn(rate)
    assert torch.equal(data.resampled(wave, rate, 22050), AF.resample(wave, rate, 22050))


def test_a_broken_file_is_never_dealt_to_a_split_it_would_leave_without_its_genre(tmp_path):
    make_tree(tmp_path, tracks=5, seconds=6.0)
    broken = tmp_path / "genres_original" / "blues" / "blues.00005.wav"
    broken.write_bytes(b"RIFF" + bytes(40))  # a header libsndfile refuses
    for seed in range(10):
        cfg = config.load(values={"run.seed": seed})
        plan = data.plan(tmp_path, cfg.data, cfg.split, seed)
        for name, tracks in plan.assigned.items():
            assert {t.genre for t in tracks} == set(GENRES), (seed, name)
            assert broken not in {t.path for t in tracks}
        assert [path for path, _ in plan.cutter.skipped] == [broken]


def _corrupt_flac(path: Path) -> Path:
    """A FLAC whose header reads (frames, rate) and whose frames do not decode."""
    sf.write(path, 0.5 * np.sin(np.arange(6 * 22050) * 2 * np.pi * 300 / 22050), 22050, format="FLAC")
    raw = bytearray(path.read_bytes())
    raw[200:] = bytes((b * 31 + 7) & 255 for b in raw[200:])
    path.write_bytes(bytes(raw))
    return path


def _nan_wav(path: Path) -> Path:
    """A float WAV whose header is fine and whose samples are NaN."""
    sf.write(path, np.full(6 * 22050, np.nan, dtype=np.float32), 22050, subtype="FLOAT")
    return path


def test_files_whose_header_reads_but_data_does_not_never_count_toward_a_split(tmp_path):
    """5 good tracks and a broken one in a genre: were the broken one dealt to the test
    split, that genre would be left without a test track, silently."""
    make_tree(tmp_path, tracks=5, seconds=6.0)
    corrupt = _corrupt_flac(tmp_path / "genres_original" / "blues" / "blues.00005.flac")
    nan = _nan_wav(tmp_path / "genres_original" / "jazz" / "jazz.00005.wav")
    assert sf.info(corrupt).frames == 6 * 22050 and sf.info(nan).frames == 6 * 22050
    for seed in range(6):
        segs = _load(tmp_path, seed)
        for name, part in segs.splits.items():
            assert {segs.classes[i] for i in part.labels.tolist()} == set(GENRES), (seed, name)
        assert {path for path, _ in segs.skipped} == {corrupt, nan}
        assert sum(len(p.track_ids) for p in segs.splits.values()) == 5 * len(GENRES)
        assert segs.absent == []


def test_a_genre_too_small_for_every_split_gets_a_warning(tmp_path):
    make_tree(tmp_path, tracks=4, seconds=6.0)
    jazz = tmp_path / "genres_original" / "jazz"
    for i in range(2, 4):  # jazz: 2 usable tracks of 4
        _corrupt_flac(jazz / f"jazz.{i:05d}.flac")
        (jazz / f"jazz.{i:05d}.wav").unlink()
    segs = _load(tmp_path)
    [line] = segs.absent
    assert line.startswith("jazz: ")
    held_out = [n for n in data.SPLITS if n != "train" and n in line]
    assert held_out and all(segs.classes.index("jazz") not in segs.splits[n].labels.tolist()
                            for n in held_out)
    warning = [ln for ln in data.report(segs).splitlines() if ln.startswith("warning:")]
    assert warning == [f"warning: genre 'jazz' has no usable track in {line[6:]}, whose accuracy "
                       "leaves it out; add tracks (a random split deals 3 or more to every split) "
                       "or list one there in a --split file"]


def test_a_split_file_that_leaves_a_genre_out_of_a_split_gets_a_warning(tmp_path):
    make_tree(tmp_path, tracks=3, seconds=6.0)
    ids = {g: [f"{g}.{i:05d}" for i in range(3)] for g in GENRES}
    lists = {"train": [t for g in GENRES for t in ids[g][:2]], "val": [ids[g][2] for g in GENRES[1:]],
             "test": [ids[GENRES[0]][2]]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(lists))
    cfg = config.load(values={"split.kind": str(path)})
    segs = data.load_segments(tmp_path, cfg.data, cfg.split, 0)
    assert segs.absent == [f"{GENRES[0]}: val"] + [f"{g}: test" for g in GENRES[1:]]


def test_audio_in_a_genres_sub_folders_is_used_and_a_repeated_name_is_refused(tmp_path):
    make_tree(tmp_path, tracks=3, seconds=6.0)
    blues = tmp_path / "genres_original" / "blues"
    write_tone(blues / "disc2" / "blues.00007.wav", 250.0, 6.0)
    write_tone(blues / ".trash" / "blues.00008.wav", 250.0, 6.0)  # hidden folder: not audio of ours
    ids = {t.track_id for t in data.scan(tmp_path).tracks}
    assert "blues.00007" in ids and "blues.00008" not in ids
    write_tone(blues / "disc3" / "blues.00007.wav", 260.0, 6.0)
    with pytest.raises(UserError, match=r"two files share the track id '(blues/)?blues\.00007' .*disc2/blues\.00007"
                                        r"\.wav and .*disc3/blues\.00007\.wav.*rename or remove one"):
        data.scan(tmp_path)


def test_a_file_added_behind_a_linked_genre_folder_changes_the_cache_key(tmp_path):
    make_tree(tmp_path / "elsewhere", tracks=3, seconds=6.0)
    root = tmp_path / "data" / "genres_original"
    root.mkdir(parents=True)
    for genre in GENRES:
        (root / genre).symlink_to(tmp_path / "elsewhere" / "genres_original" / genre)
    cfg = config.load()
    before = features._entries(tmp_path / "data", features.as_configured(["waveform"], cfg), cfg, tmp_path / "cache")
    write_tone(tmp_path / "elsewhere" / "genres_original" / "jazz" / "jazz.00003.wav", 700.0, 6.0)
    assert features._entries(tmp_path / "data", features.as_configured(["waveform"], cfg), cfg, tmp_path / "cache") != before
    assert "jazz.00003" in {t.track_id for t in data.scan(tmp_path / "data").tracks}


@pytest.mark.slow  # a command in a subprocess
def test_a_file_name_that_is_not_utf8_is_used_and_printed_escaped(tmp_path):
    make_tree(tmp_path, tracks=3, seconds=6.0)
    blues = os.fsencode(tmp_path / "genres_original" / "blues")
    os.rename(write_tone(tmp_path / "tone.wav", 300.0, 6.0), blues + b"/caf\xe9.wav")  # Latin-1 é
    open(blues + b"/not\xe9s.txt", "w").close()
    assert data.decode(Path(os.fsdecode(blues + b"/caf\xe9.wav")), 22050).numel() == 6 * 22050
    out = run_module("genre_ray.data", str(tmp_path), env={**os.environ, "PYTHONPATH": str(REPO),
                                                           "PYTHONIOENCODING": "utf-8:strict"})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "not\\udce9s.txt" in out.stdout and "skipped 0 file(s)" in out.stdout
