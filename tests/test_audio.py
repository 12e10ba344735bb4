"""audio.py (resampling, prepare_waveform) and audio_io.py (PyAV decoding), against numbers
computed independently (analytic sines, scipy.signal.resample_poly, scipy.io.wavfile)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from scipy.signal import resample_poly

from audiotoken_core.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    REFERENCE_CLIP_SECONDS,
    TARGET_SAMPLE_RATE,
    AudioInputError,
    mix_channels,
    prepare_waveform,
    resample,
    window_count,
)
from audiotoken_core.audio_io import load_audio_file

REPO_ROOT = Path(__file__).resolve().parent.parent

SOURCE_RATES = [44100, 48000, 22050, 192000, 8000]


def sine(freq: float, sr: int, seconds: float, start: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    t = start + torch.arange(round(sr * seconds), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t).to(dtype)


def band_limited_noise(sr: int, seconds: float, max_hz: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(sr * seconds))
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(x.size, 1 / sr) > max_hz] = 0
    return np.fft.irfft(spec, x.size)


# ----------------------------------------------------------------------------- resample


@pytest.mark.parametrize("sr", SOURCE_RATES)
def test_resample_1khz_sine_matches_analytic(sr):
    for dtype, tol in [(torch.float64, 1e-3), (torch.float32, 1e-3)]:
        out = resample(sine(1000, sr, 2.0, dtype=dtype), sr, 16000)
        assert out.dtype == dtype
        assert out.shape[-1] == math.ceil(round(sr * 2.0) * 16000 / sr)
        expected = sine(1000, 16000, out.shape[-1] / 16000)
        err = (out.double() - expected)[64:-64].abs().max().item()
        assert err < tol, (sr, dtype, err)


@pytest.mark.parametrize("sr", SOURCE_RATES + [11025, 32000])
def test_resample_agrees_with_scipy_resample_poly(sr):
    # Content in the lower half of the common band, where both filters are flat.
    x = band_limited_noise(sr, 2.0, 0.25 * min(sr, 16000))
    g = math.gcd(sr, 16000)
    expected = resample_poly(x, 16000 // g, sr // g)
    ours = resample(torch.from_numpy(x), sr, 16000).numpy()
    assert ours.shape == expected.shape
    rel = np.abs(ours - expected)[100:-100].max() / np.abs(expected).max()
    assert rel < 5e-3, (sr, rel)


def test_resample_removes_energy_above_8khz():
    rng = np.random.default_rng(1)
    white = torch.from_numpy(rng.standard_normal(48000 * 4))
    out = resample(white, 48000, 16000)
    # Plain decimation would keep all the variance (1.0); a low-pass at ~7.9 kHz keeps 1/3.
    var = out[100:-100].var().item()
    assert 0.28 < var < 0.36, var
    # Noise that lives only above 10 kHz must (almost) vanish instead of aliasing down.
    spec = np.fft.rfft(white.numpy())
    spec[np.fft.rfftfreq(white.numel(), 1 / 48000) < 10000] = 0
    high = torch.from_numpy(np.fft.irfft(spec, white.numel()))
    leak = resample(high, 48000, 16000)[100:-100].pow(2).mean().sqrt() / high.pow(2).mean().sqrt()
    assert leak < 0.01, leak.item()


@pytest.mark.parametrize(
    "length,sr", [(1, 44100), (2, 48000), (441, 44100), (44101, 44100), (48000 * 3 + 1, 48000), (7, 8000), (100, 192000)]
)
def test_resample_output_length(length, sr):
    out = resample(torch.randn(2, 3, length), sr, 16000)
    assert out.shape == (2, 3, math.ceil(length * 16000 / sr))


def test_resample_identity():
    x = torch.randn(2, 100)
    assert torch.equal(resample(x, 16000, 16000), x)


# ----------------------------------------------------------------------- prepare_waveform


def test_prepare_shapes_and_dtype():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 44100 * 11) * 2 - 1
    out = prepare_waveform(x, 44100)
    assert out.shape == (2, 160000) and out.dtype == torch.float32
    assert prepare_waveform(x[0], 44100, window_seconds=5).shape == (1, 80000)
    assert prepare_waveform(x[0, 0], 44100, window_seconds=0.5).shape == (1, 8000)
    assert REFERENCE_CLIP_SECONDS == 10.0 and TARGET_SAMPLE_RATE == 16000
    assert prepare_waveform(x.half(), 44100).dtype == torch.float32
    assert torch.allclose(prepare_waveform(x.double(), 44100), out, atol=1e-6)


@pytest.mark.parametrize("sr", [16000, 44100, 48000, 22050, 8000, 192000])
def test_prepare_equals_resample_then_cut(sr):
    """Cropping in the source rate (with a margin) must not change a single sample."""
    torch.manual_seed(sr)
    x = torch.rand(2, 2, int(sr * 13.0)) * 2 - 1
    whole = resample(x.mean(1), sr, 16000)
    for start in (0.0, 1.0, 2.3705):
        out = prepare_waveform(x, sr, start_seconds=start)
        first = round(start * 16000)
        assert torch.allclose(out, whole[:, first:first + 160000], atol=1e-6), (sr, start)


def test_prepare_eight_channels_mix_and_first():
    torch.manual_seed(1)
    x = torch.rand(1, 8, 48000 * 3) * 2 - 1
    mixed = prepare_waveform(x, 48000, window_seconds=2)
    assert torch.allclose(mixed, prepare_waveform(x.mean(1, keepdim=True), 48000, window_seconds=2), atol=1e-6)
    first = prepare_waveform(x, 48000, window_seconds=2, channel_policy="first")
    assert torch.equal(first, prepare_waveform(x[:, :1], 48000, window_seconds=2))
    assert not torch.allclose(first, mixed)
    assert torch.equal(mix_channels(x, "first"), x[:, 0])
    assert torch.allclose(mix_channels(x, "mix"), x.mean(1))
    with pytest.raises(AudioInputError, match="mix, first"):
        prepare_waveform(x, 48000, channel_policy="left")


def test_prepare_192khz_sine_is_the_analytic_sine():
    x = sine(1000, 192000, 12.0, dtype=torch.float32) * 0.5
    out = prepare_waveform(x, 192000, start_seconds=1.0)
    expected = 0.5 * sine(1000, 16000, 10.0, start=1.0)
    assert (out[0].double() - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("sr", [16000, 48000, 44100])
def test_prepare_loops_a_50ms_clip(sr):
    torch.manual_seed(2)
    clip = torch.rand(1, 1, round(0.05 * sr)) * 1.6 - 0.8
    out = prepare_waveform(clip, sr)
    assert out.shape == (1, 160000)
    period = 800  # 50 ms at 16 kHz
    assert torch.allclose(out[:, period:], out[:, :-period], atol=1e-6)
    assert out.abs().max() > 0.5  # not silence
    if sr == 16000:
        assert torch.equal(out[0, :period], clip[0, 0])


def test_prepare_loop_is_tile_then_cut_like_the_reference():
    torch.manual_seed(3)
    clip = torch.rand(16000 * 3 // 2) * 2 - 1  # 1.5 s at 16 kHz
    tiled = clip.repeat(7)[:160000]  # the reference: tile to 10 s ...
    out = prepare_waveform(clip, 16000, start_seconds=3.0, window_seconds=5.0)
    assert torch.equal(out[0], tiled[48000:128000])  # ... then cut [start, start + 5 s]


def test_prepare_without_loop_zero_pads_the_end():
    clip = torch.full((1, 24000), 0.25)  # 1.5 s at 16 kHz
    out = prepare_waveform(clip, 16000, loop=False)
    assert torch.equal(out[0, :24000], clip[0]) and torch.count_nonzero(out[0, 24000:]) == 0
    with pytest.raises(AudioInputError, match="beyond the end"):
        prepare_waveform(clip, 16000, loop=False, start_seconds=2.0)


def test_prepare_keeps_values_beyond_full_scale():
    """Like the reference, no clipping: samples beyond [-1, 1] reach the encoder unchanged."""
    x = torch.tensor([0.5, -0.25, 2.0, -3.0, 0.1] * 3200)
    out = prepare_waveform(x, 16000, window_seconds=1.0)[0]
    assert torch.equal(out, x)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_prepare_keeps_the_resampler_overshoot_of_a_full_scale_signal(sr):
    """A full-scale square wave (as loud recordings are) rings past 1 when band-limited to 8 kHz;
    that overshoot is part of the signal the encoder hears (the reference keeps it too)."""
    t = torch.arange(sr * 2) / sr
    square = torch.sign(torch.sin(2 * math.pi * 441 * t + 0.1))  # exactly +-1
    out = prepare_waveform(square, sr, window_seconds=1.0)[0]
    whole = resample(square[None], sr, 16000)[0]
    assert torch.equal(out, whole[:16000])
    assert out.abs().max() > 1.05  # Gibbs ringing past full scale


def test_prepare_silence_is_valid():
    out = prepare_waveform(torch.zeros(2, 2, 44100 * 3), 44100)
    assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_prepare_rejects_non_finite_samples_in_the_part_used(bad):
    x = torch.zeros(1, 2, 48000 * 30)
    x[0, 1, 48000 * 5] = bad
    with pytest.raises(AudioInputError, match="NaN or infinite.*re-export"):
        prepare_waveform(x, 48000)
    # The same sample outside the window (start 10 s .. 20 s) is not read, so it is fine.
    out = prepare_waveform(x, 48000, start_seconds=10.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(0,), (1, 0), (1, 1, 0), (0, 1, 100), (1, 0, 100)])
def test_prepare_rejects_empty_audio(shape):
    with pytest.raises(AudioInputError, match="empty"):
        prepare_waveform(torch.zeros(shape), 16000)


@pytest.mark.parametrize("rate", [4000, 400000, 7999, 192001, 0, -16000])
def test_prepare_rejects_rates_outside_range(rate):
    with pytest.raises(AudioInputError, match=rf"{rate} Hz.*{MIN_SAMPLE_RATE}\.\.{MAX_SAMPLE_RATE}"):
        prepare_waveform(torch.zeros(1, 1, 16000), rate)


@pytest.mark.parametrize("rate", [44100.0, "44100", None, True])
def test_prepare_rejects_non_integer_rates(rate):
    with pytest.raises(AudioInputError, match="whole number of Hz"):
        prepare_waveform(torch.zeros(1, 1, 16000), rate)


def test_prepare_accepts_the_rate_limits():
    assert prepare_waveform(torch.zeros(8000), MIN_SAMPLE_RATE, window_seconds=1).shape == (1, 16000)
    assert prepare_waveform(torch.zeros(192000), MAX_SAMPLE_RATE, window_seconds=1).shape == (1, 16000)


def test_prepare_start_and_window_errors():
    x = torch.zeros(1, 1, 16000 * 20)  # 20 s clip
    with pytest.raises(AudioInputError, match=r"beyond the end of the 20\.000 s clip.*0 to 10\.000 s"):
        prepare_waveform(x, 16000, start_seconds=25.0)
    with pytest.raises(AudioInputError, match="negative"):
        prepare_waveform(x, 16000, start_seconds=-1.0)
    for window in (0.0, -1.0, 61.0, float("nan")):
        with pytest.raises(AudioInputError, match="window"):
            prepare_waveform(x, 16000, window_seconds=window)
    # A window running past the end of a long clip loops (or pads) rather than failing.
    assert prepare_waveform(x, 16000, start_seconds=15.0).shape == (1, 160000)
    # A short clip loops to the reference 10 s: a start inside those 10 s is fine, past them is an error.
    assert prepare_waveform(x[..., :16000], 16000, start_seconds=9.5).shape == (1, 160000)
    with pytest.raises(AudioInputError, match=r"beyond the end of the 1\.000 s clip.*below 10 s"):
        prepare_waveform(x[..., :16000], 16000, start_seconds=25.0)


def test_prepare_rejects_bad_types():
    with pytest.raises(AudioInputError, match="torch.Tensor"):
        prepare_waveform(np.zeros(16000), 16000)
    with pytest.raises(AudioInputError, match="shaped"):
        prepare_waveform(torch.zeros(1, 1, 1, 16000), 16000)
    with pytest.raises(AudioInputError, match="dtype"):
        prepare_waveform(torch.zeros(16000, dtype=torch.int64), 16000)


def test_prepare_integer_pcm():
    x = sine(440, 22050, 3.0) * 0.6
    pcm16 = (x * 32767).round().to(torch.int16)
    out16 = prepare_waveform(pcm16, 22050)
    assert torch.allclose(out16, prepare_waveform(pcm16.double() / 32768, 22050), atol=1e-6)
    assert out16.abs().max().item() == pytest.approx(0.6, abs=0.01)
    pcm32 = (x * (2**31 - 1)).round().to(torch.int32)
    assert torch.allclose(prepare_waveform(pcm32, 22050), prepare_waveform(x, 22050), atol=1e-6)


WINDOW_TABLE = json.loads((REPO_ROOT / "tests" / "data" / "window_table.json").read_text())


def test_window_count_reproduces_the_table():
    """The table the frontend is held to as well (tests/test_browser_preview.py)."""
    got = [window_count(c["duration"], c["window"], c["hop"]) for c in WINDOW_TABLE["cases"]]
    assert got == [c["count"] for c in WINDOW_TABLE["cases"]]


def test_window_table_counts_the_windows_that_fit():
    """Each count, checked in exact decimal arithmetic: the last window ends within the recording
    (to 1e-9 s), one more would not; a recording no longer than a window gives one."""
    from fractions import Fraction

    for c in WINDOW_TABLE["cases"]:
        duration, window, hop = (Fraction(str(c[k])) for k in ("duration", "window", "hop"))
        n = c["count"]
        if duration <= window:
            assert n == 1, c
        else:
            assert (n - 1) * hop + window <= duration + Fraction(1, 10**9), c
            assert n * hop + window > duration, c


_ONE_HOUR_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time, torch
    from audiotoken_core.audio import prepare_waveform

    def rss_mb(field):  # VmRSS (now) or VmHWM (peak since the last reset); else ru_maxrss
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return kb / 1024 / (1024 if sys.platform == "darwin" else 1)

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass

    hour = 48000 * 3600
    # Warm up allocators, kernels and the filter cache on a short clip.
    prepare_waveform(torch.zeros(1, 1, 48000 * 30, dtype=torch.float16), 48000, start_seconds=5.0)
    # One hour at 48 kHz that occupies 2 bytes: a broadcast view. Any full-length copy
    # (float32: 691 MB, float16: 346 MB, an isfinite mask: 173 MB) would show in the peak RSS.
    audio = torch.zeros(1, 1, 1, dtype=torch.float16).expand(1, 1, hour)
    reset_peak()
    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    a = prepare_waveform(audio, 48000)
    b = prepare_waveform(audio, 48000, start_seconds=3590.0)
    c = prepare_waveform(audio, 48000, start_seconds=3595.0)  # runs past the end: loops
    elapsed = time.perf_counter() - t0
    grown = rss_mb("VmHWM") - before
    # Probe check: a real 10-minute float32 copy (110 MB) must register.
    reset_peak()
    before = rss_mb("VmRSS")
    probe = audio[..., : 48000 * 600].float() + 1
    probe_grown = rss_mb("VmHWM") - before
    print(tuple(a.shape), tuple(b.shape), tuple(c.shape), f"{elapsed:.3f}", f"{grown:.1f}", f"{probe_grown:.1f}")
    """
)


