"""Audio timeline -> one audio vector per video frame.

The time base (one source of truth; web/js/audiotoken_audio.js has the same formulas in the same
doubles, and tests/data/timeline_table.json holds both to them):

- A timeline covers the span [start, start + frame_count / fps) of the recording.
- frame_count = max(1, floor(span * fps + 1e-9)), span = duration - start, or the length asked for.
- Frame i appears at frame_time(i) = start + i / fps (its presentation time in the written video,
  whose audio track starts at `start`) and is centred at start + (i + 0.5) / fps.
- A window of `window` seconds centred on a frame starts at centre - window / 2, clamped into
  the recording: min(max(centre - window / 2, 0), max(duration - window, 0)).

`build_timeline` gives each frame a vector in one of WINDOW_MODES: a window centred on the frame;
windows every hop (anchored at 0, as AudioTokenEmbedWindows) with frames between two window centres
blended (`interpolate`: linear or slerp); or a window starting at each onset (audiotoken_core.onsets),
held until the next; or the same from each tracked beat (`onsets.detect_beats`), so the picture changes on
the beat, not on every attack. Then optional Gaussian smoothing along frames (`smooth_frames`) and per-frame
prompt weights 1 + onset_weight * onset strength. Only the windows the frames need are cut, resampled
and embedded (in batches, through the caller's embed_fn), so memory follows the frames, not the file.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import onsets as onsets_mod
from .audio import (
    CHANNEL_POLICIES,
    MAX_WINDOW_SECONDS,
    TARGET_SAMPLE_RATE,
    _as_batch,
    _check_sample_rate,
    prepare_waveform,
    window_count,
)
from .embedding import AudioEmbedding

FRAME_EPSILON = 1e-9  # in frames: a span that is a whole number of frames up to float rounding keeps its last frame


def frame_count(duration: float, fps: float, start: float = 0.0, length: float = 0.0) -> int:
    """Frames of a timeline at `fps` from `start` over `length` seconds (0 = to the end of the recording)."""
    span = (duration - start) if length <= 0 else length
    return max(1, math.floor(span * fps + FRAME_EPSILON))


def frame_time(index: int, fps: float, start: float = 0.0) -> float:
    """When frame `index` appears, in recording seconds."""
    return start + index / fps


def frame_centre(index: int, fps: float, start: float = 0.0) -> float:
    """The middle of frame `index`'s display interval, in recording seconds."""
    return start + (index + 0.5) / fps


def centred_window_start(centre: float, window: float, duration: float) -> float:
    """Start of the `window`-second window centred on `centre`, clamped into the recording."""
    return min(max(centre - window / 2.0, 0.0), max(duration - window, 0.0))


@dataclass(eq=False)
class AudioTimeline:
    """What flows on an AUDIOTOKEN_TIMELINE socket: one audio vector per video frame.

    `embedding` has one row per frame (batch = frame_count); `weights` [frame_count] multiplies the
    audio word's prompt weight per frame (1 = plain; the onset option raises it on onsets); `onsets`,
    `beats` and `window_starts` are recording times, kept for the frontend and for output nodes. `beats`
    and `tempo_bpm` are tracked only for the "from each beat" mode (else empty and 0).
    """

    embedding: AudioEmbedding
    fps: float
    start_seconds: float
    window_seconds: float
    duration_seconds: float  # of the whole recording
    weights: torch.Tensor = None
    onsets: list[float] = field(default_factory=list)
    window_starts: list[float] = field(default_factory=list)
    beats: list[float] = field(default_factory=list)
    tempo_bpm: float = 0.0

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = torch.ones(self.frame_count)

    @property
    def frame_count(self) -> int:
        return self.embedding.batch_size

    @property
    def end_seconds(self) -> float:
        """Where the last frame ends: the audio track of the video is [start_seconds, end_seconds)."""
        return self.start_seconds + self.frame_count / self.fps

    def frame_times(self) -> list[float]:
        return [frame_time(i, self.fps, self.start_seconds) for i in range(self.frame_count)]


# --------------------------------------------------------------------------- building a timeline

