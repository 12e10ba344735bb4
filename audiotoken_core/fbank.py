"""Kaldi-compatible log-mel filterbank (`compute-fbank`) in torch, and BEATs' normalisation.

BEATs was trained on Kaldi fbank features, so the features must match Kaldi's recipe
exactly (framing, DC removal, preemphasis, povey window, padded FFT, Kaldi mel banks).
Batched and vectorised: frames are a strided view, one FFT and one matmul per call.
Computed in float64 (float32 on MPS, which lacks it) and returned as float32.
Callers pass checked audio (`audio.prepare_waveform`, long enough for one frame: the
encoders check that), so nothing here validates it again.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582

_FLOAT32_EPS = torch.finfo(torch.float32).eps  # Kaldi's log floor


def _mel(freq: float) -> float:
    """Kaldi's mel scale."""
    return 1127.0 * math.log1p(freq / 700.0)


# Kaldi's FeatureWindowFunction of i = 0 .. length - 1 and a = 2 pi / (length - 1) (symmetric).
WINDOWS = {
    "povey": lambda a, i: (0.5 - 0.5 * torch.cos(a * i)).pow(0.85),
    "hanning": lambda a, i: 0.5 - 0.5 * torch.cos(a * i),
    "hamming": lambda a, i: 0.54 - 0.46 * torch.cos(a * i),
    "rectangular": lambda a, i: torch.ones_like(i),
    "sine": lambda a, i: torch.sin(0.5 * a * i),
    "blackman": lambda a, i: 0.42 - 0.5 * torch.cos(a * i) + 0.08 * torch.cos(2.0 * a * i),
}


@functools.lru_cache(maxsize=16)
def _window(window_type: str, length: int) -> torch.Tensor:
    """The named window of `length` samples, float64."""
    return WINDOWS[window_type](2.0 * math.pi / (length - 1), torch.arange(length, dtype=torch.float64))


@functools.lru_cache(maxsize=16)
def _mel_banks(num_bins: int, padded_length: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """Kaldi's MelBanks as a [padded_length // 2 + 1, num_bins] matrix, float64.

    Kaldi uses FFT bins 0 .. N/2 - 1 only; the Nyquist row is zero.
    """
    bin_width = sample_rate / padded_length
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * torch.arange(num_bins, dtype=torch.float64)
    center, right = left + delta, left + 2.0 * delta
    freqs = bin_width * torch.arange(padded_length // 2, dtype=torch.float64)
    mel = (1127.0 * torch.log1p(freqs / 700.0))[:, None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.where(mel <= center, up, down)
    weights = torch.where((mel > left) & (mel < right), weights, torch.zeros_like(weights))
    return F.pad(weights, (0, 0, 0, 1))


def _frames(wave: torch.Tensor, length: int, shift: int, snip_edges: bool) -> torch.Tensor:
    """[B, T] -> [B, frames, length] following Kaldi's ExtractWindow."""
    num_samples = wave.shape[-1]
    if snip_edges:
        return wave.unfold(-1, length, shift)
    # Frames centred on multiples of the shift; samples outside reflect back into the wave.
    count = (num_samples + shift // 2) // shift
    starts = torch.arange(count, device=wave.device) * shift + shift // 2 - length // 2
    idx = starts[:, None] + torch.arange(length, device=wave.device)[None, :]
    period = 2 * num_samples
    idx = idx % period  # reflection "-s-1" / "2T-1-s" is periodic with period 2T
    idx = torch.where(idx >= num_samples, period - 1 - idx, idx)
    return wave[:, idx]


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: str = "povey",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    snip_edges: bool = True,
    use_power: bool = True,
    use_log: bool = True,
) -> torch.Tensor:
    """Kaldi `compute-fbank` features of [B, T] or [T] audio -> [B, frames, num_mel_bins] float32.

    Samples are taken at Kaldi's scale (int16 range for BEATs). `high_freq <= 0` is an
    offset from Nyquist, as in Kaldi. No dither: features are deterministic.
    """
    if waveform.ndim == 1:
        waveform = waveform[None]
    # Kaldi: static_cast<int32>(samp_freq * 0.001 * frame_length_ms)
    length = int(sample_rate * 0.001 * frame_length_ms)
    shift = int(sample_rate * 0.001 * frame_shift_ms)
    high = high_freq if high_freq > 0.0 else 0.5 * sample_rate + high_freq

    # float64 where the device has it: float32 FFT noise (~1e-7 of a frame's peak power)
    # swamps quiet mel bands (near Nyquist, below the preemphasis notch) by up to 0.5 in log units.
    work = torch.float32 if waveform.device.type == "mps" else torch.float64
    wave = waveform.to(work)
    frames = _frames(wave, length, shift, snip_edges)  # [B, N, L] (a view when snip_edges)
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if preemphasis != 0.0:
        # Kaldi: x[i] -= c * x[i-1] for i > 0, and x[0] -= c * x[0].
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * previous
    frames = frames * _window(window_type, length).to(device=frames.device, dtype=work)

    padded = 1 << (length - 1).bit_length()  # round_to_power_of_two
    spectrum = torch.fft.rfft(frames, n=padded)
    spectrum = spectrum.real.square() + spectrum.imag.square()
    if not use_power:
        spectrum = spectrum.sqrt()
    banks = _mel_banks(num_mel_bins, padded, float(sample_rate), float(low_freq), float(high))
    mel = torch.matmul(spectrum, banks.to(device=spectrum.device, dtype=work))
    if use_log:
        mel = mel.clamp_min(_FLOAT32_EPS).log()
    return mel.to(torch.float32)


def beats_fbank(wave16: torch.Tensor) -> torch.Tensor:
    """BEATs input features: [B, T] 16 kHz float audio in [-1, 1] -> normalised fbank [B, frames, 128]."""
    features = kaldi_fbank(wave16 * 2.0**15, sample_rate=16000, num_mel_bins=128)
    return (features - BEATS_FBANK_MEAN) / (2.0 * BEATS_FBANK_STD)
