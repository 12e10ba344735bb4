"""Onsets and beats of a recording, in torch on our own log-mel spectrogram.

    envelope, rate = onset_strength(waveform, sample_rate)        # spectral flux, sample n at n / rate s
    onsets = detect_onsets(waveform, sample_rate)                 # [seconds, ...] ascending
    tempo, beats = detect_beats(waveform, sample_rate)            # BPM, [seconds, ...]

Onset strength is spectral flux: the Kaldi log-mel filterbank (`fbank.kaldi_fbank`, 16 kHz, 25 ms
frames every 10 ms; bands up to the recording's own bandwidth) in dB above a fixed floor, the rise of
each band over the loudest of its neighbours a frame earlier (falls count 0), averaged over the bands. The recording is read in chunks of CHUNK_SECONDS through
`audio.prepare_waveform`, so a one-hour file costs one chunk of memory plus its envelope (100
floats a second). Envelope sample n is placed at n / rate seconds: the analysis frames are shifted
by FRAME_LEAD_SAMPLES so that a click (a short burst, over silence or over steady sound) lands on the
sample nearest to it (within 10 ms). The recording's first 20 ms (before two whole frames) hold no
onset: its start is not one.
Onsets are peaks of the envelope: the largest value within +-min_gap_seconds that rises above the
local mean by `threshold` times the span's largest value, and above MIN_FLUX_DB (so silence and
steady sound give none). Beats: tempo from the envelope's autocorrelation (60..200 BPM, weighted
towards 120), then a dynamic-programming beat tracker (Ellis 2007) that places beats on strong
envelope values about one period apart.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from .audio import (
    TARGET_SAMPLE_RATE,
    AudioInputError,
    _as_batch,
    _check_sample_rate,
    _check_seconds,
    prepare_waveform,
)
from .fbank import kaldi_fbank

__all__ = ["ENVELOPE_RATE_HZ", "check_onset_options", "detect_beats", "detect_onsets", "envelope_length",
           "estimate_tempo", "onset_strength", "peak_pick", "span_envelope", "span_onsets", "track_beats"]

HOP_SAMPLES = 160  # 10 ms at 16 kHz: one envelope sample per filterbank frame
FRAME_SAMPLES = 400  # 25 ms analysis frames (Kaldi's default, as BEATs hears)
ENVELOPE_RATE_HZ = TARGET_SAMPLE_RATE / HOP_SAMPLES
# Frame n covers 16 kHz samples [n * HOP - LEAD, n * HOP - LEAD + FRAME). A click over silence raises
# the first frame it enters (it enters at the frame's end); over loud sound, the frame it sits in the
# middle of. This lead puts both cases within 8.5 ms of n / ENVELOPE_RATE_HZ.
FRAME_LEAD_SAMPLES = 264
NUM_BANDS = 64
BAND_TOP = 0.95  # bands reach this fraction of the source's Nyquist (at most 8 kHz): empty bands would dilute the mean
FLOOR_DB = -90.0  # band levels below this (re a full-scale sine) count as silence
MIN_FLUX_DB = 3.0  # mean rise over the bands (dB) that an onset needs at least: steady sound stays below
CHUNK_SECONDS = 30.0  # envelope computed this much audio at a time (memory is flat in the file's length)
MEAN_SECONDS = 0.1  # the adaptive threshold's local mean is taken over +- this


def band_top_hz(sample_rate: int) -> float:
    """Highest band edge: the part of the spectrum the recording has (an 8 kHz file stops at 4 kHz)."""
    return BAND_TOP * min(int(sample_rate), TARGET_SAMPLE_RATE) / 2.0


@functools.lru_cache(maxsize=8)
def _reference_power(high_hz: float) -> float:
    """Peak band power of a unit sine at 1 kHz: the 0 dB of the envelope's levels."""
    t = torch.arange(FRAME_SAMPLES * 4, dtype=torch.float64) / TARGET_SAMPLE_RATE
    mel = kaldi_fbank(torch.sin(2 * math.pi * 1000.0 * t), sample_rate=TARGET_SAMPLE_RATE,
                      num_mel_bins=NUM_BANDS, high_freq=high_hz, use_log=False)
    return float(mel.max())


def _check_mono_source(waveform, sample_rate) -> torch.Tensor:
    """[T], [C, T] or [1, C, T] audio -> [1, C, T] (one recording), rate checked."""
    x = _as_batch(waveform)
    if x.shape[0] != 1:
        raise AudioInputError(
            f"onset detection takes one recording, got a batch of {x.shape[0]}; pass one clip "
            "(e.g. waveform[i]) at a time")
    _check_sample_rate(sample_rate)
    return x