WINDOW_MODES = ("centred on each frame", "every hop", "from each onset", "from each beat")
INTERPOLATIONS = ("linear", "slerp")
EMBED_BATCH = 8  # windows embedded per embed_fn call: bounds activation memory
READ_SECONDS = 30.0  # nearby windows are cut from one read of at most this much audio (prepare_waveform allows 60)
_PARALLEL_COSINE = 1.0 - 1e-7  # |cos| above this: slerp's direction is undefined / unstable, use linear

EmbedFn = Callable[[torch.Tensor], "dict[str, torch.Tensor]"]


class TimelineError(ValueError):
    """A timeline that cannot be built as asked; the message names the problem and the fix."""


def interpolate(v0: torch.Tensor, v1: torch.Tensor, u, mode: str = "linear") -> torch.Tensor:
    """Row-wise blend of [N, D] rows `v0` -> `v1` at `u` (a number or [N]) in [0, 1].

    "linear": v0 + u (v1 - v0). "slerp": the direction turns along the great circle between the
    rows' directions and the length moves linearly between their lengths (so unit rows stay unit
    rows); rows that are (anti)parallel or zero fall back to linear. u = 0 gives v0 and u = 1 gives
    v1 exactly, in both modes.
    """
    if mode not in INTERPOLATIONS:
        raise TimelineError(f"unknown interpolation {mode!r}; choose one of {', '.join(INTERPOLATIONS)}")
    u = torch.as_tensor(u, dtype=v0.dtype, device=v0.device).reshape(-1, 1).expand(v0.shape[0], 1)
    linear = v0 + u * (v1 - v0)
    if mode == "slerp":
        n0, n1 = v0.norm(dim=1, keepdim=True), v1.norm(dim=1, keepdim=True)
        d0, d1 = v0 / n0.clamp_min(1e-30), v1 / n1.clamp_min(1e-30)
        cosine = (d0 * d1).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
        theta = torch.acos(cosine)
        sin_theta = torch.sin(theta).clamp_min(1e-30)
        direction = (torch.sin((1.0 - u) * theta) * d0 + torch.sin(u * theta) * d1) / sin_theta
        turned = direction * (n0 + u * (n1 - n0))
        usable = (cosine.abs() < _PARALLEL_COSINE) & (n0 > 0) & (n1 > 0)
        linear = torch.where(usable, turned, linear)
    # The ends exactly (slerp's sin/norm round trip is a few ulp off).
    return torch.where(u == 0, v0, torch.where(u == 1, v1, linear))


def smooth_frames(x: torch.Tensor, sigma_frames: float) -> torch.Tensor:
    """Gaussian smoothing of [F, D] along frames (sigma in frames, radius ceil(3 sigma)).

    The kernel is truncated at the first and last frame and renormalised by the mass left
    inside, so a constant sequence stays constant up to its ends. sigma 0 returns x.
    """
    if sigma_frames <= 0 or x.shape[0] < 2:
        return x
    radius = math.ceil(3.0 * sigma_frames)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_frames) ** 2)[None, None]
    rows = x.double().T[:, None, :]  # [D, 1, F]: each column a signal along frames
    summed = torch.nn.functional.conv1d(torch.nn.functional.pad(rows, (radius, radius)), kernel)
    mass = torch.nn.functional.conv1d(torch.nn.functional.pad(torch.ones_like(rows[:1]), (radius, radius)), kernel)
    return (summed / mass)[:, 0, :].T.to(x.dtype)


@dataclass
class _Plan:
    """Which windows a timeline embeds and how frames read them."""

    starts: list[float]  # window starts to embed, ascending, unique
    first: torch.Tensor  # [F] row of each frame's (first) window
    second: torch.Tensor  # [F] row of the window it moves towards (hop mode; else = first)
    amount: torch.Tensor  # [F] how far (0..1) towards `second`


def _plan_centred(count: int, fps: float, start: float, window: float, duration: float) -> _Plan:
    per_frame = [centred_window_start(frame_centre(i, fps, start), window, duration) for i in range(count)]
    starts = sorted(set(per_frame))
    row = {s: r for r, s in enumerate(starts)}
    first = torch.tensor([row[s] for s in per_frame])
    return _Plan(starts, first, first, torch.zeros(count, dtype=torch.float64))


