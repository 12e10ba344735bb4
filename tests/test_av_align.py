"""AV-Align (audiotoken_core/evaluation/av_align.py) on constructed cases with known answers.

A click track (a 3 ms noise burst every 0.5 s, at 0.25, 0.75, ..., 3.75 s) and 48 frames at 12 fps of
a smooth random texture: the clicks sound at frames 3, 9, ..., 45. Frames that flash (or whose
texture jumps) on exactly those frames score 1; the same flashes half a click period (3 frames)
later score 0.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from audiotoken_core.evaluation.av_align import (
    AVAlignError,
    av_align,
    frame_motion,
    match_peaks,
    optical_flow,
    peak_iou,
    video_peak_frames,
)

FPS = 12.0
FRAMES = 48                                  # 4 s
CLICK_FRAMES = [3 + 6 * k for k in range(8)]  # every 0.5 s from 0.25 s
CLICK_TIMES = [i / FPS for i in CLICK_FRAMES]


def texture(size: int = 64, seed: int = 0, sigma: float = 2.0) -> torch.Tensor:
    """[size, size] smooth periodic random texture in 0.2..0.8 (blurred noise: gradients everywhere)."""
    noise = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed))
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(noise, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1))[0, 0]
    return 0.2 + 0.6 * (x - x.min()) / (x.max() - x.min())


def rgb(gray: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(gray)[..., None].repeat(1, 1, 1, 3)


def flash_frames(on: list[int], n: int = FRAMES, size: int = 64) -> torch.Tensor:
    """A flash fading over two frames (strength 1, 1/4, 0 towards white) starting at each frame in `on`."""
    base = texture(size)
    strength = [0.0] * n
    for i in on:
        for j, s in ((i, 0.4), (i + 1, 0.1)):
            if j < n:
                strength[j] = s
    return rgb([base + s * (1 - base) for s in strength])


def jump_frames(on: list[int], n: int = FRAMES, size: int = 64) -> torch.Tensor:
    """The texture moves 3 pixels right at each frame in `on` and stays still otherwise."""
    base, shift, frames = texture(size), 0, []
    for i in range(n):
        shift += 3 * (i in on)
        frames.append(torch.roll(base, shifts=shift, dims=1))
    return rgb(frames)


def click_track(times: list[float], seconds: float, rate: int = 16000, channels: int = 1) -> torch.Tensor:
    """[channels, samples]: a 3 ms noise burst at each time, silence elsewhere."""
    wave = torch.zeros(channels, round(seconds * rate))
    g = torch.Generator().manual_seed(1)
    for t in times:
        i, n = round(t * rate), round(0.003 * rate)
        wave[:, i:i + n] = (torch.rand(n, generator=g) * 2 - 1) * 0.8
    return wave


# --------------------------------------------------------------------------- optical flow and video peaks


def test_optical_flow_recovers_known_translations():
    base = texture(64)
    for dx, dy in ((2, 1), (-3, 2), (1, 0)):
        moved = torch.roll(base, shifts=(dy, dx), dims=(0, 1))
        flow = optical_flow(base[None, None], moved[None, None])[0, :, 8:-8, 8:-8]  # away from the border
        assert flow.shape == (2, 48, 48)
        # roll moves the content by +shift: what is at x in the first frame is at x + shift in the second
        assert flow[0].median().item() == pytest.approx(dx, abs=0.1), (dx, dy)
        assert flow[1].median().item() == pytest.approx(dy, abs=0.1), (dx, dy)


def test_frame_motion_is_in_original_pixels_and_repeats_the_first_value():
    big = texture(256, sigma=4.0)
    frames = rgb([big, torch.roll(big, shifts=4, dims=1), torch.roll(big, shifts=4, dims=1)])
    motion = frame_motion(frames)  # analysed at 128 px: 2 px there, 4 px in the frames
    assert motion.shape == (3,)
    assert motion[1].item() == pytest.approx(4.0, rel=0.15) and motion[0] == motion[1] and motion[2] == 0


def test_identical_frames_have_zero_motion_and_no_peaks():
    still = rgb([texture(64)] * 10)
    motion = frame_motion(still)
    assert torch.equal(motion, torch.zeros(10)) and video_peak_frames(motion) == []


@pytest.mark.parametrize("make", [flash_frames, jump_frames], ids=["flash", "jump"])
def test_video_peaks_are_the_flash_and_jump_frames(make):
    motion = frame_motion(make(CLICK_FRAMES))
    assert video_peak_frames(motion) == CLICK_FRAMES
    quiet = [i for i in range(FRAMES) if all(i - c not in (0, 1, 2) for c in CLICK_FRAMES)]
    assert motion[quiet].abs().max() == 0 and motion[CLICK_FRAMES].min() > 1.0


def test_video_peak_frames_rules():
    assert video_peak_frames([0, 1, 0]) == [1]
    assert video_peak_frames([0, 1, 0, 2, 1]) == [1, 3]
    assert video_peak_frames([0, 2, 2, 1]) == [1]          # a plateau counts once, at its first frame
    assert video_peak_frames([0, 2, 2, 3, 1]) == [3]       # ... and only if it is a maximum
    assert video_peak_frames([0, 1, 1]) == []              # the last frame is never a peak
    assert video_peak_frames([3, 3, 1, 0]) == []           # nor the first (motion[0] repeats motion[1])
    assert video_peak_frames([]) == [] and video_peak_frames([5.0]) == []
    assert video_peak_frames(torch.tensor([0.0, 0.5, 0.25, 0.25])) == [1]


# --------------------------------------------------------------------------- IoU


def test_peak_iou_on_hand_made_peaks():
    assert peak_iou([0.5, 1.0, 1.5], [0.52, 1.2, 2.0], 10) == pytest.approx(1 / 5)  # one match / (3 + 3 - 1)
    assert peak_iou([0.5], [0.59], 10) == 1.0
    assert peak_iou([0.5], [0.6], 10) == 0.0                  # exactly one frame apart: not a match
    assert peak_iou([4 / 12], [3 / 12], 12) == 0.0
    assert peak_iou([1.0, 1.05], [1.0], 10) == pytest.approx(1 / 2)  # one video peak matches one audio peak
    assert peak_iou([1.0, 1.08], [0.95, 1.04], 10) == 1.0    # the matching is maximal, not first-come
    assert peak_iou([], [0.5], 12) == 0.0 and peak_iou([0.5, 1.0], [], 12) == 0.0
    assert peak_iou([0.25, 0.75], [0.75, 0.25], 12) == 1.0    # order does not matter
    with pytest.raises(AVAlignError, match=r"undefined.*0 / 0"):
        peak_iou([], [], 12)


def _maximum_matching(audio, video, fps) -> int:
    """Kuhn's augmenting paths on the 'less than one frame apart' graph (independent of match_peaks)."""
    near = [[j for j, v in enumerate(video) if abs(a - v) < 1 / fps - 1e-9] for a in audio]
    owner: dict[int, int] = {}

    def augment(i, seen):
        for j in near[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(audio)))


