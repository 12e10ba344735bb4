"""fbank.py against transformers.audio_utils (an independent numpy Kaldi-style front end),
on real CC0 recordings, synthesized speech and tones, plus a per-frame numpy re-statement
of Kaldi's edge handling."""
from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from audiotoken_core.audio import AudioInputError, resample
from audiotoken_core.audio_io import load_audio_file
from audiotoken_core.fbank import BEATS_FBANK_MEAN, BEATS_FBANK_STD, WINDOWS, _window, beats_fbank, kaldi_fbank
from audiotoken_core.spectrogram import render_spectrogram

KALDI_LOG_FLOOR = 1.192092955078125e-07  # float32 epsilon
TOLERANCE = 1e-3  # max abs difference on the log-mel


def reference_fbank(
    wave: np.ndarray,
    *,
    window: str = "povey",
    power: float = 2.0,
    log_mel: str | None = "log",
    low_freq: float = 20.0,
    high_freq: float = 8000.0,
    num_mel_bins: int = 128,
) -> np.ndarray:
    """transformers' numpy spectrogram with Kaldi options -> [frames, mel]."""
    mel = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=num_mel_bins,
        min_frequency=low_freq,
        max_frequency=high_freq,
        sampling_rate=16000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    spec = spectrogram(
        np.asarray(wave, dtype=np.float64),
        window_function(400, window, periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=power,
        center=False,
        preemphasis=0.97,
        mel_filters=mel,
        mel_floor=KALDI_LOG_FLOOR,
        log_mel=log_mel,
        remove_dc_offset=True,
        dtype=np.float64,
    )
    return spec.T


def assert_matches_reference(wave16: torch.Tensor, label: str) -> float:
    ours = kaldi_fbank(wave16)[0].numpy()
    ref = reference_fbank(wave16.double().numpy())
    assert ours.shape == ref.shape, (label, ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    assert diff < TOLERANCE, f"{label}: max |ours - transformers| = {diff:.2e}"
    return diff


def wave16_from_file(path) -> torch.Tensor:
    """Decoded, channel 0, resampled to 16 kHz with our resampler, at Kaldi's int16 scale."""
    wave, sr = load_audio_file(path)
    return resample(wave[0], sr, 16000) * 2**15


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; install it with `apt-get install -y sox espeak-ng` (CI does)")
    return path


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_matches_transformers_on_all_cc0_recordings(cc0_recordings):
    assert len(cc0_recordings) >= 10
    worst = max(assert_matches_reference(wave16_from_file(p), p.name) for p in cc0_recordings)
    assert worst < TOLERANCE


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_matches_transformers_on_espeak_speech(tmp_path):
    espeak = require_program("espeak-ng")
    path = tmp_path / "speech.wav"
    subprocess.run([espeak, "-w", str(path), "A sound becomes a word that the picture model understands."], check=True)
    wave16 = wave16_from_file(path)
    assert wave16.shape[-1] > 16000
    assert_matches_reference(wave16, "espeak-ng speech")


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("synth", [["sine", "440"], ["sine", "7900"], ["square", "1000"], ["pinknoise"]])
def test_matches_transformers_on_sox_signals(tmp_path, synth):
    sox = require_program("sox")
    path = tmp_path / "tone.wav"
    subprocess.run([sox, "-n", "-r", "16000", str(path), "synth", "2", *synth], check=True)
    wave, sr = load_audio_file(path)
    assert sr == 16000 and wave.shape[-1] == 32000
    assert_matches_reference(wave[0] * 2**15, f"sox {' '.join(synth)}")


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("window,ref_window", [("hanning", "hann"), ("hamming", "hamming")])
def test_other_windows_power_and_log_options(window, ref_window):
    rng = np.random.default_rng(5)
    wave = torch.from_numpy(rng.standard_normal(16000) * 1000)
    ours = kaldi_fbank(wave, window_type=window)[0].numpy()
    assert np.abs(ours - reference_fbank(wave.numpy(), window=ref_window)).max() < TOLERANCE
    magnitude = kaldi_fbank(wave, use_power=False, use_log=False)[0].numpy()
    ref = reference_fbank(wave.numpy(), power=1.0, log_mel=None)
    assert np.abs(magnitude - ref).max() / ref.max() < 1e-6
    # high_freq <= 0 counts back from Nyquist, as in Kaldi.
    ours = kaldi_fbank(wave, high_freq=-400.0, num_mel_bins=64)[0].numpy()
    assert np.abs(ours - reference_fbank(wave.numpy(), high_freq=7600.0, num_mel_bins=64)).max() < TOLERANCE


def kaldi_frames_loop(wave: np.ndarray, snip_edges: bool) -> np.ndarray:
    """Kaldi's ExtractWindow written out per frame (reflection at the edges)."""
    n, length, shift = wave.size, 400, 160
    if snip_edges:
        count = 1 + (n - length) // shift
        starts = [i * shift for i in range(count)]
    else:
        count = (n + shift // 2) // shift
        starts = [i * shift + shift // 2 - length // 2 for i in range(count)]
    frames = []
    for start in starts:
        frame = []
        for s in range(start, start + length):
            while s < 0 or s >= n:
                s = -s - 1 if s < 0 else 2 * n - 1 - s
            frame.append(wave[s])
        frames.append(frame)
    return np.array(frames)


def fbank_from_frames(frames: np.ndarray) -> np.ndarray:
    """Kaldi's per-frame processing on already extracted frames (numpy, float64)."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * 0.03, frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames = frames * window_function(400, "povey", periodic=False)
    power = np.abs(np.fft.rfft(frames, n=512, axis=1)) ** 2
    mel = mel_filter_bank(257, 128, 20.0, 8000.0, 16000, None, "kaldi", True)
    return np.log(np.maximum(power @ mel, KALDI_LOG_FLOOR))


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("snip_edges", [True, False])
def test_snip_edges_against_a_per_frame_loop(snip_edges):
    rng = np.random.default_rng(6)
    wave = rng.standard_normal(3 * 16000 + 123) * 3000
    ours = kaldi_fbank(torch.from_numpy(wave), snip_edges=snip_edges)[0].numpy()
    expected = fbank_from_frames(kaldi_frames_loop(wave, snip_edges))
    assert ours.shape == expected.shape == ((299 if snip_edges else 301), 128)
    assert np.abs(ours - expected).max() < TOLERANCE
    short = rng.standard_normal(250)  # shorter than one frame: only possible without snipping
    if not snip_edges:
        ours = kaldi_fbank(torch.from_numpy(short), snip_edges=False)[0].numpy()
        assert np.abs(ours - fbank_from_frames(kaldi_frames_loop(short, False))).max() < TOLERANCE


@pytest.mark.parametrize("seconds,frames", [(5, 498), (10, 998), (0.025, 1), (1.0, 98)])
def test_frame_counts(seconds, frames):
    assert kaldi_fbank(torch.zeros(round(seconds * 16000))).shape == (1, frames, 128)
    assert beats_fbank(torch.zeros(2, round(seconds * 16000))).shape == (2, frames, 128)


def test_batched_dtypes_and_silence():
    torch.manual_seed(7)
    wave = torch.randn(3, 16000) * 0.1
    batched = kaldi_fbank(wave * 2**15)
    assert batched.dtype == torch.float32 and batched.shape == (3, 98, 128)
    for i in range(3):
        assert torch.allclose(batched[i], kaldi_fbank(wave[i] * 2**15)[0], atol=1e-5)
    for dtype in (torch.float16, torch.float64):
        assert torch.allclose(kaldi_fbank(wave.to(dtype) * 2**15), batched, atol=0.05 if dtype == torch.float16 else 1e-5)
    silent = kaldi_fbank(torch.zeros(1, 16000))
    assert torch.allclose(silent, torch.full_like(silent, math.log(KALDI_LOG_FLOOR)))


def test_beats_normalisation():
    assert (BEATS_FBANK_MEAN, BEATS_FBANK_STD) == (15.41663, 6.55582)
    torch.manual_seed(8)
    wave = torch.rand(2, 80000) * 2 - 1
    expected = (kaldi_fbank(wave * 32768.0) - 15.41663) / (2 * 6.55582)
    assert torch.allclose(beats_fbank(wave), expected, atol=1e-6)
    silent = beats_fbank(torch.zeros(1, 80000))
    floor = (math.log(KALDI_LOG_FLOOR) - 15.41663) / 13.11164  # -2.391693...
    assert silent.shape == (1, 498, 128) and torch.allclose(silent, torch.full_like(silent, floor))
    assert floor == pytest.approx(-2.391693, abs=1e-6)


def test_window_functions_are_kaldis():
    # Kaldi's windows are symmetric (denominator N - 1), like numpy's.
    n = 400
    expected = {"hanning": np.hanning(n), "hamming": np.hamming(n), "blackman": np.blackman(n),
                "povey": np.hanning(n) ** 0.85, "rectangular": np.ones(n), "sine": np.sin(np.pi * np.arange(n) / (n - 1))}
    assert set(expected) == set(WINDOWS)
    for name, window in expected.items():
        assert np.abs(_window(name, n).numpy() - window).max() < 1e-12, name
    with pytest.raises(KeyError, match="kaiser"):
        kaldi_fbank(torch.zeros(16000), window_type="kaiser")


def test_spectrogram_refuses_non_finite_audio():
    # The encoders get audio checked by prepare_waveform; the spectrogram of a decoded file checks its own.
    wave = torch.zeros(2, 16000)
    wave[1, 5] = float("nan")
    with pytest.raises(AudioInputError, match="NaN or infinite"):
        render_spectrogram(wave, 16000)
