"""Augmentation: genre_ray.augment over the former per-item path, same segments, same run.

    python -m bench.augment [--segments 128] [--repeats 2] [--device cuda] [--threads T]

Baseline: the former features.augment, kept below as it was (a phase vocoder per
segment through T.Spectrogram -> T.TimeStretch -> T.InverseSpectrogram, and
T.PitchShift per semitone step over chunks of 64 segments, whose resampling ratio
23361:22050 at +1 semitone builds a (7350, ~7800) kernel). New: genre_ray.augment
(batched phasor vocoder, pitch shift by resampling with a small ratio such as 89:84),
on the CPU and, where there is one, on the GPU. Both draw from the same seeded
generator, so their pitch-shifted blocks hold the same steps: the log-mel correlation
of new and baseline outputs shows that quality is kept. Each timing is the best of
`--repeats`, baseline and new interleaved (the machine may be shared), as
wall-clock and as CPU seconds of this process.
Goal: new/baseline <= 1/3.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torchaudio.transforms as T

from bench.common import context
from genre_ray import augment as new
from genre_ray import config

RATE, SEGMENT = 22050, 110250


# ---- the baseline: features.augment before genre_ray.augment, unchanged ---------------

def reference_augment(waves: torch.Tensor, sample_rate: int, params: dict[str, Any],
                      generator: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(params["copies"]):
        low, high = params["time_stretch"]
        rates = low + (high - low) * torch.rand(len(waves), generator=generator)
        out.append(torch.stack([reference_time_stretch(w, r)
                                for w, r in zip(waves, rates.tolist())]))
        low, high = params["pitch_shift"]
        out.append(reference_pitch_shift(waves, sample_rate, torch.randint(
            low, high + 1, (len(waves),), generator=generator)))
    return torch.cat(out)


def reference_pitch_shift(waves: torch.Tensor, sample_rate: int,
                          steps: torch.Tensor) -> torch.Tensor:
    shifted = waves.clone()
    for n in steps.unique().tolist():
        shift = T.PitchShift(sample_rate, n)
        chosen = (steps == n).nonzero().squeeze(1)
        for idx in chosen.split(64):
            shifted[idx] = shift(waves[idx])
    return shifted


def reference_time_stretch(wave: torch.Tensor, rate: float, n_fft: int = 1024) -> torch.Tensor:
    hop = n_fft // 4
    spec = T.Spectrogram(n_fft=n_fft, hop_length=hop, power=None)(wave)
    stretched = T.TimeStretch(hop_length=hop, n_freq=n_fft // 2 + 1)(spec, rate)
    out = T.InverseSpectrogram(n_fft=n_fft, hop_length=hop)(stretched)
    return torch.nn.functional.pad(out, (0, max(0, wave.numel() - out.numel())))[: wave.numel()]


# ---- inputs, timing, quality ------------------------------------------------------

def segments(n: int, seed: int = 0) -> torch.Tensor:
    """Music-like segments: 3 to 5 harmonic tones (a chord) over noise: (n, 110250)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SEGMENT) / RATE
    waves = 0.05 * torch.randn(n, SEGMENT, generator=g)
    for i in range(n):
        for _ in range(3 + i % 3):
            f0 = 110 * 2 ** (torch.randint(0, 36, (), generator=g).item() / 12)
            waves[i] += sum(0.2 / h * torch.sin(2 * math.pi * h * f0 * t) for h in (1, 2, 3))
    return waves


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and this process's CPU seconds of fn(), and its result (on the CPU,
    so a GPU's work is done when the clock stops). CPU seconds are the steadier figure
    on a shared machine, wall-clock the one that counts on a GPU."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def logmel_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per segment, the correlation of two batches' log-mel spectrograms: (n,)."""
    mel = T.MelSpectrogram(RATE, n_fft=2048, hop_length=512, n_mels=64)
    x, y = ((mel(w) + 1e-6).log().flatten(1) for w in (a, b))
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))


def runner(name: str, waves: torch.Tensor, params: dict[str, Any]):
    """The call to time: the baseline, or genre_ray.augment on device `name`."""
    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if name == "baseline":
            return reference_augment(waves, RATE, params, generator)
        return new.augment(waves, RATE, params, generator, device=name)
    return run


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", help="also time the new path on this device "
                        "(default: cuda where there is one)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params, n = config.as_json(config.load())["augment"], args.segments
    waves = segments(n)
    print(context())
    print(f"{n} segments of {SEGMENT} samples at {RATE} Hz, params {params}")
    other = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = ["baseline", "cpu"] + ([other] if other != "cpu" else [])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in names[2:]:  # warm-up: CUDA context, kernels
            runner(name, waves[:2], params)()
        for _ in range(args.repeats):
            for name in names:
                wall, cpu, outs[name] = timed(runner(name, waves, params))
                times[name].append((wall, cpu))
    best = {name: (min(w for w, _ in runs), min(c for _, c in runs))
            for name, runs in times.items()}
    base, base_cpu = best["baseline"]
    print(f"baseline (per item, T.PitchShift): {base:.2f} s wall "
          f"({1e3 * base / n:.1f} ms/segment), {base_cpu:.2f} s CPU")
    ratio = math.inf
    for name in names[1:]:
        wall, cpu = best[name]
        ratio = min(ratio, wall / base)
        print(f"genre_ray.augment on {name}: {wall:.2f} s wall ({1e3 * wall / n:.1f} ms/segment), "
              f"{cpu:.2f} s CPU; ratio new/baseline = {wall / base:.3f} (1/{base / wall:.1f}) "
              f"wall, {cpu / base_cpu:.3f} CPU")
    with torch.no_grad():
        stretch = logmel_corr(outs["cpu"][:n], outs["baseline"][:n])
        shift = logmel_corr(outs["cpu"][n:2 * n], outs["baseline"][n:2 * n])
        unshifted = logmel_corr(waves, outs["baseline"][n:2 * n])
    print(f"log-mel correlation new~baseline: time stretch mean {stretch.mean():.3f} "
          f"(min {stretch.min():.3f}; rates quantised to {new.RATE_STEP}), pitch shift mean "
          f"{shift.mean():.3f} (min {shift.min():.3f}); input~baseline pitch shift "
          f"{unshifted.mean():.3f}")
    for name in names[2:]:
        print(f"max |{name} - cpu| = {(outs[name] - outs['cpu']).abs().max().item():.2e}")
    print(f"goal: new/baseline <= 1/3; best {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
