"""The audio timeline (audiotoken_core/timeline.py) and its node (nodes/timeline_nodes.py), with known answers.

Fake embed_fns read back which windows were embedded: over a ramp recording (sample value = its time in
seconds) a window's first sample is its start time.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from test_onsets import click_track

from audiotoken_core import onsets, timeline
from audiotoken_core.timeline import (
    WINDOW_MODES,
    TimelineError,
    build_timeline,
    centred_window_start,
    frame_centre,
    frame_count,
    frame_time,
    interpolate,
    smooth_frames,
)

RATE = 16000  # no resampling: windows are exact slices of the recording
TABLE = json.loads((Path(__file__).parent / "data" / "timeline_table.json").read_text())


def ramp(seconds: float, rate: int = RATE, channels: int = 1) -> torch.Tensor:
    return (torch.arange(round(seconds * rate), dtype=torch.float64) / rate).float().expand(channels, -1)


class StartReader:
    """embed_fn stand-in: row = (start, start) read from a ramp window's first sample; counts the rows."""

    def __init__(self):
        self.rows = 0
        self.calls = []

    def __call__(self, wave16):
        self.rows += wave16.shape[0]
        self.calls.append(wave16.shape[0])
        first = wave16[:, :1].double()
        return {"l": torch.cat([first, first], dim=1), "g": first * 2}


def starts_of(tl) -> list[float]:
    return [round(v, 4) for v in tl.embedding.vectors["l"][:, 0].tolist()]


# ------------------------------------------------------------------------------ the time base


@pytest.mark.parametrize("case", TABLE["cases"], ids=lambda c: c["note"][:40])
def test_time_base_matches_the_shared_table(case):
    d, fps, start, length, window = case["duration"], case["fps"], case["start"], case["length"], case["window"]
    n = frame_count(d, fps, start, length)
    assert n == case["frame_count"]
    shown = range(len(case["frame_times"]))
    assert [frame_time(i, fps, start) for i in shown] == case["frame_times"]
    assert [frame_centre(i, fps, start) for i in shown] == case["frame_centres"]
    assert [centred_window_start(frame_centre(i, fps, start), window, d) for i in shown] == case["centred_window_starts"]
    assert frame_time(n - 1, fps, start) == case["last_frame_time"]
    assert centred_window_start(frame_centre(n - 1, fps, start), window, d) == case["last_window_start"]
    assert start + n / fps == case["end_seconds"]
    # Independently, in exact decimal arithmetic: the whole frames that fit in the span (at least one).
    span = Fraction(str(length)) if length > 0 else Fraction(str(d)) - Fraction(str(start))
    assert n == max(1, math.floor(span * Fraction(str(fps))))
    centre = Fraction(str(start)) + (Fraction(n) - Fraction(1, 2)) / Fraction(str(fps))
    exact_last = min(max(centre - Fraction(str(window)) / 2, 0), max(Fraction(str(d)) - Fraction(str(window)), 0))
    assert case["last_window_start"] == pytest.approx(float(exact_last), abs=1e-12)


def test_timeline_properties():
    tl = build_timeline(ramp(3.0), RATE, StartReader(), fps=4, window_seconds=1.0, start_seconds=0.5)
    assert tl.frame_count == 10 and tl.end_seconds == 3.0
    assert tl.frame_times() == [0.5 + i / 4 for i in range(10)]
    assert tl.weights.shape == (10,) and torch.equal(tl.weights, torch.ones(10))
    assert tl.embedding.widths == {"l": 2, "g": 1}


# ------------------------------------------------------------------------------ centred windows


def test_centred_windows_clamp_at_both_ends_and_are_embedded_once():
    reader = StartReader()
    tl = build_timeline(ramp(6.0), RATE, reader, fps=2, window_seconds=4.0)
    # centres 0.25, 0.75, ..., 5.75; start = centre - 2 clamped into [0, 2]
    assert starts_of(tl) == [0, 0, 0, 0, 0.25, 0.75, 1.25, 1.75, 2, 2, 2, 2]
    assert tl.window_starts == [0.0, 0.25, 0.75, 1.25, 1.75, 2.0]
    assert reader.rows == 6  # the clamped frames share their window


def test_window_longer_than_the_recording_is_one_looped_window():
    reader = StartReader()
    tl = build_timeline(ramp(1.5), RATE, reader, fps=4, window_seconds=4.0)
    assert tl.frame_count == 6 and starts_of(tl) == [0.0] * 6 and reader.rows == 1