def _plan_hop(count: int, fps: float, start: float, window: float, hop: float, duration: float) -> _Plan:
    windows = window_count(duration, window, hop)
    centre = [k * hop + window / 2.0 for k in range(windows)]
    left, right, amount = [], [], []
    for i in range(count):
        t = frame_centre(i, fps, start)
        if t <= centre[0]:
            pair = (0, 0, 0.0)
        elif t >= centre[-1]:
            pair = (windows - 1, windows - 1, 0.0)
        else:
            k = min(max(math.floor((t - centre[0]) / hop), 0), windows - 2)
            while k + 1 < windows - 1 and centre[k + 1] <= t:  # float rounding of the division
                k += 1
            while k > 0 and centre[k] > t:
                k -= 1
            pair = (k, k + 1, (t - centre[k]) / hop)
        left.append(pair[0])
        right.append(pair[1])
        amount.append(min(max(pair[2], 0.0), 1.0))
    needed = sorted(set(left) | set(right))
    row = {k: r for r, k in enumerate(needed)}
    return _Plan([k * hop for k in needed], torch.tensor([row[k] for k in left]),
                 torch.tensor([row[k] for k in right]), torch.tensor(amount, dtype=torch.float64))


def onset_frame(onset: float, fps: float, start: float) -> int:
    """The frame on screen when `onset` sounds: the first frame of the segment it begins."""
    return math.floor((onset - start) * fps + FRAME_EPSILON)


def _plan_onsets(count: int, fps: float, start: float, window: float, duration: float,
                 onsets: list[float]) -> _Plan:
    """Segments from the span start and each of `onsets` (onsets or beats): a window from each, held."""
    boundaries = [start] + [o for o in onsets if onset_frame(o, fps, start) < count]
    first_frames = [0] + [onset_frame(o, fps, start) for o in boundaries[1:]]
    segment_of_frame = []
    j = 0
    for i in range(count):
        while j + 1 < len(boundaries) and first_frames[j + 1] <= i:
            j += 1
        segment_of_frame.append(j)
    used = sorted(set(segment_of_frame))
    per_segment = {j: min(max(boundaries[j], 0.0), max(duration - window, 0.0)) for j in used}
    starts = sorted(set(per_segment.values()))
    row = {s: r for r, s in enumerate(starts)}
    first = torch.tensor([row[per_segment[j]] for j in segment_of_frame])
    return _Plan(starts, first, first, torch.zeros(count, dtype=torch.float64))


def _windows16(x: torch.Tensor, sample_rate: int, starts: list[float], window: float, channel_policy: str):
    """Yield the 16 kHz mono window at each of `starts` (ascending), as prepare_waveform cuts it.

    Nearby windows (within READ_SECONDS) are cut from one read of the span they cover: windows of
    neighbouring frames overlap almost entirely, and resampling that span once is far cheaper than
    resampling each window. The rows equal per-window prepare_waveform (same 16 kHz grid).
    """
    size = max(1, round(window * TARGET_SAMPLE_RATE))
    limit = round(READ_SECONDS * TARGET_SAMPLE_RATE)
    i = 0
    while i < len(starts):
        first = round(starts[i] * TARGET_SAMPLE_RATE)
        j = i + 1
        while j < len(starts) and round(starts[j] * TARGET_SAMPLE_RATE) - first + size <= limit:
            j += 1
        span = round(starts[j - 1] * TARGET_SAMPLE_RATE) - first + size
        wave16 = prepare_waveform(x, sample_rate, channel_policy=channel_policy, start_seconds=starts[i],
                                  window_seconds=span / TARGET_SAMPLE_RATE, loop=True)[0]
        for s in starts[i:j]:
            offset = round(s * TARGET_SAMPLE_RATE) - first
            yield wave16[offset:offset + size]
        i = j


def _embed_windows(x: torch.Tensor, sample_rate: int, embed_fn: EmbedFn, starts: list[float], window: float,
                   channel_policy: str, batch: int) -> dict[str, torch.Tensor]:
    """Embed the windows at `starts`, `batch` at a time: only those windows are ever cut and resampled."""
    parts: dict[str, list[torch.Tensor]] = {}
    windows = _windows16(x, sample_rate, starts, window, channel_policy)
    for a in range(0, len(starts), batch):
        count = min(batch, len(starts) - a)
        out = embed_fn(torch.stack([next(windows) for _ in range(count)]))
        if not isinstance(out, dict) or not out or any(
                not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[0] != count for v in out.values()):
            shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                      for k, v in out.items()} if isinstance(out, dict) else type(out).__name__
            raise TimelineError(f"embed_fn must return {{key: [N, D] tensor}} with N = {count} windows, got "
                                f"{shapes}; return one row per window of the batch")
        for key, value in out.items():
            parts.setdefault(key, []).append(value.detach().to("cpu", torch.float32))
    return {key: torch.cat(values) for key, values in parts.items()}


