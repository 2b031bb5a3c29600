"""A realistic GTZAN-layout benchmark set: composed music played by sampled instruments,
then produced like a record. Not the embedded default and not its generator: here the
genres are carried by real instrument timbres (the General MIDI SoundFont TimGM6mb that
the pretty_midi wheel ships, played by tinysoundfont) as much as by rhythm and harmony,
and each track gets its own production chain (pedalboard: EQ, compression, reverb, drive,
a limiter, hiss), so two tracks of a genre sound like two records, not two seeds.

    .venv/bin/pip install --no-deps -r bench/requirements-realistic.txt   # once
    .venv/bin/python -m bench.realistic OUT [--tracks-per-genre 20] [--seconds 30] [--seed 0]

writes OUT/genres_original/<genre>/<genre>.000NN.wav (22,050 Hz, mono, 16-bit) and
OUT/split.json, a 60/20/20 split by track within each genre (`tune_main.py --data-dir OUT
--split OUT/split.json`). What each genre plays is in bench/realistic_genres.yaml. 200
tracks of 30 s take about a minute on 2 cores; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

SPEC_FILE = Path(__file__).with_name("realistic_genres.yaml")
SAMPLE_RATE = 22050
STEPS = 16  # sixteenth-note steps per bar
DRUMS = 9  # the General MIDI drum channel
JITTER_S = 0.006  # a player's timing, standard deviation
SPLIT = {"train": 0.6, "val": 0.2}  # the rest: test


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    length: float  # seconds
    channel: int
    key: int  # MIDI note
    velocity: int


@functools.cache
def spec() -> dict[str, Any]:
    with SPEC_FILE.open() as f:
        return yaml.safe_load(f)


def soundfont() -> Path:
    """TimGM6mb.sf2 from the installed pretty_midi package (its files only: not imported)."""
    found = importlib.util.find_spec("pretty_midi")
    path = found and Path(found.submodule_search_locations[0]) / "TimGM6mb.sf2"
    if not path or not path.is_file():
        raise SystemExit("bench.realistic needs its instruments: .venv/bin/pip install --no-deps "
                         "-r bench/requirements-realistic.txt")
    return path


# ---- composition ------------------------------------------------------------------------

class Harmony:
    """A key, a scale and a bar-by-bar chord progression; notes by scale index."""

    def __init__(self, genre: dict, rng: random.Random) -> None:
        self.scale = spec()["scales"][genre["scale"]]
        self.root = rng.randrange(12)
        self.progression = rng.choice(genre["progressions"])

    def key(self, index: int, octave: int) -> int:
        """MIDI note of scale `index` (0: the tonic) in `octave`, wrapping into octaves above."""
        n = len(self.scale)
        return 12 * (octave + 1) + self.root + self.scale[index % n] + 12 * (index // n)

    def chord(self, bar: int, power: bool = False) -> list[int]:
        """Scale indices of bar `bar`'s chord: a triad, or root, fifth and octave."""
        base = self.progression[bar % len(self.progression)] - 1
        return [base, base + 4, base + len(self.scale)] if power else [base, base + 2, base + 4]


def compose(genre: dict, rng: random.Random, seconds: float) -> tuple[list[Note], dict[int, int]]:
    """A track's notes and its channels' GM programs (the drum channel absent)."""
    step = 60 / rng.uniform(*genre["tempo"]) / 4
    swing = genre.get("swing", 0.0) * step
    bars = math.ceil(seconds / (STEPS * step)) + 1
    harmony = Harmony(genre, rng)

    def at(bar: int, s: int) -> float:
        return max(0.0, (bar * STEPS + s) * step + (swing if s % 2 else 0) + rng.gauss(0, JITTER_S))

    notes, programs = [], {}
    for channel, part in enumerate(genre["parts"].values()):
        programs[channel] = rng.choice(part["programs"])
        volume = rng.uniform(0.6, 1.0)
        for bar in range(bars):
            for s, index, length in PLAYERS[part["style"]](part, harmony, bar, rng):
                notes.append(Note(at(bar, s), length * step * 0.95, channel,
                                  harmony.key(index, part["octave"]),
                                  int(volume * rng.uniform(70, 115))))
    kit = spec()["kits"][rng.choice(genre["drums"])] if "drums" in genre else {}
    for drum, hits in kit.items():
        for bar in range(bars):
            for s in hits:
                if rng.random() < 0.95:  # a hit left out now and then, as drummers do
                    velocity = rng.uniform(90, 120) if s % 4 == 0 else rng.uniform(55, 95)
                    notes.append(Note(at(bar, s), step, DRUMS, spec()["drum_keys"][drum], int(velocity)))
    return notes, programs


