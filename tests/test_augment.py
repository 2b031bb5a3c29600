"""Augmentation by property on real signals: pitch, tempo, the contract of `augment`,
batch = per item, determinism, and closeness to torchaudio's own PitchShift."""
from __future__ import annotations

import math

import pytest
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

from genre_ray import augment as A

RATE, SEG = 22050, 110250
PARAMS = {"copies": 2, "time_stretch": [1.1, 1.2], "pitch_shift": [1, 2]}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _time() -> torch.Tensor:
    return torch.arange(SEG) / RATE


def _tone(freq: float) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * _time())


def _am_tone(freq: float, period: int) -> torch.Tensor:
    """A tone whose loudness rises and falls every `period` samples."""
    return _tone(freq) * (0.5 - 0.5 * torch.cos(2 * math.pi * _time() * RATE / period))


def _music(seed: int, notes: int = 10) -> torch.Tensor:
    """Harmonic notes (5 partials) of 0.5 s each, plus a little noise: (notes * 11025,)."""
    g = torch.Generator().manual_seed(seed)
    pitches = 220 * 2 ** (torch.randint(0, 12, (notes,), generator=g) / 12)
    phase = 2 * math.pi * torch.cumsum(pitches.repeat_interleave(RATE // 2), 0) / RATE
    partials = sum(torch.sin(h * phase) / h for h in range(1, 6))
    return 0.3 * partials + 0.01 * torch.randn(phase.numel(), generator=g)


def _peak_hz(wave: torch.Tensor) -> float:
    return torch.fft.rfft(wave).abs().argmax().item() * RATE / wave.numel()


def _period(wave: torch.Tensor, guess: float) -> int:
    """The envelope's period near `guess` samples: the peak of its autocorrelation
    (unbiased) between 0.6 and 1.4 times the guess."""
    env = torch.nn.functional.avg_pool1d(wave.abs()[None, None], 256, 1, padding=128)[0, 0]
    env = env - env.mean()
    n = env.numel()
    spec = torch.fft.rfft(env, 2 * n)
    acf = torch.fft.irfft(spec * spec.conj())[:n] / (n - torch.arange(n))
    lo, hi = int(0.6 * guess), int(1.4 * guess)
    return lo + acf[lo:hi].argmax().item()


def _logmel_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of two waves' log-mel spectrograms (1 = same spectral content in time)."""
    mel = T.MelSpectrogram(RATE, n_fft=2048, hop_length=512, n_mels=64)
    x, y = ((mel(w) + 1e-6).log().flatten() for w in (a, b))
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


# ---- pitch -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [-3, 1, 2, 7])
@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_pitch_shift_moves_a_tone_by_its_semitones(freq, steps):
    out = A.pitch_shift(_tone(freq), RATE, steps)
    assert out.shape == (SEG,)
    assert _peak_hz(out) == pytest.approx(freq * 2 ** (steps / 12), rel=0.01)
    assert out.abs().max() == pytest.approx(1.0, abs=0.2)  # loudness kept


@pytest.mark.parametrize("steps", range(-12, 13))
def test_semitone_ratio_is_a_small_fraction_within_two_cents(steps):
    p, q = A.semitone_ratio(steps)
    assert q <= A.MAX_DENOMINATOR and math.gcd(p, q) == 1
    assert abs(1200 * math.log2(p / q) - 100 * steps) < 2.0  # cents
    with pytest.raises(ValueError):
        A.semitone_ratio(steps, max_denominator=0)


def test_pitch_shift_is_close_to_torchaudio_pitch_shift():
    """Same spectral content in time as T.PitchShift (log-mel correlation ~0.98), far
    closer than the unshifted input is to it. (2 s: T.PitchShift at +1 is the slow path.)"""
    music = _music(0, notes=4)
    for steps in (1, 2):
        with torch.no_grad():
            reference = T.PitchShift(RATE, steps)(music[None])[0]
        ours = A.pitch_shift(music, RATE, steps)
        assert _logmel_corr(ours, reference) > 0.95
        assert _logmel_corr(ours, reference) > _logmel_corr(music, reference) + 0.2


# ---- tempo -------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [1.1, 1.2, 1.5])
def test_time_stretch_keeps_pitch_and_shortens_the_envelope_period(rate):
    period = 4410  # 0.2 s
    out = A.time_stretch(_am_tone(440.0, period), rate)
    assert out.shape == (SEG,)
    played = round(SEG / rate)
    assert out[played:].abs().max() == 0 and out[played - 2048:played].abs().max() > 0.1
    assert _peak_hz(out[:played]) == pytest.approx(440.0, rel=0.01)
    assert _period(out[:played - 2048], period / rate) == pytest.approx(period / rate, rel=0.01)


def test_time_stretch_is_close_to_the_torchaudio_time_stretch_path():
    """torchaudio's own path: T.Spectrogram -> T.TimeStretch -> T.InverseSpectrogram."""
    music = _music(1)
    hop = A.N_FFT_STRETCH // 4
    spec = T.Spectrogram(n_fft=A.N_FFT_STRETCH, hop_length=hop, power=None)(music)
    stretched = T.TimeStretch(hop_length=hop, n_freq=A.N_FFT_STRETCH // 2 + 1)(spec, 1.25)
    reference = T.InverseSpectrogram(n_fft=A.N_FFT_STRETCH, hop_length=hop)(stretched)
    played = round(SEG / 1.25)
    ours, reference = A.time_stretch(music, 1.25)[:played], reference[:played]
    assert _logmel_corr(ours, reference) > 0.95
    assert _logmel_corr(ours, reference) > _logmel_corr(music[:played], reference) + 0.2


@pytest.mark.parametrize("rate", [0.5, 0.75, 1.25, 2.0])  # exact in float32: same frames
def test_phase_vocoder_matches_torchaudio_in_float64(rate):
    specs = torch.stft(torch.randn(3, 20000, generator=torch.Generator().manual_seed(0)), 512,
                       128, window=torch.hann_window(512), return_complex=True)
    advance = torch.linspace(0, math.pi * 128, 257, dtype=torch.float64)[:, None]
    reference = AF.phase_vocoder(specs.to(torch.complex128), rate, advance)
    ours = A.phase_vocoder(specs, rate)
    assert ours.shape == reference.shape and ours.dtype == specs.dtype
    assert (ours - reference).abs().max() < 1e-4 * reference.abs().max()


# ---- the contract of augment ----------------------------------------------------------

def _segments(n: int = 5) -> torch.Tensor:
    """n segments of 2 s (the contract holds for any length; short keeps tests fast)."""
    waves = torch.stack([_music(i, notes=4) for i in range(n)]).float()
    waves[-1] = 0  # silence stays finite (and silent)
    return waves


def test_augment_shapes_order_and_draws():
    waves = _segments(3)
    out = A.augment(waves, RATE, PARAMS, torch.Generator().manual_seed(0))
    assert out.shape == (2 * 2 * 3, waves.shape[1]) and out.dtype == torch.float32
    assert out.device.type == "cpu" and not out.requires_grad and torch.isfinite(out).all()
    assert out[2::3].abs().max() == 0  # every copy of the silent segment
    g = torch.Generator().manual_seed(0)  # the draws in order: rates, steps, rates, steps
    for copy in range(2):
        rates = 1.1 + 0.1 * torch.rand(3, generator=g)
        steps = torch.randint(1, 3, (3,), generator=g)
        block = out[6 * copy:6 * copy + 6]
        assert torch.allclose(block[:3], A.time_stretch(waves, A.quantise(rates, A.RATE_STEP)))
        assert torch.allclose(block[3:], A.pitch_shift(waves, RATE, steps))


def test_augment_is_deterministic_under_a_seed():
    waves = _segments(2)
    first, again, other = (A.augment(waves, RATE, PARAMS, torch.Generator().manual_seed(s))
                           for s in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_no_copies_is_empty():
    params = {**PARAMS, "copies": 0}
    assert A.augment(_segments(2), RATE, params, torch.Generator()).shape == (0, 2 * RATE)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="> 0"):
        A.time_stretch(torch.zeros(2, 1000), torch.tensor([1.1, 0.0]))
    with pytest.raises(ValueError, match="3 rates or steps for 2 segments"):
        A.pitch_shift(torch.zeros(2, 1000), RATE, torch.tensor([1, 2, 1]))


def test_quantise_rounds_to_the_step():
    rates = torch.tensor([1.1, 1.1024, 1.1026, 1.2])
    assert A.quantise(rates, 0.005).tolist() == pytest.approx([1.1, 1.1, 1.105, 1.2])


def test_batch_equals_per_item_and_chunking_changes_nothing():
    waves = _segments(5)
    rates = torch.tensor([1.1, 1.15, 1.1, 1.2, 1.15], dtype=torch.float64)
    steps = torch.tensor([1, 2, 2, 1, -1])
    for effect, keys in ((lambda w, k, **kw: A.time_stretch(w, k, **kw), rates),
                         (lambda w, k, **kw: A.pitch_shift(w, RATE, k, **kw), steps)):
        batch = effect(waves, keys, chunk=4)
        assert torch.allclose(batch, effect(waves, keys, chunk=1), atol=1e-5)
        for wave, key, out in zip(waves, keys.tolist(), batch):
            assert torch.allclose(effect(wave, key), out, atol=1e-5)


def test_results_do_not_depend_on_torch_threads_which_are_restored():
    waves, steps = _segments(4), torch.tensor([1, 2, 1, 2])
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(A.pitch_shift(waves, RATE, steps))
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


@needs_gpu
def test_gpu_matches_cpu_and_returns_cpu_tensors():
    waves = _segments(3)
    cpu = A.augment(waves, RATE, PARAMS, torch.Generator().manual_seed(0))
    gpu = A.augment(waves, RATE, PARAMS, torch.Generator().manual_seed(0), device="cuda")
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
    assert torch.allclose(gpu, cpu, atol=1e-3)