def _levels_db(wave16: torch.Tensor, high_hz: float) -> torch.Tensor:
    """[S] 16 kHz -> [frames, NUM_BANDS] band levels in dB re a full-scale sine, floored at FLOOR_DB."""
    power = kaldi_fbank(wave16[None].double(), sample_rate=TARGET_SAMPLE_RATE, num_mel_bins=NUM_BANDS,
                        high_freq=high_hz, use_log=False)[0].double()
    reference = _reference_power(high_hz)
    return 10.0 * torch.log10(power.clamp_min(reference * 10.0 ** (FLOOR_DB / 10.0)) / reference)


def _envelope_part(x: torch.Tensor, sample_rate: int, first: int, stop: int) -> torch.Tensor:
    """Envelope samples [first, stop) (float64): the flux of frame n over frame n - 1."""
    lead_frame = first - 1  # the frame each chunk compares its first frame with
    start16 = lead_frame * HOP_SAMPLES - FRAME_LEAD_SAMPLES
    count16 = (stop - lead_frame - 1) * HOP_SAMPLES + FRAME_SAMPLES
    pad = max(0, -start16)  # before the recording: silence (those frames are not compared, see below)
    wave16 = prepare_waveform(x, sample_rate, channel_policy="mix", start_seconds=(start16 + pad) / TARGET_SAMPLE_RATE,
                              window_seconds=(count16 - pad) / TARGET_SAMPLE_RATE, loop=False)[0]
    wave16 = torch.nn.functional.pad(wave16, (pad, 0))
    levels = _levels_db(wave16, band_top_hz(sample_rate))  # frames lead_frame .. stop - 1
    # Each band's rise over the loudest of its neighbours a frame earlier (SuperFlux's maximum filter):
    # the random ups and downs of noisy bands mostly stay below their neighbours.
    previous = torch.nn.functional.max_pool1d(levels[:-1][None], 3, stride=1, padding=1)[0]
    flux = (levels[1:] - previous).clamp_min(0.0).mean(dim=1)
    # A frame whose predecessor starts before the recording compares sound with nothing: the
    # recording's start is not an onset.
    first_whole = -(-(FRAME_LEAD_SAMPLES) // HOP_SAMPLES) + 1
    index = torch.arange(first, stop)
    return torch.where(index < first_whole, torch.zeros_like(flux), flux)


def envelope_length(num_samples: int, sample_rate: int) -> int:
    """Envelope samples of a recording of `num_samples` at `sample_rate`: one per 10 ms begun, at least 1."""
    samples16 = -(-num_samples * TARGET_SAMPLE_RATE // int(sample_rate))  # audio.resample's ceil
    return max(1, -(-samples16 // HOP_SAMPLES))


def span_envelope(waveform, sample_rate: int, start_seconds: float = 0.0,
                  end_seconds: float | None = None) -> tuple[torch.Tensor, float, int]:
    """The envelope samples n with n / rate in [start_seconds, end_seconds] (None = to the end)
    -> (envelope float32, rate_hz, first n). Only that part of the recording is read."""
    x = _check_mono_source(waveform, sample_rate)
    count = envelope_length(x.shape[-1], sample_rate)
    first = min(max(0, math.ceil(start_seconds * ENVELOPE_RATE_HZ - 1e-9)), count - 1)
    stop = count if end_seconds is None else max(first + 1, min(count, math.floor(end_seconds * ENVELOPE_RATE_HZ) + 1))
    per_chunk = int(CHUNK_SECONDS * ENVELOPE_RATE_HZ)
    parts = [_envelope_part(x, int(sample_rate), a, min(a + per_chunk, stop)) for a in range(first, stop, per_chunk)]
    return torch.cat(parts).float(), ENVELOPE_RATE_HZ, first


def onset_strength(waveform, sample_rate: int) -> tuple[torch.Tensor, float]:
    """Spectral-flux onset strength of a recording -> (envelope [N] float32 in dB, rate_hz).

    `waveform` is [samples], [channels, samples] or [1, channels, samples] (channels are mixed);
    envelope sample n is at n / rate_hz seconds, N = ceil(duration * rate_hz). Values: the mean
    rise of the log-mel bands (dB) since the previous sample; 0 for silence and for steady sound.
    """
    envelope, rate, _ = span_envelope(waveform, sample_rate)
    return envelope, rate


def _span(x: torch.Tensor, sample_rate: int, start_seconds, length_seconds) -> tuple[float, float]:
    """[start, end) seconds of the analysed span, checked."""
    duration = x.shape[-1] / int(sample_rate)
    start = _check_seconds(start_seconds, "start_seconds")
    length = _check_seconds(length_seconds, "length_seconds")
    if not 0.0 <= start < duration:
        raise AudioInputError(
            f"start_seconds={start:g} is outside the {duration:.3f} s recording; use a start from 0 to "
            f"below {duration:.3f}")
    if length < 0:
        raise AudioInputError(f"length_seconds={length:g} is negative; use 0 (to the end) or a positive length")
    end = duration if length == 0 else min(duration, start + length)
    return start, end


def peak_pick(envelope: torch.Tensor, rate_hz: float, *, min_gap_seconds: float = 0.1,
              threshold: float = 0.1) -> list[int]:
    """Indices of the envelope's onset peaks (see the module docstring), ascending."""
    env = envelope.double()
    if env.numel() == 0:
        return []
    top = float(env.max())
    if top < MIN_FLUX_DB:
        return []
    gap = max(1, round(min_gap_seconds * rate_hz))
    n = env.numel()
    padded = torch.nn.functional.pad(env[None, None], (gap, gap), value=-math.inf)[0, 0]
    windows = padded.unfold(0, 2 * gap + 1, 1)  # [n, 2 gap + 1], centre at column gap
    left_max = windows[:, :gap].max(dim=1).values
    right_max = windows[:, gap + 1:].max(dim=1).values
    is_peak = (env > left_max) & (env >= right_max)  # a plateau counts once, at its first sample
    half = max(1, round(MEAN_SECONDS * rate_hz))
    kernel = torch.ones(1, 1, 2 * half + 1, dtype=env.dtype)
    sums = torch.nn.functional.conv1d(torch.nn.functional.pad(env[None, None], (half, half)), kernel)[0, 0]
    counts = torch.nn.functional.conv1d(torch.nn.functional.pad(torch.ones(1, 1, n, dtype=env.dtype), (half, half)),
                                        kernel)[0, 0]
    local_mean = sums / counts
    strong = (env >= local_mean + threshold * top) & (env >= MIN_FLUX_DB)
    return torch.nonzero(is_peak & strong).flatten().tolist()


def span_onsets(waveform, sample_rate: int, start_seconds: float, end_seconds: float, *,
                min_gap_seconds: float = 0.1, threshold: float = 0.1) -> tuple[list[float], torch.Tensor, float, int]:
    """Onsets in [start_seconds, end_seconds) and the envelope they were picked from (with a margin of
    max(min_gap, MEAN_SECONDS) on each side, so a span's edges see the same peaks as the whole file)
    -> (onset seconds, envelope, rate_hz, index of its first sample). Arguments are not checked here."""
    margin = max(min_gap_seconds, MEAN_SECONDS)
    envelope, rate, first = span_envelope(waveform, sample_rate, max(0.0, start_seconds - margin),
                                          end_seconds + margin)
    peaks = peak_pick(envelope, rate, min_gap_seconds=min_gap_seconds, threshold=threshold)
    times = [(first + p) / rate for p in peaks]
    return [t for t in times if start_seconds <= t < end_seconds], envelope, rate, first


def check_onset_options(min_gap_seconds, threshold) -> None:
    """Refuse onset options that are not finite numbers >= 0."""
    for name, value in (("min_gap_seconds", min_gap_seconds), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise AudioInputError(f"{name} must be a finite number >= 0, got {value!r}; e.g. {name}=0.1")


def detect_onsets(waveform, sample_rate: int, *, start_seconds: float = 0.0, length_seconds: float = 0.0,
                  min_gap_seconds: float = 0.1, threshold: float = 0.1) -> list[float]:
    """Onset times (seconds of the recording, ascending) inside [start, start + length) (length 0 = to the end).

    `min_gap_seconds`: onsets closer than this keep the stronger; `threshold`: how far above its
    local mean a peak must rise, as a fraction of the strongest envelope value around the span
    (0..1; lower finds more).
    """
    x = _check_mono_source(waveform, sample_rate)
    start, end = _span(x, sample_rate, start_seconds, length_seconds)
    check_onset_options(min_gap_seconds, threshold)
    return span_onsets(x, sample_rate, start, end, min_gap_seconds=min_gap_seconds, threshold=threshold)[0]


MIN_BPM, MAX_BPM = 60.0, 200.0
PREFERRED_BPM = 120.0  # the tempo prior's centre: autocorrelation peaks at multiples of the period are
TEMPO_OCTAVES = 1.0  # ... told apart by a log-normal weight of this width (octaves) around it


def estimate_tempo(envelope: torch.Tensor, rate_hz: float) -> float:
    """Tempo (BPM) of an onset envelope: the strongest autocorrelation lag in MIN_BPM..MAX_BPM, weighted
    towards PREFERRED_BPM, refined between lags by a parabola through its neighbours. 0 when flat."""
    env = envelope.double() - envelope.double().mean()
    n = env.numel()
    lo, hi = math.floor(60.0 * rate_hz / MAX_BPM), math.ceil(60.0 * rate_hz / MIN_BPM)
    if n <= hi + 1 or float(env.abs().max()) == 0.0:
        return 0.0
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(env, n=size)
    autocorr = torch.fft.irfft(spectrum.real.square() + spectrum.imag.square(), n=size)[:hi + 2]
    lags = torch.arange(lo, hi + 1, dtype=torch.float64)
    prior = torch.exp(-0.5 * (torch.log2(60.0 * rate_hz / lags / PREFERRED_BPM) / TEMPO_OCTAVES) ** 2)
    best = lo + int(torch.argmax(autocorr[lo:hi + 1] * prior))
    left, mid, right = (float(v) for v in autocorr[best - 1:best + 2])
    curvature = left - 2.0 * mid + right
    shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    return 60.0 * rate_hz / (best + max(-0.5, min(0.5, shift)))


def track_beats(envelope: torch.Tensor, rate_hz: float, tempo_bpm: float, tightness: float = 100.0) -> list[int]:
    """Beat indices into `envelope` (Ellis 2007): the path that maximises onset strength at the beats
    minus `tightness` * log(interval / period)^2 for each interval, found by dynamic programming."""
    period = 60.0 * rate_hz / tempo_bpm
    env = envelope.double()
    spread = env.std() if env.numel() > 1 else env.new_tensor(0.0)
    if float(spread) == 0.0:
        return []
    # Onset strength smoothed over a short Gaussian (period / 32), as in the paper.
    sigma = max(period / 32.0, 0.5)
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    local = torch.nn.functional.conv1d(torch.nn.functional.pad((env / spread)[None, None], (radius, radius)),
                                       taps[None, None])[0, 0].numpy()
    near, far = max(1, round(period / 2)), max(2, round(2 * period))
    steps = np.arange(near, far + 1)
    penalty = -tightness * np.log(steps / period) ** 2
    score = local.copy()
    back = np.full(local.size, -1)
    for t in range(near, local.size):
        earliest = max(0, t - far)
        previous = score[earliest:t - near + 1][::-1] + penalty[:t - near + 1 - earliest]  # step near, near+1, ...
        best = int(np.argmax(previous))
        if previous[best] > 0:
            score[t] = local[t] + previous[best]
            back[t] = t - (near + best)
    # The last beat: the best-scoring local maximum of the cumulative score in the final period.
    tail = max(0, local.size - far)
    last = tail + int(np.argmax(score[tail:]))
    beats = [last]
    while back[beats[-1]] >= 0:
        beats.append(int(back[beats[-1]]))
    beats.reverse()
    # Leading/trailing beats over silence carry no evidence: drop them.
    strong = 0.5 * float(np.sqrt(np.mean(local[beats] ** 2)))
    keep = [i for i, b in enumerate(beats) if local[b] >= strong]
    return beats[keep[0]:keep[-1] + 1] if keep else []


def detect_beats(waveform, sample_rate: int, *, start_seconds: float = 0.0, length_seconds: float = 0.0,
                 tightness: float = 100.0) -> tuple[float, list[float]]:
    """(tempo in BPM, beat times in recording seconds) of [start, start + length) (length 0 = to the end).

    `tightness` (> 0): how strongly beats keep to the tempo (higher = more even spacing). A span
    without onsets (silence, steady sound) or shorter than two slowest beats gives (0.0, []).
    """
    x = _check_mono_source(waveform, sample_rate)
    start, end = _span(x, sample_rate, start_seconds, length_seconds)
    if isinstance(tightness, bool) or not isinstance(tightness, numbers.Real) or not tightness > 0:
        raise AudioInputError(f"tightness must be a number > 0, got {tightness!r}; e.g. tightness=100")
    envelope, rate, first = span_envelope(x, sample_rate, start, end)
    env = envelope[:max(1, math.ceil(end * rate - 1e-9) - first)]  # samples in [start, end)
    if float(env.max()) < MIN_FLUX_DB:
        return 0.0, []
    tempo = estimate_tempo(env, rate)
    if tempo == 0.0:
        return 0.0, []
    return tempo, [(first + b) / rate for b in track_beats(env, rate, tempo, float(tightness))]
