"""Onset and beat detection on synthetic sound with known answers (audiotoken_core.onsets)."""
from __future__ import annotations

import math

import pytest
import torch

from audiotoken_core import onsets
from audiotoken_core.audio import AudioInputError, resample
from audiotoken_core.fbank import kaldi_fbank
from audiotoken_core.onsets import (
    detect_beats,
    detect_onsets,
    envelope_length,
    onset_strength,
    peak_pick,
)

TOLERANCE = 0.010  # seconds: a detected onset must be this close to the click


def click_track(times, duration, sample_rate, bed=None, amplitude=0.5, seed=0):
    """Clicks (10 ms decaying noise bursts) starting at `times` over silence, noise or a 440 Hz tone."""
    gen = torch.Generator().manual_seed(seed)
    n = round(duration * sample_rate)
    wave = torch.zeros(n)
    if bed == "noise":
        wave += 0.02 * torch.randn(n, generator=gen)
    elif bed == "tone":
        wave += 0.2 * torch.sin(2 * math.pi * 440.0 * torch.arange(n) / sample_rate)
    length = round(0.01 * sample_rate)
    burst = amplitude * torch.randn(length, generator=gen) * torch.exp(-torch.arange(length) / (0.002 * sample_rate))
    for t in times:
        i = round(t * sample_rate)
        wave[i:i + length] += burst[:n - i]
    return wave


def assert_found(found, times):
    assert len(found) == len(times), (found, times)
    for f, t in zip(found, times):
        assert abs(f - t) <= TOLERANCE, (f, t)


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("bed", [None, "noise", "tone"])
def test_clicks_found_within_10_ms(sample_rate, bed):
    # Irregular spacing (0.37 s + 1.3 ms more each time) so clicks fall on every phase of the 10 ms grid.
    times = [0.5 + 0.3713 * k for k in range(10)]
    found = detect_onsets(click_track(times, 4.5, sample_rate, bed), sample_rate)
    assert_found(found, times)


@pytest.mark.parametrize("rate_hz", [2.0, 5.0, 8.0])
def test_click_trains_at_several_rates(rate_hz):
    times = [0.25 + k / rate_hz for k in range(int(3.5 * rate_hz))]
    assert_found(detect_onsets(click_track(times, 4.0, 44100, "noise"), 44100, min_gap_seconds=0.05), times)


def test_stereo_clicks_in_either_channel():
    left = click_track([0.4, 1.2], 2.0, 48000)
    right = click_track([0.8, 1.6], 2.0, 48000, seed=1)
    stereo = torch.stack([left, right])
    assert_found(detect_onsets(stereo, 48000), [0.4, 0.8, 1.2, 1.6])
    assert_found(detect_onsets(stereo[None], 48000), [0.4, 0.8, 1.2, 1.6])  # ComfyUI's [1, C, T]


def test_silence_steady_tone_and_steady_noise_have_no_onsets():
    rate = 22050
    t = torch.arange(3 * rate) / rate
    assert detect_onsets(torch.zeros(3 * rate), rate) == []
    assert detect_onsets(0.5 * torch.sin(2 * math.pi * 440.0 * t), rate) == []
    chord = 0.2 * (torch.sin(2 * math.pi * 220.0 * t) + torch.sin(2 * math.pi * 1375.0 * t))
    assert detect_onsets(torch.stack([chord, chord]), rate) == []
    noise = 0.05 * torch.randn(3 * rate, generator=torch.Generator().manual_seed(5))
    assert detect_onsets(noise, rate) == []
    envelope, _ = onset_strength(torch.zeros(3 * rate), rate)
    assert float(envelope.abs().max()) == 0.0


def test_min_gap_keeps_the_stronger_of_two_close_clicks():
    rate = 16000
    wave = click_track([1.0], 2.0, rate, amplitude=0.2) + click_track([1.05], 2.0, rate, amplitude=0.8, seed=1)
    assert_found(detect_onsets(wave, rate, min_gap_seconds=0.1), [1.05])
    assert_found(detect_onsets(wave, rate, min_gap_seconds=0.03), [1.0, 1.05])


def test_span_limits_the_onsets_and_keeps_recording_time():
    times = [0.3, 0.9, 1.5, 2.1, 2.7]
    wave = click_track(times, 3.0, 44100)
    assert_found(detect_onsets(wave, 44100, start_seconds=0.8, length_seconds=1.0), [0.9, 1.5])
    assert_found(detect_onsets(wave, 44100, start_seconds=2.0), [2.1, 2.7])


