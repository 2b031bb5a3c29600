"""Augmented copies of training segments: time stretch and pitch shift, batched.

    segments (n, samples) -> per copy: time-stretched block, pitch-shifted block
                          -> (2 * copies * n, samples)

Both effects are one STFT phase vocoder (`stretch`): a time stretch keeps the
stretched length (zero-padded to the segment); a pitch shift by k semitones stretches
by q/p and resamples from p to q, where p/q is the fraction with a small denominator
nearest to 2**(k/12). torchaudio's PitchShift resamples from int(sr / 2**(-k/12)) to
sr instead, whose reduced ratio is huge for most k (23361:22050 has gcd 3 at k=1), so
its resampling kernel is (7350, ~7800) and costs ~7,800 multiply-adds per sample
(docs/design.md#pitfall-pitchshift-resampling-cost); p/q = 89/84 costs ~100 and is 0.1
cent off 2**(1/12) (with q <= 100, no step from -12 to 12 is more than 2 cents off).

The phase vocoder accumulates unit phasors (a cumulative complex product) instead of
angles: the same output as torchaudio.functional.phase_vocoder up to rounding (the
2-pi wrap it does changes nothing modulo 2 pi), without atan2, cos and sin, and
without summing phases of 1e5 rad in float32: against a float64 reference on a 5 s
segment, torchaudio's float32 output is off by ~1e-2 of its peak magnitude in the last
frames, this one by ~1e-5.

Segments that share a rate (or a semitone step) go through the vocoder together, in
chunks that bound peak memory; `augment` quantises its random rates to RATE_STEP so
that they do. On a GPU chunks are large (the vocoder is a handful of kernels per
chunk); on a CPU they are small (large complex tensors fall out of cache and run
slower per segment) and run in parallel, one per torch thread. Everything runs on
`device` and comes back on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
import torchaudio.functional as AF

N_FFT_STRETCH = 1024  # STFT sizes at 22,050 Hz (46 ms, 23 ms), scaled with the sample rate:
N_FFT_PITCH = 512     # torchaudio's PitchShift's default
BASE_RATE = 22050
RATE_STEP = 0.005     # augment's stretch rates are multiples of this: 21 rates in [1.1, 1.2]
MAX_DENOMINATOR = 100  # bound of q in the resampling ratio p/q of a pitch shift
CHUNK = {"cpu": 4, "cuda": 64}  # segments per vocoder call, by device type (docs/benchmarks.md)


@torch.no_grad()
def augment(waves: torch.Tensor, sample_rate: int, params: dict[str, Any],
            generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Time-stretched and pitch-shifted copies: (n, samples) -> (2 * copies * n, samples).

    For each of params["copies"]: rates uniform in params["time_stretch"] (quantised to
    RATE_STEP), then whole semitones uniform in params["pitch_shift"] (inclusive), drawn
    from `generator` in that order, n of each. Computed on `device` (default: where
    `waves` are); the result is on the CPU.
    """
    out = []
    for _ in range(params["copies"]):
        low, high = params["time_stretch"]
        rates = low + (high - low) * torch.rand(len(waves), generator=generator)
        out.append(time_stretch(waves, quantise(rates, RATE_STEP), sample_rate, device=device))
        low, high = params["pitch_shift"]
        steps = torch.randint(low, high + 1, (len(waves),), generator=generator)
        out.append(pitch_shift(waves, sample_rate, steps, device=device))
    return torch.cat(out) if out else waves.new_zeros((0, waves.shape[-1]), device="cpu")


def quantise(rates: torch.Tensor, step: float) -> torch.Tensor:
    """Each rate to the nearest multiple of `step` (float64, so equal rates compare equal):
    (n,) -> (n,)."""
    return (rates.double() / step).round() * step


@torch.no_grad()
def time_stretch(waves: torch.Tensor, rates: float | torch.Tensor, sample_rate: int = BASE_RATE,
                 *, device: torch.device | str | None = None,
                 chunk: int | None = None) -> torch.Tensor:
    """Change tempo by `rates` (> 1 is faster) keeping pitch; each result zero-padded or
    cut to the input's length: (n, samples) or (samples,) -> same, on the CPU.

    rates: one float, or (n,), one per segment; segments sharing a rate are batched.
    """
    if (torch.as_tensor(rates) <= 0).any():
        raise ValueError(f"time-stretch rates must be > 0, got {rates}")
    n_fft = _n_fft(N_FFT_STRETCH, sample_rate)
    return _per_group(waves, rates, lambda x, rate: stretch(x, rate, n_fft), device, chunk)


@torch.no_grad()
def pitch_shift(waves: torch.Tensor, sample_rate: int, steps: int | torch.Tensor, *,
                device: torch.device | str | None = None, chunk: int | None = None,
                max_denominator: int = MAX_DENOMINATOR) -> torch.Tensor:
    """Shift pitch by whole semitones keeping tempo: (n, samples) or (samples,) -> same,
    on the CPU.

    steps: one int, or (n,) ints, one per segment; segments sharing a step are batched.
    Frequencies move by p/q, the fraction nearest 2**(step/12) with q <= max_denominator.
    """
    n_fft = _n_fft(N_FFT_PITCH, sample_rate)

    def shift(x: torch.Tensor, step: float) -> torch.Tensor:
        p, q = semitone_ratio(int(step), max_denominator)
        if p == q:
            return x
        return AF.resample(stretch(x, q / p, n_fft), p, q)  # slower by p/q, then back

    return _per_group(waves, steps, shift, device, chunk)


