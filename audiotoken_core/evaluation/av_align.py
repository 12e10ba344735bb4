"""AV-Align: how well a video's motion follows its sound (TempoTokens' metric), in plain torch.

The metric (Yariv et al., "Diverse and Aligned Audio-to-Video Generation via Text-to-Video Model
Adaptation", the `av_align.py` of guyyariv/TempoTokens):

- audio peaks: the onsets of the audio track (seconds);
- video peaks: local maxima of the per-frame motion, motion[i] = mean optical-flow magnitude from
  frame i-1 to frame i (motion[0] repeats motion[1]); peak i is at i / fps. The first and the last
  frame are never peaks;
- a match: an audio peak less than one frame period (1 / fps) from a video peak;
- score = IoU = matches / (|audio peaks| + |video peaks| - matches), in [0, 1].

Where we differ from the reference code, and why:
- optical flow: our own pyramidal dense Lucas-Kanade in torch on grayscale frames (BT.601 luma)
  downscaled to at most 128 px, instead of OpenCV's Farneback on full frames, so the pack needs no
  OpenCV. The score depends only on WHERE the motion curve has its local maxima: clear events
  (cuts, flashes, jumps) peak on the same frames with either flow, but on subtle motion the two
  can pick different maxima, so compare our scores with our scores, not with the reference
  script's numbers. Magnitudes differ too (ours are in pixels of the original frames).
- audio peaks: `audiotoken_core.onsets.detect_onsets` (spectral flux on our log-mel) over the
  frames' span [0, frames / fps) of the track, instead of librosa's onset detector over the whole
  file.
- matching is one-to-one (each video peak matches at most one audio peak), so the score stays a
  true IoU in [0, 1]; the reference counts every audio peak near any video peak, which exceeds 1
  when two onsets share a video peak. Elsewhere the two counts agree.
- plateaus: a run of equal motion values above both neighbours is one peak, at its first frame
  (the reference's strict test finds none there; a perfectly symmetric one-frame flash makes such
  a run).
- a distance of exactly one frame period (up to 1e-9 s of float rounding) is not a match, as in
  the reference's strict inequality.
- no peaks on either side makes the IoU 0 / 0: an error here, a division by zero in the reference.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_FLOW_SIDE", "AVAlignError", "AVAlignResult", "av_align", "frame_motion", "match_peaks", "optical_flow",
           "peak_iou", "video_peak_frames"]

MAX_FLOW_SIDE = 128          # frames are downscaled so their longer side is at most this (pixels)
LUMA = (0.299, 0.587, 0.114)  # BT.601, as OpenCV's RGB -> gray
MATCH_TOLERANCE = 1e-9       # seconds: "exactly one frame apart" survives float rounding as a non-match
PAIRS_PER_CHUNK = 32         # frame pairs per flow batch (memory stays flat in the frame count)


class AVAlignError(ValueError):
    """Input the AV-Align metric cannot score; the message says what is wrong and how to fix it."""


@dataclass
class AVAlignResult:
    """The score and what it was computed from (times in seconds from the first frame)."""

    score: float
    audio_peaks: list[float]
    video_peaks: list[float]
    motion: Tensor                 # [N] mean flow magnitude arriving at each frame (original pixels)
    matches: int = 0
    fps: float = 0.0
    frame_count: int = 0

    def summary(self) -> str:
        """A few lines for people: the score, the peak counts and times, the matches."""
        def times(values: list[float]) -> str:
            shown = ", ".join(f"{t:.2f}" for t in values[:24])
            return shown + (f", ... ({len(values) - 24} more)" if len(values) > 24 else "")

        return (f"AV-Align {self.score:.3f} = {self.matches} matches / ({len(self.audio_peaks)} audio peaks + "
                f"{len(self.video_peaks)} video peaks - {self.matches})\n"
                f"{self.frame_count} frames at {self.fps:g} fps ({self.frame_count / self.fps:.2f} s); "
                f"a match is an audio peak within one frame ({1000 / self.fps:.0f} ms) of a video peak\n"
                f"audio peaks (onsets, s): {times(self.audio_peaks)}\n"
                f"video peaks (motion maxima, s): {times(self.video_peaks)}")


# --------------------------------------------------------------------------- optical flow


def _box(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^2 window, shrunk at the borders (no zero padding)."""
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def _gradients(image: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences of [B, 1, H, W] (replicated border), in intensity per pixel."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * 0.5
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * 0.5
    return gx, gy


def _warp(image: Tensor, flow: Tensor) -> Tensor:
    """image [B, 1, H, W] sampled at (x + u, y + v), bilinear, clamped to the border.

    Our own sampler (not grid_sample): a zero flow returns the image bit for bit, so identical
    frames have exactly zero motion.
    """
    b, _, h, w = image.shape
    ys = torch.arange(h, device=image.device, dtype=image.dtype).view(1, h, 1)
    xs = torch.arange(w, device=image.device, dtype=image.dtype).view(1, 1, w)
    x = (xs + flow[:, 0]).clamp(0, w - 1)
    y = (ys + flow[:, 1]).clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0).reshape(b, -1), (y - y0).reshape(b, -1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = image.reshape(b, -1)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.gather(1, (yy * w + xx).reshape(b, -1))

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy).view(b, 1, h, w)


