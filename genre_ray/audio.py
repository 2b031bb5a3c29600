"""Audio in and out of segments, without torch: what `genre_ray.data` (training) and the
ONNX runtime of `genre_ray.predict` (serving, torch never imported) both read files with.

    file --read--> (frames, channels) float32 --mono--> (samples,) --segment--> (n, length)
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

MAX_DENOMINATOR = 1000  # of a resampling ratio: bounds the resampler's kernel (data.resampled)
BATCH = 64  # segments per forward pass when classifying a file (either runtime): bounds memory on long files


class Unusable(ValueError):
    """An audio file that cannot be used; the message says why and what to do, and reads
    after the file's name ("<file> does not decode (...); ...")."""


def read(path: Path) -> tuple[np.ndarray, int]:
    """The whole file as libsndfile decodes it, (frames, channels) float32, and its rate.

    Unusable when the file cannot be read, does not decode (a header can be fine and the
    data behind it not), or holds NaN or infinite samples (a float file can; they would
    make every feature of its segments NaN)."""
    try:  # through Python's open: a name that is not valid UTF-8 reaches libsndfile as bytes
        with open(path, "rb") as f:
            audio, rate = sf.read(f, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as err:  # sf.LibsndfileError is a RuntimeError
        raise Unusable(_read_problem(Path(path), err)) from None
    if not np.isfinite(audio).all():
        raise Unusable("holds NaN or infinite samples; re-export it as 16-bit PCM")
    return audio, rate


def mono(audio: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,): the channels' mean."""
    return audio.mean(axis=1, dtype=np.float32)


def resampling_ratio(rate: int, sample_rate: int) -> Fraction:
    """new/old rate, as the nearest fraction with a denominator up to MAX_DENOMINATOR."""
    return Fraction(sample_rate, rate).limit_denominator(MAX_DENOMINATOR)


def segment(wave: np.ndarray, length: int, min_tail: int) -> np.ndarray:
    """Cut (samples,) into (n, length); a tail >= min_tail is zero-padded, else dropped."""
    n_full, tail = divmod(len(wave), length)
    if tail >= min_tail:
        wave = np.pad(wave, (0, length - tail))
        n_full += 1
    return wave[: n_full * length].reshape(n_full, length)


def _read_problem(path: Path, err: Exception) -> str:
    if path.is_file() and not os.access(path, os.R_OK):
        return "cannot be read (permission denied); make it readable (chmod a+r)"
    detail = getattr(err, "error_string", None) or str(err) or type(err).__name__
    detail = detail.splitlines()[0].rstrip(".")  # libsndfile's, without the path we name
    return (f"does not decode ({detail}); use a file libsndfile reads "
            "(wav, flac, ogg, au, aiff, mp3, ...)")