def semitone_ratio(steps: int, max_denominator: int = MAX_DENOMINATOR) -> tuple[int, int]:
    """(p, q): the fraction p/q nearest 2**(steps/12) with q <= max_denominator."""
    if max_denominator < 1:
        raise ValueError(f"max_denominator must be >= 1, got {max_denominator}")
    ratio = Fraction(2.0 ** (steps / 12)).limit_denominator(max_denominator)
    return ratio.numerator, ratio.denominator


def stretch(waves: torch.Tensor, rate: float, n_fft: int) -> torch.Tensor:
    """Phase-vocoder time stretch (Hann window, hop n_fft // 4), not padded back:
    (batch, samples) -> (batch, round(samples / rate)), on the input's device."""
    hop = n_fft // 4
    window = torch.hann_window(n_fft, device=waves.device)
    spec = torch.stft(waves, n_fft, hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    return torch.istft(phase_vocoder(spec, rate), n_fft, hop, window=window,
                       length=round(waves.shape[-1] / rate))


def phase_vocoder(specs: torch.Tensor, rate: float) -> torch.Tensor:
    """torchaudio.functional.phase_vocoder's stretch (speed up by `rate`), with phases
    carried as unit phasors: (..., freq, frames) complex -> (..., freq, ceil(frames / rate)).

    Output frame j sits at t = j * rate: its magnitude interpolated between input frames
    floor(t) and floor(t) + 1, its phase the previous output phase advanced by the phase
    difference of those two frames. The frame past the end has magnitude 0 and phase 0;
    a silent bin has phase 0 (torch.angle(0) = 0, as in torchaudio).
    The phase advance `phase_vocoder` takes is not needed: it cancels modulo 2 pi.
    """
    if rate == 1.0:
        return specs
    frames = specs.shape[-1]
    t = torch.arange(math.ceil(frames / rate), dtype=torch.float64, device=specs.device) * rate
    idx = t.long()
    alpha = (t - idx).to(specs.real.dtype)
    unit = torch.sgn(specs + torch.finfo(alpha.dtype).tiny ** 0.5)  # silent bin: phase 0
    step = torch.empty_like(unit)  # step[k]: the phase change from input frame k to k + 1
    torch.mul(unit[..., 1:], unit[..., :-1].conj(), out=step[..., :-1])
    step[..., -1] = unit[..., -1].conj()  # to the frame past the end, of phase 0
    phasor = torch.cat([unit[..., :1], step.index_select(-1, idx[:-1])], dim=-1).cumprod(dim=-1)
    mag = specs.abs()
    beyond = torch.where(idx + 1 < frames, alpha, 0)  # the frame past the end has magnitude 0
    following = mag.index_select(-1, (idx + 1).clamp_max(frames - 1))
    return ((1 - alpha) * mag.index_select(-1, idx) + beyond * following) * phasor


def _per_group(waves: torch.Tensor, keys: float | torch.Tensor, effect: Callable,
               device: torch.device | str | None, chunk: int | None) -> torch.Tensor:
    """Apply effect(x, key) to the segments sharing each key, `chunk` at a time on
    `device`, each result fitted to the input's length: (n, samples) -> same, on the CPU."""
    single = waves.dim() == 1
    waves = waves.reshape(-1, waves.shape[-1])
    keys = torch.as_tensor(keys, dtype=torch.float64).reshape(-1)
    if keys.numel() not in (1, len(waves)):
        raise ValueError(f"{keys.numel()} rates or steps for {len(waves)} segments")
    keys = keys.expand(len(waves))
    device = torch.device(device) if device is not None else waves.device
    chunk = chunk or CHUNK.get(device.type, CHUNK["cuda"])
    jobs = [(key, idx) for key in keys.unique().tolist()
            for idx in (keys == key).nonzero().squeeze(1).split(chunk)]

    def run(job: tuple[float, torch.Tensor]) -> torch.Tensor:
        key, idx = job
        return _fit(effect(waves[idx].to(device), key), waves.shape[-1]).cpu()

    out = torch.empty(waves.shape, dtype=waves.dtype)
    with _chunk_map(device) as chunk_map:
        for (_, idx), result in zip(jobs, chunk_map(run, jobs)):
            out[idx] = result
    return out[0] if single else out


@contextmanager
def _chunk_map(device: torch.device) -> Iterator[Callable]:
    """`map` over chunks. On a CPU with several torch threads, chunks run in parallel,
    one per thread, each single-threaded (torch's thread count is 1 meanwhile, then
    restored): the vocoder is dozens of small ops per chunk, and a parallel region per op
    costs ~5x on a busy machine (docs/benchmarks.md); a chunk's result then also does not
    depend on the thread count. On a GPU, in turn, one after another."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield map
        return
    torch.set_num_threads(1)  # threads started from here run their ops single-threaded
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(threads)


def _fit(x: torch.Tensor, samples: int) -> torch.Tensor:
    """Zero-pad or cut the last dimension to `samples`."""
    return torch.nn.functional.pad(x, (0, max(0, samples - x.shape[-1])))[..., :samples]


def _n_fft(base: int, sample_rate: int) -> int:
    """`base` (an STFT size at 22,050 Hz) scaled to `sample_rate`, a power of two."""
    return int(base * 2.0 ** round(math.log2(sample_rate / BASE_RATE)))