def optical_flow(first: Tensor, second: Tensor, *, levels: int = 3, iterations: int = 3, radius: int = 2,
                 regularisation: float = 1e-4) -> Tensor:
    """Dense flow [B, 2, H, W] (dx, dy in pixels) that carries `first` [B, 1, H, W] onto `second`.

    Pyramidal Lucas-Kanade: on each level (halving, coarse to fine) `iterations` times: warp
    `second` by the current flow, solve the windowed 2x2 least-squares system per pixel for the
    increment (Tikhonov `regularisation` on the diagonal keeps flat regions at zero) and add it.
    Increments are clipped to 2 pixels (beyond that the linearisation is meaningless).
    """
    pyramid = [(first, second)]
    while len(pyramid) < levels and min(pyramid[-1][0].shape[-2:]) >= 16:
        a, b = pyramid[-1]
        pyramid.append((F.avg_pool2d(a, 2, ceil_mode=True), F.avg_pool2d(b, 2, ceil_mode=True)))
    flow = None
    for a, b in reversed(pyramid):
        h, w = a.shape[-2:]
        if flow is None:
            flow = a.new_zeros(a.shape[0], 2, h, w)
        else:
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], dtype=a.dtype, device=a.device)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale.view(1, 2, 1, 1)
        for _ in range(iterations):
            warped = _warp(b, flow)
            it = warped - a
            gx, gy = _gradients((a + warped) * 0.5)
            sxx = _box(gx * gx, radius) + regularisation
            syy = _box(gy * gy, radius) + regularisation
            sxy = _box(gx * gy, radius)
            sxt, syt = _box(gx * it, radius), _box(gy * it, radius)
            det = sxx * syy - sxy * sxy
            du = (sxy * syt - syy * sxt) / det
            dv = (sxy * sxt - sxx * syt) / det
            flow = flow + torch.cat([du, dv], 1).clamp(-2.0, 2.0)
    return flow


def _analysis_frames(frames: Tensor, max_side: int) -> tuple[Tensor, float]:
    """[N, H, W, 3] -> grayscale [N, 1, h, w] with max(h, w) <= max_side, and original px per analysis px."""
    luma = torch.tensor(LUMA, dtype=torch.float32, device=frames.device)
    gray = (frames.float() * luma).sum(-1)[:, None]
    h, w = gray.shape[-2:]
    factor = max(h, w) / max_side
    if factor <= 1:
        return gray, 1.0
    size = (max(1, round(h / factor)), max(1, round(w / factor)))
    return F.interpolate(gray, size=size, mode="area"), max(h / size[0], w / size[1])


def frame_motion(frames: Tensor, *, max_side: int = MAX_FLOW_SIDE, chunk: int = PAIRS_PER_CHUNK) -> Tensor:
    """Per-frame motion [N] of frames [N, H, W, 3]: motion[i] = mean flow magnitude from frame i-1 to i
    (in original pixels), motion[0] = motion[1] (as the reference, so the curve has one value per frame)."""
    _check_frames(frames)
    magnitudes = []
    with torch.no_grad():
        for start in range(0, frames.shape[0] - 1, chunk):
            stop = min(start + chunk + 1, frames.shape[0])
            gray, px = _analysis_frames(frames[start:stop], max_side)
            flow = optical_flow(gray[:-1], gray[1:])
            magnitudes.append(flow.square().sum(1).sqrt().mean((1, 2)) * px)
    motion = torch.cat(magnitudes).cpu()
    return torch.cat([motion[:1], motion])


# --------------------------------------------------------------------------- peaks and IoU


def video_peak_frames(motion: Tensor | list[float]) -> list[int]:
    """Frames where the motion curve has a local maximum: above both neighbours; a run of equal
    values above both neighbours counts once, at its first frame. The ends are never peaks."""
    values = [float(v) for v in (motion.tolist() if isinstance(motion, Tensor) else motion)]
    peaks, i, n = [], 1, len(values)
    while i < n - 1:
        if values[i] > values[i - 1]:
            j = i
            while j + 1 < n and values[j + 1] == values[i]:
                j += 1
            if j + 1 < n and values[j + 1] < values[i]:
                peaks.append(i)
            i = j + 1
        else:
            i += 1
    return peaks


