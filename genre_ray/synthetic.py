"""A GTZAN-shaped dataset of procedural music: `genres_original/<genre>/<genre>.NNNNN.wav`.

Each track is rendered by a small synthesiser (wavetable oscillators with envelopes,
noise-burst drums, a sixteenth-note sequencer, a mastering chain) from the genre's
parameters in synthetic_genres.yaml, randomised per track.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

from genre_ray.config import cache_dir
from genre_ray.errors import UserError, exit_on_user_error

VERSION = 1  # bump when a code change alters the generated audio
SPEC_FILE = Path(__file__).with_name("synthetic_genres.yaml")
STEPS = 16  # sixteenth-note steps per bar
TABLE = 4096  # wavetable length
RELEASE = 0.01  # seconds of fade at a note's end
BLOCK = 16384  # samples a voice renders at once: temporaries stay small, cached, free of page faults
# Bass notes in scale degrees above the chord root; a "step" goes one degree up or down.
BASS_NOTES = {"root": 0, "third": 2, "fifth": 4, "octave": 7, "step": 1}
REPORTS = 10  # progress lines logged while a dataset is written
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

log = logging.getLogger(__name__)


@functools.cache
def _spec() -> dict[str, Any]:
    """The parsed synthetic_genres.yaml."""
    with SPEC_FILE.open() as f:
        return yaml.safe_load(f)


GENRES: tuple[str, ...] = tuple(_spec()["genres"])


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    """One draw from [lo, hi]."""
    return float(rng.uniform(bounds[0], bounds[1]))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key of `weights`, drawn with probability proportional to its value."""
    names = list(weights)
    p = np.array([weights[k] for k in names], dtype=float)
    return names[rng.choice(len(names), p=p / p.sum())]


def _grid(genre: dict, rng: np.random.Generator, seconds: float, sr: int) -> tuple[np.ndarray, int]:
    """Onset sample of every sixteenth step, swung and humanised (bars * 16,); the excerpt's start in bar one."""
    step = 60.0 / _uniform(rng, genre["tempo"]) / 4
    bars = int(np.ceil(seconds / (STEPS * step))) + 1
    k = np.arange(bars * STEPS)
    unit = 2 if genre["swing_unit"] == 8 else 1
    swing = (_uniform(rng, genre["swing"]) - 0.5) * 2 * unit * step * (k % (2 * unit) == unit)
    jitter = np.clip(rng.normal(0.0, 0.004, k.size), -step / 4, step / 4)
    times = np.maximum(k * step + swing + jitter, 0)
    return np.round(times * sr).astype(np.int64), int(rng.uniform(0, STEPS * step) * sr)


def _hits(pattern: list[float], bars: int, variation: float, rng: np.random.Generator) -> np.ndarray:
    """A two-bar loop drawn from a 16-step probability grid, varied per bar: (bars * 16,) bool."""
    p = np.asarray(pattern, dtype=float)
    loop = rng.random((2, STEPS)) < p
    fresh = rng.random((bars, STEPS)) < p
    keep = rng.random((bars, STEPS)) >= variation
    return np.where(keep, loop[np.arange(bars) % 2], fresh).ravel()