def _bass(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    root = h.chord(bar)[0]
    return [(s, root, _gap(part["steps"], i)) for i, s in enumerate(part["steps"])]


def _walking(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    root = h.chord(bar)[0]
    return [(s, root if s == 0 else root + rng.choice([-1, 1, 2, 3, 4]), 4) for s in (0, 4, 8, 12)]


def _octaves(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    root, octave = h.chord(bar)[0], len(h.scale)
    return [(s, root + octave * (i % 2), _gap(part["steps"], i)) for i, s in enumerate(part["steps"])]


def _chords(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    tones = h.chord(bar, part.get("power", False))
    return [(s, t, _gap(part["steps"], i)) for i, s in enumerate(part["steps"]) for t in tones]


def _pad(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    return [(0, t, STEPS) for t in h.chord(bar)]


def _arpeggio(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    tones = h.chord(bar) + [h.chord(bar)[0] + len(h.scale)]
    return [(s, tones[i % len(tones)], _gap(part["steps"], i)) for i, s in enumerate(part["steps"])]


def _melody(part: dict, h: Harmony, bar: int, rng: random.Random) -> list[tuple[int, int, float]]:
    """A random walk over the scale from the chord's root, a note per step with `density`."""
    index, out = h.chord(bar)[0], []
    for s in range(0, STEPS, 2):
        if rng.random() < part["density"]:
            index = max(-3, min(10, index + rng.choice([-2, -1, -1, 0, 1, 1, 2])))
            out.append((s, index, rng.choice([1, 2, 2, 3])))
    return out


def _gap(steps: list[int], i: int) -> float:
    """Steps from `steps[i]` to the next (to the bar's end for the last)."""
    return (steps[i + 1] if i + 1 < len(steps) else STEPS) - steps[i]


PLAYERS = {"bass": _bass, "walking": _walking, "octaves": _octaves, "chords": _chords,
           "pad": _pad, "arpeggio": _arpeggio, "melody": _melody}


# ---- sound ------------------------------------------------------------------------------

@functools.cache
def _synth():
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=SAMPLE_RATE, gain=-12)
    return synth, synth.sfload(str(soundfont()))


def play(notes: list[Note], programs: dict[int, int], seconds: float) -> np.ndarray:
    """The notes through the SoundFont: (samples,) float32 mono."""
    synth, sfid = _synth()
    synth.notes_off()
    synth.sounds_off()
    for channel, program in programs.items():
        synth.program_select(channel, sfid, 0, program)
    synth.program_select(DRUMS, sfid, 128, 0, is_drums=True)
    events = sorted([(n.start, 1, n) for n in notes] + [(n.start + n.length, 0, n) for n in notes],
                    key=lambda e: (e[0], e[1]))
    total, pieces, done = int(seconds * SAMPLE_RATE), [], 0
    for time, on, note in events:
        at = min(int(time * SAMPLE_RATE), total)
        if at > done:
            pieces.append(np.frombuffer(synth.generate(at - done), dtype=np.float32).copy())
            done = at
        if on:
            synth.noteon(note.channel, note.key, note.velocity)
        else:
            synth.noteoff(note.channel, note.key)
    if total > done:
        pieces.append(np.frombuffer(synth.generate(total - done), dtype=np.float32).copy())
    return np.concatenate(pieces).reshape(-1, 2).mean(axis=1)


def produce(x: np.ndarray, drive: list[float], rng: random.Random) -> np.ndarray:
    """A production chain drawn for this track: (samples,) -> (samples,) in [-1, 1]."""
    import pedalboard as pb

    p = {k: rng.uniform(*v) for k, v in spec()["production"].items()}
    wet = p["reverb_wet"]
    board = pb.Pedalboard([
        pb.Distortion(drive_db=rng.uniform(*drive)) if drive[1] > 0 else pb.Gain(0),
        pb.HighpassFilter(p["highpass_hz"]), pb.LowShelfFilter(250, p["low_shelf_db"]),
        pb.HighShelfFilter(4000, p["high_shelf_db"]), pb.LowpassFilter(p["lowpass_hz"]),
        pb.Compressor(p["compressor_threshold_db"], p["compressor_ratio"]),
        pb.Reverb(room_size=p["reverb_room"], wet_level=wet, dry_level=1 - wet),
        pb.Limiter(threshold_db=-3)])
    y = board(x.astype(np.float32)[None], SAMPLE_RATE)[0]
    y *= 10 ** (p["level_db"] / 20) / max(float(np.abs(y).max()), 1e-6)
    noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(y)) * 10 ** (p["noise_db"] / 20)
    return np.clip(y + noise, -1, 1).astype(np.float32)


def render(genre: str, index: int, seed: int, seconds: float) -> np.ndarray:
    """Track `index` of `genre`: (samples,) float32 at SAMPLE_RATE, the same for the same seed."""
    rng = random.Random(f"{seed}/{genre}/{index}")
    recipe = spec()["genres"][genre]
    notes, programs = compose(recipe, rng, seconds)
    return produce(play(notes, programs, seconds), recipe["drive"], rng)


# ---- the set ----------------------------------------------------------------------------

def _write(root: Path, seed: int, seconds: float, track: tuple[str, int]) -> None:
    genre, index = track
    path = root / "genres_original" / genre / f"{genre}.{index:05d}.wav"
    sf.write(path, render(genre, index, seed, seconds), SAMPLE_RATE, subtype="PCM_16")


def split(tracks_per_genre: int, seed: int) -> dict[str, list[str]]:
    """60/20/20 by track within each genre, shuffled by `seed`."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for genre in spec()["genres"]:
        ids = [f"{genre}.{i:05d}" for i in range(tracks_per_genre)]
        random.Random(f"{seed}/{genre}").shuffle(ids)
        n_train, n_val = (round(tracks_per_genre * SPLIT[k]) for k in ("train", "val"))
        out["train"] += ids[:n_train]
        out["val"] += ids[n_train:n_train + n_val]
        out["test"] += ids[n_train + n_val:]
    return out


def generate(out: Path, tracks_per_genre: int = 20, seconds: float = 30.0, seed: int = 0,
             workers: int = os.cpu_count() or 1) -> Path:
    """Write the set into `out` (whole or not at all: built beside it, then renamed)."""
    soundfont()
    out = out.expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for genre in spec()["genres"]:
            (tmp / "genres_original" / genre).mkdir(parents=True)
        tracks = [(g, i) for g in spec()["genres"] for i in range(tracks_per_genre)]
        with ProcessPoolExecutor(max(1, min(workers, len(tracks)))) as pool:
            list(pool.map(functools.partial(_write, tmp, seed, seconds), tracks))
        (tmp / "split.json").write_text(json.dumps(split(tracks_per_genre, seed), indent=1))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realistic", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a folder that does not exist yet")
    parser.add_argument("--tracks-per-genre", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; name a new folder")
    if args.tracks_per_genre < 5 or not 5 <= args.seconds <= 600:
        parser.error("--tracks-per-genre must be >= 5 (a 60/20/20 split) and --seconds in [5, 600]")
    print(generate(args.out, args.tracks_per_genre, args.seconds, args.seed, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