def test_prepare_one_hour_file_costs_about_the_same_as_ten_seconds():
    """Run in a fresh interpreter, so its peak RSS only reflects this work."""
    result = subprocess.run(
        [sys.executable, "-c", _ONE_HOUR_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split()
    elapsed, grown, probe_grown = float(fields[-3]), float(fields[-2]), float(fields[-1])
    assert probe_grown > 80.0, f"the RSS probe missed a 110 MB allocation ({probe_grown:.0f} MB): {result.stdout}"
    assert result.stdout.count("(1, 160000)") == 3, result.stdout
    assert elapsed < 3.0, f"three one-hour windows took {elapsed:.2f} s"
    full_float32_mb = 48000 * 3600 * 4 / 2**20
    assert grown < 64.0, f"peak RSS grew by {grown:.0f} MB (a full float32 copy is {full_float32_mb:.0f} MB)"


# --------------------------------------------------------------------------- audio_io


def _by_name(recordings, stem):
    return next(p for p in recordings if p.stem == stem)


@pytest.mark.parametrize("stem,rate,channels,seconds", [("duck", 44100, 2, 6.0), ("cat", 48000, 1, 3.05), ("owl", 48000, 1, 8.5)])
def test_load_mp3_rate_and_channels(cc0_recordings, stem, rate, channels, seconds):
    wave, sr = load_audio_file(_by_name(cc0_recordings, stem))
    assert sr == rate and wave.shape[0] == channels and wave.dtype == torch.float32
    assert wave.shape[1] / sr == pytest.approx(seconds, abs=0.06)
    assert 0.3 < wave.abs().max().item() <= 1.1 and torch.isfinite(wave).all()


def test_load_all_cc0_recordings(cc0_recordings):
    for path in cc0_recordings:
        wave, sr = load_audio_file(str(path))
        assert sr in (44100, 48000) and wave.shape[0] in (1, 2) and wave.shape[1] > 0.5 * sr, path


def test_load_wav_is_exact(tmp_path):
    rng = np.random.default_rng(4)
    stereo = rng.integers(-32768, 32767, size=(22050, 2), dtype=np.int16)  # interleaved on disk
    wavfile.write(tmp_path / "stereo16.wav", 22050, stereo)
    wave, sr = load_audio_file(tmp_path / "stereo16.wav")
    assert sr == 22050 and wave.shape == (2, 22050)
    assert torch.equal(wave, torch.from_numpy(stereo.T.astype(np.float32) / 32768))
    mono = rng.uniform(-1, 1, size=8000).astype(np.float32)
    wavfile.write(tmp_path / "mono32f.wav", 8000, mono)
    wave, sr = load_audio_file(tmp_path / "mono32f.wav")
    assert sr == 8000 and torch.equal(wave, torch.from_numpy(mono)[None])


def test_load_errors(tmp_path, cc0_recordings):
    truncated = tmp_path / "truncated.mp3"
    truncated.write_bytes(_by_name(cc0_recordings, "cow").read_bytes()[:200])
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    for path in (truncated, text):
        with pytest.raises(AudioInputError, match=r"could not decode .*re-export the file as WAV/FLAC"):
            load_audio_file(path)
    with pytest.raises(AudioInputError, match="not found") as info:
        load_audio_file(tmp_path / "missing.wav")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(AudioInputError, match="folder"):
        load_audio_file(tmp_path)


def test_load_video_without_audio(tmp_path):
    import av

    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(AudioInputError, match="no audio stream"):
        load_audio_file(path)