def _events(pattern: list[float], onsets: np.ndarray, n: int, variation: float,
            rng: np.random.Generator) -> np.ndarray:
    """Indices of the steps that sound and fall inside the track: (events,)."""
    hits = _hits(pattern, onsets.size // STEPS, variation, rng)
    return np.flatnonzero(hits & (onsets < n))


def _wavetable(harmonics: list[float], rng: np.random.Generator) -> np.ndarray:
    """One cycle of a jittered harmonic timbre, peak 1: (TABLE,)."""
    h = np.arange(1, len(harmonics) + 1)
    amps = np.asarray(harmonics) * np.exp(rng.normal(0, 0.3, h.size)) * h ** rng.uniform(-0.3, 0.3)
    amps[0] = harmonics[0]
    phase = 2 * np.pi * np.arange(TABLE) / TABLE
    wave = amps @ np.sin(h[:, None] * phase)
    return wave / np.abs(wave).max()


def _voice(inst: dict, rng: np.random.Generator, onsets: np.ndarray, length: np.ndarray,
           midi: np.ndarray, vel: np.ndarray, n: int, sr: int) -> np.ndarray:
    """Notes (sorted onsets and lengths in samples, MIDI (events, voices), velocity) on one instrument: (n,)."""
    table = _wavetable(inst["harmonics"], rng).astype(np.float32)
    decay = inst["decay"] * float(np.exp(rng.normal(0, 0.2)))
    drive = _uniform(rng, inst["drive"])
    increment = (TABLE * 440.0 * 2 ** ((midi.T - 69) / 12) / sr).astype(np.float32)  # per sample: (voices, events)
    voices = increment.shape[0]
    rates = np.float32([-1 / (decay * sr), 1 / (inst["attack"] * sr), 1 / (RELEASE * sr)])
    out = np.zeros(n, dtype=np.float32)
    first = int(onsets[0]) if onsets.size else n
    sounding = np.repeat(np.arange(onsets.size, dtype=np.int32), np.diff(onsets, append=n))  # note of each sample
    for start in range(first, n, BLOCK):
        note = sounding[start - first:start - first + BLOCK]
        age = (np.arange(start, start + note.size) - onsets[note]).astype(np.float32)  # samples since onset
        env = np.exp(age * rates[0]) * np.minimum(age * rates[1], 1) * vel[note]
        env *= np.clip((length[note] - age) * rates[2], 0, 1)
        wave = sum(table[(age * inc[note]).astype(np.int32) & (TABLE - 1)] for inc in increment)
        if drive > 0:
            wave = np.tanh(wave * (drive / voices)) * (voices / np.tanh(drive))
        out[start:start + note.size] = wave * env
    out *= 1 / np.sqrt(voices)
    return out


def _degrees_to_midi(scale: list[int], degrees: np.ndarray) -> np.ndarray:
    """Scale degrees (0-based, any octave) to semitones above the key's root, same shape."""
    return np.asarray(scale)[degrees % 7] + 12 * (degrees // 7)


def _harmony(spec: dict, rng: np.random.Generator, bars: int) -> tuple[list[int], np.ndarray, int]:
    """A track's scale, chord root per bar as a 0-based degree (bars,), and key (0 = C)."""
    scale = _spec()["scales"][spec["scales"][rng.integers(len(spec["scales"]))]]
    progression = np.asarray(spec["progressions"][rng.integers(len(spec["progressions"]))]) - 1
    roots = progression[(np.arange(bars) + rng.integers(progression.size)) % progression.size]
    return scale, roots, int(rng.integers(12))


def _notes(part: str, spec: dict, scale: list[int], roots: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Semitones above the key for the events of a part, from their chord roots (events,): (events, voices)."""
    if part == "chords":
        voicing = spec["voicings"][rng.integers(len(spec["voicings"]))]
        if voicing == "power":
            return _degrees_to_midi(scale, roots)[:, None] + np.array([0, 7, 12])
        stack = np.arange(4 if voicing == "seventh" else 3) * 2
        return _degrees_to_midi(scale, roots[:, None] + stack)
    if part == "bass":
        names = list(spec["notes"])
        weights = np.array([spec["notes"][k] for k in names], dtype=float)
        chosen = np.asarray(names)[rng.choice(len(names), roots.size, p=weights / weights.sum())]
        offset = np.array([BASS_NOTES[c] for c in chosen], dtype=np.int64)
        offset *= np.where(chosen == "step", rng.choice([-1, 1], roots.size), 1)
        return _degrees_to_midi(scale, roots + offset)[:, None]
    walk = np.cumsum(rng.integers(-spec["leap"], spec["leap"] + 1, roots.size)) + rng.integers(7)
    walk = 14 - np.abs(np.mod(walk, 28) - 14)  # fold the random walk into two octaves
    return _degrees_to_midi(scale, walk)[:, None]


def _part(part: str, genre: dict, harmony: tuple[list[int], np.ndarray, int],
          onsets: np.ndarray, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One pitched part (chords, bass or lead) at its drawn level: (n,)."""
    spec = genre[part]
    scale, bar_roots, key = harmony
    steps = _events(spec["pattern"], onsets, n, genre["variation"], rng)
    inst = _spec()["instruments"][_pick(rng, spec["instruments"])]
    midi = _notes(part, spec, scale, bar_roots[steps // STEPS], rng) + spec["register"] + key
    length = np.full(steps.size, spec["length"] * (onsets[-1] - onsets[0]) / (onsets.size - 1), dtype=np.float32)
    vel = rng.uniform(0.6, 1.0, steps.size).astype(np.float32)
    audio = _voice(inst, rng, onsets[steps], length, midi, vel, n, sr)
    audio *= 10 ** (_uniform(rng, spec["level_db"]) / 20)
    return audio


def _drum_sounds(rng: np.random.Generator, sr: int, hat_decay: float) -> dict[str, np.ndarray]:
    """Jittered one-shot kick, snare and hat: name -> (samples,)."""
    t = np.arange(int(0.35 * sr)) / sr
    sweep = rng.uniform(40, 60) + rng.uniform(60, 120) * np.exp(-t / rng.uniform(0.015, 0.04))
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / sr) * np.exp(-t / rng.uniform(0.06, 0.2))
    kick += 0.3 * rng.standard_normal(t.size) * np.exp(-t / 0.003)
    body = np.sin(2 * np.pi * rng.uniform(160, 240) * t) * np.exp(-t / 0.04) * rng.uniform(0.3, 0.8)
    snare = rng.uniform(0.4, 0.8) * rng.standard_normal(t.size) * np.exp(-t / rng.uniform(0.05, 0.12)) + body
    th = np.arange(int(min(0.6, 6 * hat_decay) * sr)) / sr
    hat = np.diff(rng.standard_normal(th.size + 2), n=2) / 4 * np.exp(-th / hat_decay)
    return {"kick": kick.astype(np.float32), "snare": snare.astype(np.float32), "hat": hat.astype(np.float32)}


def _drums(genre: dict, onsets: np.ndarray, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """The drum kit played from the genre's grids at its drawn level: (n,)."""
    spec = genre["drums"]
    out = np.zeros(n, dtype=np.float32)
    for name, sound in _drum_sounds(rng, sr, _uniform(rng, spec["hat_decay"])).items():
        steps = _events(spec[name], onsets, n, genre["variation"], rng)
        prob = np.asarray(spec[name])[steps % STEPS]
        vel = rng.uniform(0.75, 1.0, steps.size) * (0.3 + 0.7 * prob) * 10 ** (rng.uniform(-4, 4) / 20)
        for start, v in zip(onsets[steps], vel):
            piece = sound[: n - start]
            out[start:start + piece.size] += v * piece
    out *= 10 ** (_uniform(rng, spec["level_db"]) / 20)
    return out


def _rms(x: np.ndarray) -> float:
    """Root mean square of a signal."""
    return float(np.sqrt(np.mean(x**2)) + 1e-12)


def _response(spec: dict, rng: np.random.Generator, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """A track's EQ on a log grid: frequencies (512,) in Hz and gains (512,).

    Low-pass, tilt around 1 kHz and a 30 Hz high-pass from the genre's production, then
    a few random peaking bands from the yaml's mastering section.
    """
    f = np.geomspace(1, sr / 2, 512)
    lowpass = 1 / np.sqrt(1 + (f / _uniform(rng, spec["lowpass_hz"])) ** 4)
    tilt = (np.maximum(f, 50) / 1000) ** (_uniform(rng, spec["tilt_db"]) / 6.02)
    highpass = f**2 / (f**2 + 30**2)
    eq = _spec()["mastering"]
    bands = eq["eq_bands"]
    centre = rng.uniform(*np.log2(eq["eq_hz"]), bands)
    width = rng.uniform(*eq["eq_width_octaves"], bands)
    gain_db = rng.uniform(*eq["eq_gain_db"], bands)
    peaks = gain_db * np.exp(-0.5 * ((np.log2(f)[:, None] - centre) / width) ** 2)
    return f, lowpass * tilt * highpass * 10 ** (peaks.sum(1) / 20)


def _reverb(spec: dict, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Impulse response of a room, decaying noise of unit energy scaled by the wet level: (samples,)."""
    rt60 = _uniform(rng, spec["reverb_seconds"])
    t = np.arange(min(n, int(rt60 * sr))) / sr
    ir = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)
    return ir / np.sqrt(np.sum(ir**2)) * 10 ** (_uniform(rng, spec["reverb_db"]) / 20)


def _master(x: np.ndarray, spec: dict, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Noise floor, reverb, EQ, loudness and a soft limiter: (n,) -> (n,) float32 in (-1, 1)."""
    noise = rng.standard_normal(x.size, dtype=np.float32)
    noise *= _rms(x) * 10 ** (_uniform(rng, spec["noise_db"]) / 20)
    noise += x
    grid, response = _response(spec, rng, sr)
    room = np.fft.rfft(_reverb(spec, rng, x.size, sr).astype(np.float32), x.size)
    room += 1
    room *= np.interp(np.fft.rfftfreq(x.size, 1 / sr), grid, response).astype(np.float32)
    room *= np.fft.rfft(noise)
    x = np.fft.irfft(room, x.size)
    x *= 10 ** (_uniform(rng, spec["loudness_db"]) / 20) / (0.99 * _rms(x))
    x = np.tanh(x, out=x)
    x *= 0.99
    return x


def _track_spec(genre: str, rng: np.random.Generator) -> dict:
    """The genre's parameters; for a share of tracks, with a relative genre's sound (borrow.keys)."""
    spec = _spec()["genres"][genre]
    borrow = _spec()["borrow"]
    if rng.random() >= borrow["probability"]:
        return spec
    other = _spec()["genres"][spec["relatives"][rng.integers(len(spec["relatives"]))]]
    mixed = {key: dict(value) if isinstance(value, dict) else value for key, value in spec.items()}
    for section, keys in borrow["keys"].items():
        if section in spec and section in other:
            mixed[section].update({key: other[section][key] for key in keys})
    return mixed


def render_track(genre: str, rng: np.random.Generator, seconds: float, sample_rate: int) -> np.ndarray:
    """One procedural track of `genre`: (round(seconds * sample_rate),) float32 in [-1, 1]."""
    if genre not in GENRES:
        raise ValueError(f"unknown genre {genre!r}; expected one of {', '.join(GENRES)}")
    spec = _track_spec(genre, rng)
    onsets, start = _grid(spec, rng, seconds, sample_rate)
    n = start + int(round(seconds * sample_rate))
    harmony = _harmony(spec["harmony"], rng, onsets.size // STEPS)
    mix = _part("chords", spec, harmony, onsets, rng, n, sample_rate)
    for part in ("bass", "lead"):
        mix += _part(part, spec, harmony, onsets, rng, n, sample_rate)
    if "drums" in spec:
        mix += _drums(spec, onsets, rng, n, sample_rate)
    return _master(mix[start:], spec["production"], rng, sample_rate)


def track_rng(seed: int, genre: str, index: int) -> np.random.Generator:
    """The generator of one track, a function of (seed, genre, index) only."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(genre.encode()), index)))


def _non_empty(path: Path) -> bool:
    """Whether `path` is a directory holding anything."""
    return path.is_dir() and any(path.iterdir())


def _write_track(root: Path, seed: int, seconds: float, sample_rate: int, track: tuple[str, int]) -> None:
    """Render one track, (genre, index), into root/genres_original/<genre>/<genre>.NNNNN.wav."""
    genre, index = track
    audio = render_track(genre, track_rng(seed, genre, index), seconds, sample_rate)
    path = root / "genres_original" / genre / f"{genre}.{index:05d}.wav"
    sf.write(path, audio, sample_rate, subtype="PCM_16", format="WAV")


def _keep_freed_memory() -> None:
    """Worker setup: glibc keeps freed arrays for reuse rather than returning them to the OS.

    A 30 s track allocates ~50 MB of temporaries; handed back, their pages fault in anew on
    every track, a fifth of the CPU time. Only the worker processes are changed.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _write_tree(root: Path, tracks_per_genre: int, seed: int, seconds: float, sample_rate: int,
                workers: int) -> None:
    """Render every track into root/genres_original/<genre>/<genre>.NNNNN.wav over `workers` processes."""
    for genre in GENRES:
        (root / "genres_original" / genre).mkdir(parents=True)
    tracks = [(genre, i) for genre in GENRES for i in range(tracks_per_genre)]
    write = functools.partial(_write_track, root, seed, seconds, sample_rate)
    every, start = max(1, len(tracks) // REPORTS), time.perf_counter()
    # Spawned, not forked: a parent holding threads (torch, Ray) cannot deadlock its children.
    with ProcessPoolExecutor(min(workers, len(tracks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_keep_freed_memory) as pool:
        for done, _ in enumerate(pool.map(write, tracks), 1):
            if done % every == 0 or done == len(tracks):
                log.info("%d/%d tracks in %.0f s", done, len(tracks), time.perf_counter() - start)


def _generate_atomic(out_dir: Path, tracks_per_genre: int, seed: int, seconds: float, sample_rate: int,
                     workers: int | None = None) -> Path:
    """Generate into a temporary sibling and rename it into place; a dataset already there wins."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not 1 <= tracks_per_genre <= 1000 or not 0 < seconds <= 3600 or sample_rate < 1:  # NaN fails too
        raise UserError(f"cannot generate {tracks_per_genre} tracks per genre of {seconds} s at {sample_rate} Hz; "
                        "pass 1 to 1000 tracks, a duration in (0, 3600] s and a positive sample rate")
    if not 0 <= seed < 2**32:
        raise UserError(f"cannot generate with seed {seed}; pass a seed in [0, 2**32)")
    if not 1 <= workers <= 1024:
        raise UserError(f"cannot generate with {workers} worker processes; pass 1 to 1024")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        _write_tree(tmp, tracks_per_genre, seed, seconds, sample_rate, workers)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not _non_empty(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def generate(out_dir: Path, tracks_per_genre: int, seed: int, seconds: float = 30.0,
             sample_rate: int = 22050, workers: int | None = None) -> Path:
    """Write a synthetic GTZAN-shaped dataset into a new or empty `out_dir` over `workers` processes (all cores)."""
    out_dir = Path(out_dir).expanduser().absolute()
    if (out_dir.exists() and not out_dir.is_dir()) or _non_empty(out_dir):
        raise UserError(f"{out_dir} already exists and is not an empty directory; "
                        "choose a new output directory or remove that one")
    return _generate_atomic(out_dir, tracks_per_genre, seed, seconds, sample_rate, workers)


def embedded_dataset(tracks_per_genre: int | None = None, seed: int | None = None) -> Path:
    """The default synthetic dataset in the cache, generated on first use and reused after."""
    cfg = _spec()["embedded"]
    n = cfg["tracks_per_genre"] if tracks_per_genre is None else tracks_per_genre
    seed = cfg["seed"] if seed is None else seed
    digest = hashlib.sha256(SPEC_FILE.read_bytes()).hexdigest()[:8]
    name = f"v{VERSION}-{digest}-n{n}-seed{seed}-{cfg['seconds']:g}s-{cfg['sample_rate']}hz"
    path = cache_dir() / "embedded" / name
    if not _non_empty(path):
        _generate_atomic(path, n, seed, cfg["seconds"], cfg["sample_rate"])
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Command line: write a synthetic dataset into OUT_DIR."""
    cfg = _spec()["embedded"]
    parser = argparse.ArgumentParser(prog="python -m genre_ray.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new or empty directory to write into")
    parser.add_argument("--tracks-per-genre", type=int, default=cfg["tracks_per_genre"], help="clips per genre")
    parser.add_argument("--seed", type=int, default=cfg["seed"], help="same seed, byte-identical files")
    parser.add_argument("--seconds", type=float, default=cfg["seconds"], help="length of every track")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering tracks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = generate(args.out_dir, args.tracks_per_genre, args.seed, args.seconds, cfg["sample_rate"], args.workers)
    print(f"wrote {args.tracks_per_genre * len(GENRES)} tracks ({len(GENRES)} genres x "
          f"{args.tracks_per_genre}, {args.seconds:g} s at {cfg['sample_rate']} Hz) to {out / 'genres_original'}")
    return 0


if __name__ == "__main__":
    main()