def frame_strength(envelope: torch.Tensor, rate: float, env_first: int, count: int, fps: float,
                   start: float) -> torch.Tensor:
    """s_i: the envelope's max over frame i's interval [frame_time(i), frame_time(i + 1)), normalised so
    the max over the frames' span is 1 (all 0 when the span has no onset-strength: silence, steady sound).

    Envelope row r is sample n = env_first + r, at n / rate seconds. A frame shorter than the
    envelope's step that holds no sample takes the sample whose step it starts in.
    """
    def index(t: float) -> int:  # the first sample at or after t, as a row
        return math.ceil(t * rate - FRAME_EPSILON) - env_first

    rows = envelope.numel()
    bounds = [min(max(index(frame_time(i, fps, start)), 0), rows) for i in range(count + 1)]
    span = envelope[bounds[0]:max(bounds[-1], bounds[0] + 1)]
    top = float(span.max()) if span.numel() else 0.0
    if top < onsets_mod.MIN_FLUX_DB:
        return torch.zeros(count)
    strength = torch.zeros(count)
    for i in range(count):
        lo, hi = bounds[i], bounds[i + 1]
        if hi <= lo:  # no sample inside: the one whose step holds the frame's start
            lo = min(max(math.floor(frame_time(i, fps, start) * rate + FRAME_EPSILON) - env_first, 0), rows - 1)
            hi = lo + 1
        strength[i] = envelope[lo:hi].max() / top
    return strength