def test_windows_are_embedded_in_batches():
    reader = StartReader()
    build_timeline(ramp(4.0), RATE, reader, fps=5, window_seconds=0.5, embed_batch=3)
    assert reader.rows == 20 and set(reader.calls[:-1]) == {3} and sum(reader.calls) == 20


def test_windows_are_the_ones_prepare_waveform_cuts(monkeypatch):
    """Nearby windows come from one resampled read: each row equals cutting that window on its own."""
    rate = 44100
    wave = torch.randn(2, 40 * rate, generator=torch.Generator().manual_seed(1))
    seen = []
    monkeypatch.setattr(timeline, "READ_SECONDS", 9.0)  # several reads
    tl = build_timeline(wave, rate, lambda w: seen.append(w) or {"l": w[:, :1]}, fps=3, window_seconds=2.5,
                        length_seconds=12.0)
    rows = torch.cat(seen)
    assert rows.shape == (len(tl.window_starts), 40000)
    for row, start in list(zip(rows, tl.window_starts))[::5]:
        alone = timeline.prepare_waveform(wave, rate, start_seconds=start, window_seconds=2.5)[0]
        assert torch.equal(row, alone), start


# ------------------------------------------------------------------------------ hop windows


def angle_vectors(wave16):
    """Window start s -> (1 + s) * (cos s, sin s): not parallel, different lengths."""
    s = wave16[:, 0].double()
    return {"l": torch.stack([(1 + s) * torch.cos(s), (1 + s) * torch.sin(s)], dim=1)}


def test_hop_endpoints_and_midpoints_linear_and_slerp():
    # 2 s windows every 1 s in 6 s: starts 0..4, centres 1..5. Frames at 2 fps from 0.75: centres 1.0, 1.5, ...
    common = {"fps": 2, "window_seconds": 2.0, "windows": WINDOW_MODES[1], "hop_seconds": 1.0,
              "start_seconds": 0.75, "length_seconds": 2.0}
    lin = build_timeline(ramp(6.0), RATE, angle_vectors, interpolation="linear", **common).embedding.vectors["l"]
    slerp = build_timeline(ramp(6.0), RATE, angle_vectors, interpolation="slerp", **common).embedding.vectors["l"]

    def v(s):
        return torch.tensor([(1 + s) * math.cos(s), (1 + s) * math.sin(s)])

    for frame, k in ((0, 0), (2, 1)):  # centred exactly on c_k = k + 1: v_k exactly
        assert torch.equal(lin[frame], v(k).float()) and torch.equal(slerp[frame], v(k).float())
    for frame, k in ((1, 0), (3, 1)):  # halfway between c_k and c_k+1
        torch.testing.assert_close(lin[frame], ((v(k) + v(k + 1)) / 2).float())
        # slerp: the direction halfway round (angle k + 0.5), the length halfway (1 + k + 0.5)
        mid = k + 0.5
        torch.testing.assert_close(slerp[frame], torch.tensor([(1 + mid) * math.cos(mid), (1 + mid) * math.sin(mid)]).float())


def test_hop_holds_the_first_and_last_vectors_beyond_the_centres():
    reader = StartReader()
    # 4 s, 2 s windows every 1 s: starts 0, 1, 2 (centres 1, 2, 3). 4 fps frames: centres 0.125 .. 3.875.
    tl = build_timeline(ramp(4.0), RATE, reader, fps=4, window_seconds=2.0, windows=WINDOW_MODES[1], hop_seconds=1.0)
    got = tl.embedding.vectors["l"][:, 0].double()
    expected = [min(max(frame_centre(i, 4) - 1.0, 0.0), 2.0) for i in range(16)]  # u runs linearly between centres
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert got[:4].tolist() == [0.0] * 4 and got[-4:].tolist() == [2.0] * 4 and reader.rows == 3