def test_match_peaks_is_a_maximum_matching():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        audio = (torch.rand(int(torch.randint(0, 8, (1,), generator=g)), generator=g) * 2).tolist()
        video = (torch.randint(0, 24, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g) / 12).tolist()
        assert match_peaks(audio, video, 12) == _maximum_matching(audio, video, 12), (audio, video)


# --------------------------------------------------------------------------- the metric on a click track


@pytest.mark.parametrize("make", [flash_frames, jump_frames], ids=["flash", "jump"])
def test_frames_on_the_clicks_score_one_and_shifted_frames_zero(make):
    audio = click_track(CLICK_TIMES, 4.0)
    aligned = av_align(make(CLICK_FRAMES), FPS, audio, 16000)
    assert aligned.score >= 0.9 and aligned.score == 1.0
    assert aligned.matches == 8 and aligned.video_peaks == pytest.approx(CLICK_TIMES)
    assert aligned.audio_peaks == pytest.approx(CLICK_TIMES, abs=0.01)
    shifted = av_align(make([i + 3 for i in CLICK_FRAMES]), FPS, audio, 16000)  # half a click period later
    assert shifted.score <= 0.1 and shifted.matches == 0
    assert len(shifted.video_peaks) == 7  # the last shifted flash would be frame 48: past the end
    assert f"{aligned.matches} matches" in aligned.summary() and "8 video peaks" in aligned.summary()


def test_audio_after_the_frames_is_ignored_and_any_rate_and_channels_work():
    # stereo 44.1 kHz, 5 s long, clicks continuing after the frames' 4 s: only the first 8 count
    audio = click_track(CLICK_TIMES + [4.25, 4.75], 5.0, rate=44100, channels=2)
    result = av_align(flash_frames(CLICK_FRAMES), FPS, audio[None], 44100)
    assert result.score == 1.0 and len(result.audio_peaks) == 8 and result.frame_count == FRAMES
    half = av_align(flash_frames(CLICK_FRAMES[::2]), FPS, audio, 44100)  # flashes on every other click
    assert half.score == pytest.approx(4 / 8) and half.matches == 4


def test_still_frames_and_silence_are_undefined():
    still = rgb([texture(32)] * 6)
    with pytest.raises(AVAlignError, match="no onsets and the frames have no motion peaks"):
        av_align(still, FPS, torch.zeros(1, 8000), 16000)
    result = av_align(still, FPS, click_track([0.25], 0.5), 16000)  # a sound without motion scores 0
    assert result.score == 0.0 and result.video_peaks == [] and result.audio_peaks == pytest.approx([0.25], abs=0.01)


def test_input_errors_name_the_problem():
    frames = flash_frames(CLICK_FRAMES)
    audio = click_track(CLICK_TIMES, 4.0)
    cases = [
        (lambda: av_align(frames[:2], FPS, audio, 16000), "at least 3 frames"),
        (lambda: av_align(frames, 0.0, audio, 16000), "fps must be a positive"),
        (lambda: av_align(frames, -12, audio, 16000), "fps must be a positive"),
        (lambda: av_align(frames, math.nan, audio, 16000), "fps must be a positive"),
        (lambda: av_align(frames, True, audio, 16000), "fps must be a positive"),
        (lambda: av_align(frames, FPS, audio[:, :16000 * 3], 16000), r"audio lasts 3\.000 s but the 48 frames"),
        (lambda: av_align(frames, FPS, audio, 0), "sample_rate must be a positive"),
        (lambda: av_align(frames, FPS, audio, 16000.0), "sample_rate must be a positive"),
        (lambda: av_align(frames, FPS, audio.expand(2, 1, -1), 16000), "holds 2 recordings"),
        (lambda: av_align(frames, FPS, audio.numpy(), 16000), "waveform tensor"),
        (lambda: av_align(frames[..., 0], FPS, audio, 16000), r"frames must be a tensor \[N, H, W, 3\]"),
        (lambda: av_align((frames * 255).to(torch.uint8), FPS, audio, 16000), "finite float"),
        (lambda: av_align(frames[:, :3, :3], FPS, audio, 16000), "too small for optical flow"),
    ]
    for call, message in cases:
        with pytest.raises(AVAlignError, match=message):
            call()