def _number(value, name: str, low: float, high: float, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TimelineError(f"{name} must be a finite number, got {value!r}; {fix}")
    if not low <= value <= high:
        raise TimelineError(f"{name}={value:g} is out of range; {fix}")
    return float(value)


def build_timeline(waveform, sample_rate: int, embed_fn: EmbedFn, *, fps: float = 12.0,
                   window_seconds: float = 4.0, windows: str = WINDOW_MODES[0], hop_seconds: float = 1.0,
                   interpolation: str = "linear", smoothing_seconds: float = 0.0, onset_weight: float = 0.0,
                   start_seconds: float = 0.0, length_seconds: float = 0.0, channel_policy: str = "mix",
                   max_frames: int = 2400, min_gap_seconds: float = 0.1, onset_threshold: float = 0.1,
                   embed_batch: int = EMBED_BATCH, source: str = "") -> AudioTimeline:
    """One audio vector per video frame of [start, start + length) of a recording (see the module docstring).

    `waveform` is one recording, [channels, samples] or [1, channels, samples]; `embed_fn` turns
    [N, T16] 16 kHz mono windows into {key: [N, D]} (called with at most `embed_batch` windows).
    `windows`: "centred on each frame" (a window per frame), "every hop" (windows every `hop_seconds`
    from 0, frames between two window centres blend them by `interpolation`), "from each onset" (a
    window from each detected onset, held until the next), "from each beat" (the same from each beat that
    `onsets.detect_beats` tracks in the span: changes on the beat, not on every attack; a span too short or
    too quiet for a beat holds one window from its start). `smoothing_seconds` > 0 blurs the vectors
    along time; `onset_weight` > 0 raises each frame's prompt weight to 1 + onset_weight * strength.
    Only the windows the frames need are read and embedded: memory follows the frames, not the file.
    """
    x = _as_batch(waveform)
    if x.shape[0] != 1:
        raise TimelineError(f"a timeline takes one recording, got a batch of {x.shape[0]}; pass one clip "
                            "(e.g. split the batch and build one timeline per clip)")
    _check_sample_rate(sample_rate)
    rate = int(sample_rate)
    duration = x.shape[-1] / rate
    fps = _number(fps, "fps", 1e-3, 1000.0, "use a frame rate such as 12 or 24")
    window = _number(window_seconds, "window_seconds", 1e-3, MAX_WINDOW_SECONDS,
                     f"use a window in (0, {MAX_WINDOW_SECONDS:g}] seconds, e.g. 4")
    if windows not in WINDOW_MODES:
        raise TimelineError(f"unknown windows mode {windows!r}; choose one of: {', '.join(WINDOW_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise TimelineError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    if channel_policy not in CHANNEL_POLICIES:
        raise TimelineError(f"unknown channel_policy {channel_policy!r}; choose one of {', '.join(CHANNEL_POLICIES)}")
    hop = _number(hop_seconds, "hop_seconds", 1e-3, 86400.0, "use a hop > 0 seconds, e.g. 1")
    smoothing = _number(smoothing_seconds, "smoothing_seconds", 0.0, 3600.0, "use 0 (off) or a few tenths of a second")
    weight = _number(onset_weight, "onset_weight", 0.0, 100.0, "use 0 (off) to 4")
    start = _number(start_seconds, "start_seconds", 0.0, math.inf, "use a start >= 0 seconds")
    length = _number(length_seconds, "length_seconds", 0.0, math.inf, "use 0 (to the end) or a length > 0")
    if start >= duration:
        raise TimelineError(f"start_seconds={start:g} is at or past the end of the {duration:.3f} s recording; "
                            f"use a start below {duration:.3f}")
    if length > 0 and start + length > duration + 0.5 / rate:
        raise TimelineError(f"start_seconds + length_seconds = {start + length:g} s runs past the end of the "
                            f"{duration:.3f} s recording; use length_seconds <= {duration - start:.3f} or 0 (to the end)")
    if isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1:
        raise TimelineError(f"max_frames must be a whole number >= 1, got {max_frames!r}; e.g. 2400")
    onsets_mod.check_onset_options(min_gap_seconds, onset_threshold)
    if isinstance(embed_batch, bool) or not isinstance(embed_batch, numbers.Integral) or embed_batch < 1:
        raise TimelineError(f"embed_batch must be a whole number >= 1, got {embed_batch!r}; e.g. {EMBED_BATCH}")

    count = frame_count(duration, fps, start, length)
    if count > max_frames:
        span = (duration - start) if length <= 0 else length
        raise TimelineError(
            f"{span:.2f} s at {fps:g} fps is {count} frames, more than max_frames={max_frames}; raise max_frames, "
            f"lower fps, or set length_seconds <= {max_frames / fps:.2f} to take a shorter part")
    end = start + count / fps

    # The onsets of the frames' span (recording time), for onset windows, weights and the frontend.
    onset_times, envelope, env_rate, env_first = onsets_mod.span_onsets(
        x, rate, start, end, min_gap_seconds=min_gap_seconds, threshold=onset_threshold)

    tempo, beat_times = 0.0, []
    if windows == WINDOW_MODES[3]:  # the beats of the frames' span
        tempo, tracked = onsets_mod.detect_beats(x, rate, start_seconds=start, length_seconds=end - start)
        beat_times = [b for b in tracked if start <= b < end]

    if windows == WINDOW_MODES[0]:
        plan = _plan_centred(count, fps, start, window, duration)
    elif windows == WINDOW_MODES[1]:
        plan = _plan_hop(count, fps, start, window, hop, duration)
    else:
        plan = _plan_onsets(count, fps, start, window, duration,
                            beat_times if windows == WINDOW_MODES[3] else onset_times)

    rows = _embed_windows(x, rate, embed_fn, plan.starts, window, channel_policy, int(embed_batch))
    vectors = {}
    for key, table in rows.items():
        per_frame = interpolate(table[plan.first].double(), table[plan.second].double(), plan.amount, interpolation)
        vectors[key] = smooth_frames(per_frame, smoothing * fps).float()

    weights = torch.ones(count)
    if weight > 0:
        weights = 1.0 + weight * frame_strength(envelope, env_rate, env_first, count, fps, start)
    label = source or "audio"
    description = f"{label} timeline {count} frames @ {fps:g} fps from {start:g}s, {windows} {window:g}s"
    return AudioTimeline(embedding=AudioEmbedding(vectors=vectors, source=description), fps=fps, start_seconds=start,
                         window_seconds=window, duration_seconds=duration, weights=weights, onsets=onset_times,
                         window_starts=list(plan.starts), beats=beat_times, tempo_bpm=tempo)