def _record_reads(monkeypatch) -> list[tuple[float, float]]:
    """(start, seconds) of every prepare_waveform read the timeline and the onset envelope make."""
    reads = []
    real = timeline.prepare_waveform

    def recording(*args, **kwargs):
        reads.append((kwargs["start_seconds"], kwargs["window_seconds"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(timeline, "prepare_waveform", recording)
    monkeypatch.setattr(onsets, "prepare_waveform", recording)
    return reads


def test_hop_embeds_only_the_windows_the_frames_need(monkeypatch):
    reads = _record_reads(monkeypatch)
    reader = StartReader()
    # 120 s recording, windows of 2 s every 1 s (119 of them); 2 s of frames from 50 s (centres
    # 50.125 .. 51.875) need the windows centred on 50, 51 and 52: starts 49, 50, 51.
    tl = build_timeline(ramp(120.0), RATE, reader, fps=4, window_seconds=2.0, windows=WINDOW_MODES[1],
                        hop_seconds=1.0, start_seconds=50.0, length_seconds=2.0)
    assert reader.rows == 3 and tl.window_starts == [49.0, 50.0, 51.0]
    # Everything read (windows and the onset envelope) lies near the frames' span, never the whole file.
    assert all(45.0 <= s and s + w <= 56.0 for s, w in reads), reads
    assert sum(w for _, w in reads) < 12.0


def test_an_hour_long_recording_costs_what_its_frames_cost(monkeypatch):
    reads = _record_reads(monkeypatch)
    hour = torch.zeros(1, 1).expand(2, 3600 * 8000)  # one hour of stereo silence, never materialised
    tl = build_timeline(hour, 8000, StartReader(), fps=12, window_seconds=4.0, start_seconds=1800.0,
                        length_seconds=3.0, onset_weight=1.0)
    assert tl.frame_count == 36 and tl.duration_seconds == 3600.0 and tl.end_seconds == 1803.0
    assert all(1797.0 <= s and s + w <= 1806.0 for s, w in reads), reads


def test_single_looped_hop_window_for_a_short_recording():
    reader = StartReader()
    tl = build_timeline(ramp(1.0), RATE, reader, fps=8, window_seconds=3.0, windows=WINDOW_MODES[1], hop_seconds=1.0)
    assert reader.rows == 1 and tl.window_starts == [0.0] and starts_of(tl) == [0.0] * 8


# ------------------------------------------------------------------------------ interpolation and smoothing


def test_slerp_keeps_unit_norm_and_falls_back_for_parallel_rows():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen, dtype=torch.float64), dim=1)
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    out = interpolate(a, b, u, "slerp")
    torch.testing.assert_close(out.norm(dim=1), torch.ones(64, dtype=torch.float64))
    # the angle to a grows linearly with u
    torch.testing.assert_close(torch.acos((out * a).sum(1).clamp(-1, 1)), u * torch.acos((a * b).sum(1).clamp(-1, 1)))
    assert torch.equal(interpolate(a, b, 0.0, "slerp"), a) and torch.equal(interpolate(a, b, 1.0, "slerp"), b)
    # (anti)parallel rows: linear
    torch.testing.assert_close(interpolate(a, -a, 0.25, "slerp"), 0.5 * a)
    torch.testing.assert_close(interpolate(a, 3 * a, 0.5, "slerp"), 2 * a)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(interpolate(zero, a, 0.5, "slerp"), 0.5 * a)
    with pytest.raises(TimelineError, match="unknown interpolation 'cubic'; choose one of linear, slerp"):
        interpolate(a, b, 0.5, "cubic")


def test_smoothing_of_a_constant_and_of_a_step():
    const = torch.full((20, 3), 2.5, dtype=torch.float64)
    torch.testing.assert_close(smooth_frames(const, 2.0), const)  # ends included (renormalised)
    step = torch.zeros(20, 1, dtype=torch.float64)
    step[10:] = 1.0
    sigma = 1.5
    out = smooth_frames(step, sigma)[:, 0]
    radius = math.ceil(3 * sigma)
    for i in range(20):
        taps = {j: math.exp(-0.5 * ((j - i) / sigma) ** 2) for j in range(max(0, i - radius), min(20, i + radius + 1))}
        expected = sum(w for j, w in taps.items() if j >= 10) / sum(taps.values())
        assert out[i].item() == pytest.approx(expected, abs=1e-12)
    assert out[9].item() < 0.5 < out[10].item() and out[0].item() == 0.0 and out[19].item() == 1.0
    assert torch.equal(smooth_frames(step, 0.0), step)


def test_smoothing_seconds_is_sigma_in_frames():
    reader = StartReader()
    plain = build_timeline(ramp(6.0), RATE, reader, fps=4, window_seconds=1.0).embedding.vectors["l"].double()
    smooth = build_timeline(ramp(6.0), RATE, reader, fps=4, window_seconds=1.0,
                            smoothing_seconds=0.5).embedding.vectors["l"].double()
    torch.testing.assert_close(smooth, smooth_frames(plain, 2.0), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ onsets


def locate(signal: torch.Tensor):
    """embed_fn that finds each window in `signal` (unique noise) and returns its start time."""
    def embed(wave16):
        probe = wave16[:, :256]
        frames = signal.unfold(0, 256, 1)  # [positions, 256]
        starts = [int(torch.argmin((frames - row).abs().sum(1))) / RATE for row in probe]
        return {"l": torch.tensor(starts, dtype=torch.float64)[:, None]}
    return embed


def test_onset_windows_switch_on_the_onset_frame_and_hold():
    gen = torch.Generator().manual_seed(3)
    clicks = [1.05, 2.55, 2.97]
    base = click_track(clicks, 4.0, RATE, amplitude=0.8) + 0.001 * torch.randn(4 * RATE, generator=gen)
    fps, window = 10, 0.5
    tl = build_timeline(base[None], RATE, locate(base), fps=fps, window_seconds=window, windows=WINDOW_MODES[2],
                        start_seconds=0.5)
    assert len(tl.onsets) == 3 and all(abs(o - c) <= 0.01 for o, c in zip(tl.onsets, clicks))
    got = tl.embedding.vectors["l"][:, 0].double()
    assert tl.frame_count == 35
    switch = [math.floor((o - 0.5) * fps + 1e-9) for o in tl.onsets]
    assert switch == [5, 20, 24]
    expected = []
    for i in range(35):
        boundary = max([0.5] + [o for o, f in zip(tl.onsets, switch) if f <= i])
        expected.append(min(max(boundary, 0.0), 4.0 - window))  # the window STARTS at the boundary
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1.5 / RATE, rtol=0)
    assert got[4] == got[0] and got[5] != got[4] and got[19] == got[5] and got[20] != got[19]
    torch.testing.assert_close(torch.tensor(tl.window_starts, dtype=torch.float64),
                               torch.tensor(sorted(set(expected)), dtype=torch.float64), atol=1e-12, rtol=0)


def test_beat_windows_switch_on_the_beat_frames_not_on_every_attack():
    """A 120 BPM click track with a softer click between the beats: the onset mode would change on every attack,
    the beat mode changes exactly on the beat frames, each segment hearing the window that starts at its beat."""
    gen = torch.Generator().manual_seed(5)
    beats = [0.55 + 0.5 * k for k in range(12)]  # 120 BPM
    offbeats = [b + 0.25 for b in beats[:-1]]
    base = (click_track(beats, 6.5, RATE, amplitude=0.8) + click_track(offbeats, 6.5, RATE, amplitude=0.25, seed=1)
            + 0.001 * torch.randn(round(6.5 * RATE), generator=gen))
    fps, window, start = 10, 0.5, 0.5
    tl = build_timeline(base[None], RATE, locate(base), fps=fps, window_seconds=window, windows=WINDOW_MODES[3],
                        start_seconds=start, length_seconds=5.5)
    assert tl.frame_count == 55 and abs(tl.tempo_bpm - 120.0) <= 2.4
    assert len(tl.onsets) == 22  # every attack of the span is an onset ...
    inside = [b for b in beats if b < 6.0]
    assert len(tl.beats) == len(inside) and all(abs(b - c) <= 0.01 for b, c in zip(tl.beats, inside))  # ... 11 beats
    # beat k (0.55 + 0.5 k s) sounds during frame 5k (frame i shows [0.5 + i/10, 0.5 + (i+1)/10)): the known answer
    got = tl.embedding.vectors["l"][:, 0].double()
    switches = [i for i in range(1, 55) if got[i] != got[i - 1]]
    assert switches == [5 * k for k in range(1, 11)]
    expected = torch.tensor([tl.beats[i // 5] for i in range(55)], dtype=torch.float64)  # the window STARTS at the beat
    torch.testing.assert_close(got, expected, atol=1.5 / RATE, rtol=0)
    assert tl.window_starts == tl.beats  # frame 0 shows beat 0: the span start's own segment is never shown
    onset_mode = build_timeline(base[None], RATE, locate(base), fps=fps, window_seconds=window,
                                windows=WINDOW_MODES[2], start_seconds=start, length_seconds=5.5)
    assert onset_mode.beats == [] and onset_mode.tempo_bpm == 0.0  # tracked only for the beat mode
    assert len(onset_mode.window_starts) == 22  # the onset mode changes on the off-beat clicks too


def test_beat_mode_without_beats_holds_one_window_from_the_start():
    tl = build_timeline(ramp(3.0)[None], RATE, StartReader(), fps=5, window_seconds=1.0, windows=WINDOW_MODES[3],
                        start_seconds=0.4)
    assert tl.beats == [] and tl.tempo_bpm == 0.0 and tl.window_starts == [0.4]
    assert starts_of(tl) == [0.4] * tl.frame_count


def test_onset_in_the_last_window_is_clamped_into_the_recording():
    gen = torch.Generator().manual_seed(4)
    base = click_track([2.8], 3.0, RATE, amplitude=0.8) + 0.001 * torch.randn(3 * RATE, generator=gen)
    tl = build_timeline(base[None], RATE, locate(base), fps=5, window_seconds=1.0, windows=WINDOW_MODES[2])
    got = tl.embedding.vectors["l"][:, 0].tolist()
    assert got[:14] == [0.0] * 14 and got[14] == pytest.approx(2.0)  # 2.8 s would run past the end: 3 - 1


def test_onset_weights_peak_on_the_click_frames():
    clicks = [0.55, 1.35, 2.15]
    wave = click_track(clicks, 3.0, 22050, amplitude=0.6)
    tl = build_timeline(wave[None], 22050, StartReader(), fps=10, window_seconds=1.0, onset_weight=2.0)
    click_frames = {math.floor(c * 10) for c in clicks}
    assert click_frames == {5, 13, 21}
    for i, w in enumerate(tl.weights.tolist()):
        if i in click_frames:
            assert w >= 2.5, (i, w)
        else:
            assert w < 1.5, (i, w)
    assert max(tl.weights.tolist()) == pytest.approx(3.0)  # the strongest frame reaches 1 + onset_weight


def test_onset_weights_of_silence_and_fast_frames():
    silent = build_timeline(torch.zeros(1, 2 * RATE), RATE, StartReader(), fps=10, window_seconds=1.0,
                            onset_weight=3.0)
    assert torch.equal(silent.weights, torch.ones(20)) and silent.onsets == []
    # 120 fps (shorter frames than the envelope's 10 ms): every frame still gets a strength
    wave = click_track([0.5], 1.0, RATE)
    fast = build_timeline(wave[None], RATE, StartReader(), fps=120, window_seconds=0.5, onset_weight=1.0)
    assert fast.weights.shape == (120,) and int(fast.weights.argmax()) in (59, 60, 61)
    assert float(fast.weights.max()) == pytest.approx(2.0)


# ------------------------------------------------------------------------------ refusals


def test_too_many_frames_is_refused_with_the_numbers_and_the_fix():
    with pytest.raises(TimelineError, match=r"10.00 s at 24 fps is 240 frames, more than max_frames=100; raise "
                                            r"max_frames, lower fps, or set length_seconds <= 4.17"):
        build_timeline(ramp(10.0), RATE, StartReader(), fps=24, max_frames=100)


@pytest.mark.parametrize("kwargs, match", [
    ({"windows": "random"}, "unknown windows mode 'random'; choose one of: centred on each frame, every hop"),
    ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
    ({"channel_policy": "left"}, "unknown channel_policy 'left'"),
    ({"fps": 0}, "fps=0 is out of range"),
    ({"fps": float("nan")}, "fps must be a finite number"),
    ({"window_seconds": 61}, r"window_seconds=61 is out of range; use a window in \(0, 60\]"),
    ({"hop_seconds": 0}, "hop_seconds=0 is out of range"),
    ({"smoothing_seconds": -1}, "smoothing_seconds=-1 is out of range"),
    ({"onset_weight": -0.5}, "onset_weight=-0.5 is out of range"),
    ({"start_seconds": 3.0}, "start_seconds=3 is at or past the end of the 3.000 s recording"),
    ({"start_seconds": 1.0, "length_seconds": 2.5}, r"runs past the end .* use length_seconds <= 2.000"),
    ({"max_frames": 0}, "max_frames must be a whole number >= 1"),
    ({"min_gap_seconds": -1}, "min_gap_seconds must be a finite number >= 0"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_timeline(ramp(3.0), RATE, StartReader(), **kwargs)


def test_bad_audio_and_bad_embed_fn_are_refused():
    with pytest.raises(TimelineError, match="a timeline takes one recording, got a batch of 2"):
        build_timeline(torch.zeros(2, 1, RATE), RATE, StartReader())
    with pytest.raises(ValueError, match="sample_rate"):
        build_timeline(torch.zeros(1, RATE), 1000, StartReader())
    with pytest.raises(TimelineError, match=r"embed_fn must return \{key: \[N, D\] tensor\} with N = 3 windows, got "
                                            r"\{'l': \(2, 4\)\}"):
        build_timeline(ramp(3.0), RATE, lambda w: {"l": torch.zeros(2, 4)}, fps=1, window_seconds=1.0)


# ------------------------------------------------------------------------------ the node


@pytest.fixture(scope="module")
def node_env(tmp_path_factory):
    """The pack imported in-process with a tiny random BEATs + AudioToken (2 layers of 32, word width 16)."""
    from tools.comfy_root import import_comfy, import_pack
    from tools.placeholder_beats import write_placeholder_beats

    import_comfy(cpu=True)
    import_pack()
    from audiotoken.audiotoken_core.embedder import Embedder, EmbedderConfig
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.token_file import AudioToken
    from audiotoken.nodes.runtime import LoadedAudioToken, LoadedEncoder
    from audiotoken.nodes.timeline_nodes import AudioTokenTimeline

    path = write_placeholder_beats(tmp_path_factory.mktemp("beats") / "tiny.pt", seed=1, encoder_layers=2,
                                   encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                                   embed_dim=32, conv_pos=16, conv_pos_groups=4)
    encoder = LoadedEncoder(encoder=load_audio_encoder(path, layers=[1, 2]), name="tiny.pt")
    torch.manual_seed(0)
    token = AudioToken(embedders={"l": Embedder(EmbedderConfig(input_dim=64, output_dim=16))},
                       encoder={"kind": "beats", "layers": [1, 2], "hidden_size": 32, "sample_rate": 16000})
    return AudioTokenTimeline, LoadedAudioToken(token=token, encoder=encoder, name="tiny-token")


NODE_ARGS = {"fps": 7.0, "window_seconds": 1.0, "windows": WINDOW_MODES[0], "hop_seconds": 0.5,
             "interpolation": "linear", "smoothing_seconds": 0.0, "onset_weight": 1.0, "start_seconds": 0.37,
             "length_seconds": 2.0, "channels": "mix", "max_frames": 100}


def test_node_outputs_the_timeline_the_audio_span_and_the_ui(node_env):
    from audiotoken.audiotoken_core.audio import prepare_waveform

    node, token = node_env
    rate = 22050
    left = click_track([0.9, 1.6], 3.0, rate, amplitude=0.6)
    stereo = torch.stack([left, 0.5 * left.roll(441)])[None]  # [1, 2, T]
    out = node.execute(audio={"waveform": stereo, "sample_rate": rate}, audiotoken=token, **NODE_ARGS)
    tl, count, fps, audio = out.args
    assert count == 14 == tl.frame_count and fps == 7.0  # floor(2.0 * 7)
    assert tl.embedding.vectors["l"].shape == (14, 16) and tl.weights.shape == (14,)
    # frame 3's vector is the token's vector of the 1 s window centred on it (embedded directly here)
    start3 = centred_window_start(frame_centre(3, 7.0, 0.37), 1.0, 3.0)
    direct = token.embed_wave16(prepare_waveform(stereo, rate, start_seconds=start3, window_seconds=1.0))
    torch.testing.assert_close(tl.embedding.vectors["l"][3:4], direct["l"], atol=1e-5, rtol=1e-5)
    # the audio the frames show: all channels at the recording's rate, sample-accurate
    first, length = round(0.37 * rate), round(14 / 7.0 * rate)
    assert audio["sample_rate"] == rate and audio["waveform"].shape == (1, 2, length)
    assert torch.equal(audio["waveform"], stereo[..., first:first + length])
    [payload] = out.ui["audiotoken_timeline"]
    assert payload["fps"] == 7.0 and payload["start_seconds"] == 0.37 and payload["frame_count"] == 14
    assert payload["window_seconds"] == 1.0 and payload["windows"] == WINDOW_MODES[0]
    assert payload["duration_seconds"] == 3.0 and payload["window_starts"] == tl.window_starts
    assert len(payload["onsets"]) == 2 and all(abs(a - b) <= 0.01 for a, b in zip(payload["onsets"], [0.9, 1.6]))
    assert payload["beats"] == [] and payload["tempo_bpm"] == 0.0  # beats are the beat mode's
    json.dumps(out.ui)  # plain JSON for the frontend


def test_node_ui_payload_of_the_beat_mode(node_env):
    """The beat mode's payload lists the tracked beats (the change boundaries the frontend draws) and the tempo;
    its window starts are the beats."""
    node, _ = node_env
    rate = 22050
    beats = [0.3 + 0.5 * k for k in range(8)]
    audio = {"waveform": click_track(beats, 4.2, rate, "noise")[None, None], "sample_rate": rate}
    out = node.execute(audio=audio, audiotoken=_Cheap(), **dict(NODE_ARGS, windows=WINDOW_MODES[3], fps=10.0,
                                                                start_seconds=0.2, length_seconds=4.0))
    tl = out.args[0]
    [payload] = out.ui["audiotoken_timeline"]
    assert payload["windows"] == WINDOW_MODES[3] and payload["beats"] == tl.beats
    assert len(payload["beats"]) == 8 and all(abs(a - b) <= 0.01 for a, b in zip(payload["beats"], beats))
    assert abs(payload["tempo_bpm"] - 120.0) <= 2.4
    # the span start's segment (frame 0), then one window per beat, those past 4.2 - 1 s clamped into the recording
    assert payload["window_starts"] == pytest.approx(sorted({0.2, *(min(b, 3.2) for b in tl.beats)}), abs=1e-12)
    json.dumps(out.ui)


class _Cheap:
    """A stand-in token for cheap, long timelines."""

    name = "cheap"

    def embed_wave16(self, wave16):
        return {"l": wave16[:, :1]}


def test_node_ui_lists_are_capped_and_the_span_reaches_the_end(node_env):
    node, _ = node_env
    audio = {"waveform": torch.zeros(1, 1, 25 * 8000), "sample_rate": 8000}
    out = node.execute(audio=audio, audiotoken=_Cheap(), **dict(NODE_ARGS, fps=24.0, start_seconds=0.0,
                                                                length_seconds=0.0, max_frames=2400))
    tl, count, _, clip = out.args
    assert count == 600 and len(tl.window_starts) > 512
    assert out.ui["audiotoken_timeline"][0]["window_starts"] == tl.window_starts[:512]
    assert clip["waveform"].shape == (1, 1, 25 * 8000)


def test_node_refuses_a_batch_and_too_many_frames(node_env):
    node, _ = node_env
    batch = {"waveform": torch.zeros(2, 1, 16000), "sample_rate": 16000}
    with pytest.raises(ValueError, match="batch of 2 recordings; a timeline is made from one recording per timeline"):
        node.execute(audio=batch, audiotoken=_Cheap(), **NODE_ARGS)
    long = {"waveform": torch.zeros(1, 1, 16000 * 30), "sample_rate": 16000}
    with pytest.raises(ValueError, match="30.00 s at 7 fps is 210 frames, more than max_frames=100; raise max_frames"):
        node.execute(audio=long, audiotoken=_Cheap(), **dict(NODE_ARGS, start_seconds=0.0, length_seconds=0.0))


def test_node_schema_is_the_shared_design(node_env):
    node, _ = node_env
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["audio", "audiotoken", "fps", "window_seconds", "windows", "hop_seconds", "interpolation",
                              "smoothing_seconds", "onset_weight", "start_seconds", "length_seconds", "channels",
                              "max_frames"]
    defaults = {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}
    assert defaults == {"fps": 12.0, "window_seconds": 4.0, "windows": WINDOW_MODES[0], "hop_seconds": 1.0,
                        "interpolation": "linear", "smoothing_seconds": 0.0, "onset_weight": 0.0, "start_seconds": 0.0,
                        "length_seconds": 0.0, "channels": "mix", "max_frames": 2400}
    assert (required["fps"][1]["min"], required["fps"][1]["max"]) == (1.0, 120.0)
    assert (required["onset_weight"][1]["min"], required["onset_weight"][1]["max"]) == (0.0, 4.0)
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert list(node.RETURN_TYPES) == ["AUDIOTOKEN_TIMELINE", "INT", "FLOAT", "AUDIO"]
    assert node.CATEGORY == "audio/AudioToken/video"