def match_peaks(audio_peaks: list[float], video_peaks: list[float], fps: float) -> int:
    """The largest number of (audio, video) pairs less than one frame period apart, each peak used once.

    Greedy over both lists in time order: each audio peak takes the earliest free video peak that
    is not too early; with one window width for all, this is a maximum matching.
    """
    _check_fps(fps)
    window = 1.0 / fps - MATCH_TOLERANCE
    audio, video = sorted(audio_peaks), sorted(video_peaks)
    matches, j = 0, 0
    for a in audio:
        while j < len(video) and video[j] <= a - window:
            j += 1
        if j < len(video) and video[j] < a + window:
            matches += 1
            j += 1
    return matches


def peak_iou(audio_peaks: list[float], video_peaks: list[float], fps: float) -> float:
    """AV-Align's IoU: matches / (|audio peaks| + |video peaks| - matches)."""
    return _iou(match_peaks(audio_peaks, video_peaks, fps), len(audio_peaks), len(video_peaks))


def _iou(matches: int, audio_count: int, video_count: int) -> float:
    union = audio_count + video_count - matches
    if union == 0:
        raise AVAlignError("AV-Align is undefined here: the audio has no onsets and the frames have no motion peaks "
                           "(0 / 0). Score a clip with sound events or motion, or treat it as unscored.")
    return matches / union


# --------------------------------------------------------------------------- the metric


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise AVAlignError(f"fps must be a positive number of frames per second, got {fps!r}; "
                           "give the frame rate the frames are played at (e.g. 12).")
    return float(fps)


def _check_frames(frames) -> None:
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise AVAlignError(f"frames must be a tensor [N, H, W, 3] (a ComfyUI IMAGE batch), got {shape}; "
                           "pass the video's frames as one image batch.")
    if frames.shape[0] < 3:
        raise AVAlignError(f"AV-Align needs at least 3 frames (a motion peak lies between two neighbours), got "
                           f"{frames.shape[0]}; score a longer clip.")
    if min(frames.shape[1:3]) < 4:
        raise AVAlignError(f"frames of {frames.shape[2]} x {frames.shape[1]} pixels are too small for optical flow; "
                           "give frames at least 4 pixels on each side.")
    if not frames.is_floating_point() or not torch.isfinite(frames).all():
        raise AVAlignError("frames must be finite float values in 0..1 (ComfyUI IMAGE); convert them with "
                           "frames.float() / 255 if they are 8-bit.")


def _audio_seconds(waveform, sample_rate) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise AVAlignError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}; "
                           "pass the audio's rate, e.g. 44100.")
    if not isinstance(waveform, Tensor) or not 1 <= waveform.ndim <= 3:
        shape = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
        raise AVAlignError(f"the audio must be a waveform tensor [samples], [channels, samples] or [1, channels, "
                           f"samples], got {shape}; pass the track the frames show.")
    if waveform.ndim == 3 and waveform.shape[0] != 1:
        raise AVAlignError(f"the audio holds {waveform.shape[0]} recordings; AV-Align scores one video against one "
                           "track: pass one recording.")
    return waveform.shape[-1] / int(sample_rate)


def av_align(frames: Tensor, fps: float, waveform: Tensor, sample_rate: int, *, onset_options: dict | None = None,
             max_side: int = MAX_FLOW_SIDE) -> AVAlignResult:
    """AV-Align of frames [N, H, W, 3] (float 0..1) played at `fps` against the audio track that
    starts with frame 0 (`waveform` [C, T], [1, C, T] or [T] at `sample_rate`).

    Audio after the last frame's end (N / fps) is ignored; audio shorter than that is an error.
    `onset_options` go to `detect_onsets` (e.g. min_gap_seconds, threshold).
    """
    from ..onsets import detect_onsets

    fps = _check_fps(fps)
    _check_frames(frames)
    n = int(frames.shape[0])
    span = n / fps
    seconds = _audio_seconds(waveform, sample_rate)
    if seconds < span - 0.5 / sample_rate:
        raise AVAlignError(f"the audio lasts {seconds:.3f} s but the {n} frames at {fps:g} fps span {span:.3f} s; "
                           "give the track the frames show (e.g. the Timeline node's audio output), fewer frames, "
                           "or the right fps.")
    audio_peaks = [float(t) for t in detect_onsets(waveform, sample_rate, start_seconds=0.0, length_seconds=span,
                                                   **(onset_options or {}))]
    motion = frame_motion(frames, max_side=max_side)
    video_peaks = [i / fps for i in video_peak_frames(motion)]
    matches = match_peaks(audio_peaks, video_peaks, fps)
    return AVAlignResult(score=_iou(matches, len(audio_peaks), len(video_peaks)), audio_peaks=audio_peaks,
                         video_peaks=video_peaks, motion=motion, matches=matches, fps=fps, frame_count=n)