def test_envelope_rate_length_and_click_position():
    rate = 44100
    envelope, rate_hz = onset_strength(click_track([1.234], 2.5, rate), rate)
    assert rate_hz == 100.0
    assert envelope.dtype == torch.float32 and envelope.shape == (250,)
    assert abs(int(envelope.argmax()) / rate_hz - 1.234) <= TOLERANCE
    # One sample per 10 ms begun, whatever the rate, also for a one-hour file (counted, not built).
    assert envelope_length(3600 * 44100, 44100) == 360000
    assert envelope_length(3600 * 48000 + 1, 48000) == 360001
    assert envelope_length(1, 8000) == 1
    assert envelope_length(441, 44100) == 1 and envelope_length(442, 44100) == 2
    assert onset_strength(torch.zeros(1), 8000)[0].shape == (1,)


def _one_shot_envelope(wave, sample_rate):
    """The envelope without chunks: resample the whole file, frame it, flux of every frame."""
    wave16 = resample(wave.mean(0), sample_rate, 16000).double()
    count = envelope_length(wave.shape[-1], sample_rate)
    lead = onsets.FRAME_LEAD_SAMPLES
    need = (count - 1) * 160 + 400
    padded = torch.nn.functional.pad(wave16, (lead, max(0, need - lead - wave16.numel())))[:need]
    high = onsets.band_top_hz(sample_rate)
    power = kaldi_fbank(padded[None], num_mel_bins=onsets.NUM_BANDS, high_freq=high, use_log=False)[0].double()
    ref = onsets._reference_power(high)
    levels = 10 * torch.log10(power.clamp_min(ref * 10 ** (onsets.FLOOR_DB / 10)) / ref)
    rise = levels[1:] - torch.nn.functional.max_pool1d(levels[:-1][None], 3, 1, 1)[0]
    flux = torch.cat([torch.zeros(1, dtype=torch.float64), rise.clamp_min(0).mean(1)])
    flux[:3] = 0.0  # frames compared with one that starts before the recording
    return flux


def test_chunked_envelope_equals_one_shot_and_reads_one_chunk_at_a_time(monkeypatch):
    rate = 24000  # resampled (3:2), with a short filter so the one-shot reference stays quick
    gen = torch.Generator().manual_seed(2)
    seconds = 180.0
    wave = 0.1 * torch.randn(2, int(seconds * rate), generator=gen)
    wave[:, ::9000] += 0.9  # some sharp events
    reads = []
    real = onsets.prepare_waveform

    def recording(*args, **kwargs):
        reads.append(kwargs["window_seconds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(onsets, "prepare_waveform", recording)
    monkeypatch.setattr(onsets, "CHUNK_SECONDS", 7.3)  # boundaries off the second grid
    envelope, _ = onset_strength(wave, rate)
    expected = _one_shot_envelope(wave, rate)
    assert envelope.shape == expected.shape == (18000,)
    torch.testing.assert_close(envelope.double(), expected, atol=2e-3, rtol=0)
    assert len(reads) == math.ceil(18000 / 730)
    assert max(reads) <= 7.3 + 0.03  # each read is one chunk plus 1.5 frames of overlap


def test_beats_of_a_120_bpm_click_track():
    rate = 44100
    clicks = [0.3 + 0.5 * k for k in range(20)]
    tempo, beats = detect_beats(click_track(clicks, 10.3, rate, "noise"), rate)
    assert abs(tempo - 120.0) <= 0.02 * 120.0
    assert_found(beats, clicks)


def test_beats_of_a_150_bpm_track_over_a_tone_and_of_silence():
    rate = 22050
    clicks = [0.2 + 0.4 * k for k in range(20)]
    tempo, beats = detect_beats(click_track(clicks, 8.2, rate, "tone"), rate)
    assert abs(tempo - 150.0) <= 0.02 * 150.0
    assert_found(beats, clicks)
    assert detect_beats(torch.zeros(rate * 4), rate) == (0.0, [])


def test_peak_pick_on_a_known_envelope():
    env = torch.zeros(100)
    env[[10, 40, 45, 80]] = torch.tensor([10.0, 6.0, 8.0, 0.5])
    assert peak_pick(env, 100.0, min_gap_seconds=0.1) == [10, 45]  # 40 loses to 45; 80 is too weak
    assert peak_pick(env, 100.0, min_gap_seconds=0.02) == [10, 40, 45]
    assert peak_pick(env * 0.1, 100.0) == []  # below MIN_FLUX_DB everywhere


@pytest.mark.parametrize("call, match", [
    (lambda: detect_onsets(torch.zeros(2, 1, 8000), 8000), "one recording"),
    (lambda: detect_onsets(torch.zeros(8000), 4000), "sample_rate"),
    (lambda: detect_onsets(torch.zeros(8000), 8000, start_seconds=1.5), "outside the 1.000 s recording"),
    (lambda: detect_onsets(torch.zeros(8000), 8000, length_seconds=-1), "negative"),
    (lambda: detect_onsets(torch.zeros(8000), 8000, threshold=float("nan")), "threshold"),
    (lambda: detect_onsets(torch.full((8000,), float("nan")), 8000), "NaN"),
    (lambda: detect_beats(torch.zeros(8000), 8000, tightness=0), "tightness"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(AudioInputError, match=match):
        call()
