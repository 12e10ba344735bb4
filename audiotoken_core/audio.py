"""Audio front end: validation, channel policy, window crop, looping and resampling.

Everything the encoders see goes through :func:`prepare_waveform`, the one place that checks
audio, which returns a 16 kHz mono window. Sample values are kept as they are (no clipping):
like the reference, values beyond [-1, 1] (the resampler's ringing overshoots on full-scale
recordings) reach the encoder unchanged. The window is cut in the source rate *before*
resampling, so a one-hour file costs about as much as a ten-second one.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

TARGET_SAMPLE_RATE = 16000
REFERENCE_CLIP_SECONDS = 10.0
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_WINDOW_SECONDS = 60.0

CHANNEL_POLICIES = ("mix", "first")

# Resampling filter: Hann-windowed sinc, cutoff at 0.99 of the lower Nyquist frequency,
# 6 zero crossings on each side (the usual speed/quality trade-off for audio models).
_ROLLOFF = 0.99
_ZERO_CROSSINGS = 6

# Integer PCM scale: the value that maps to 1.0 (signed types are symmetric around 0).
_PCM_SCALE = {torch.int16: 32768.0, torch.int32: 2.0**31, torch.int8: 128.0}


class AudioInputError(ValueError):
    """Audio that cannot be used as given; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=32)
def _polyphase_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Filter bank [new, 1, 2*width + orig] (float64, CPU) for gcd-reduced rates, and width.

    Row `i` holds the taps that produce output phase `i` of each block of `new` outputs
    from the `orig` inputs of that block plus `width` neighbours on each side.
    """
    cutoff = _ROLLOFF * min(orig, new) / 2.0  # cycles per (reduced) time unit
    half_span = _ZERO_CROSSINGS / (2.0 * cutoff)  # filter half length in time units
    width = math.ceil(half_span * orig)  # ... in input samples
    idx = torch.arange(-width, width + orig, dtype=torch.float64)
    phase = torch.arange(new, dtype=torch.float64)[:, None]
    t = idx[None, :] / orig - phase / new  # input time minus output time
    window = torch.where(
        t.abs() <= half_span, torch.cos(math.pi * t / (2.0 * half_span)) ** 2, torch.zeros_like(t)
    )
    # 2*cutoff/orig * sinc(2*cutoff*t): unit DC gain when sampled at the input rate.
    taps = (2.0 * cutoff / orig) * torch.sinc(2.0 * cutoff * t) * window
    return taps[:, None, :], width


def _reduced_rates(orig_sr: int, new_sr: int) -> tuple[int, int]:
    g = math.gcd(int(orig_sr), int(new_sr))
    return int(orig_sr) // g, int(new_sr) // g


def _polyphase(padded: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Run the filter bank over [N, L] input that already carries its `width` margins.

    Returns [N, blocks * new] with blocks = (L - kernel) // orig + 1.
    """
    kernel, _ = _polyphase_kernel(orig, new)
    kernel = kernel.to(device=padded.device, dtype=padded.dtype)
    out = F.conv1d(padded[:, None, :], kernel, stride=orig)  # [N, new, blocks]
    return out.transpose(1, 2).reshape(padded.shape[0], -1)


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of the last axis from `orig_sr` to `new_sr` Hz.

    Polyphase windowed sinc as one strided conv1d, so the cost is proportional to the
    input length. Output length is ceil(T * new_sr / orig_sr); float64 input stays float64,
    other float types are computed in float32 and returned in their own dtype. Callers pass
    float audio and whole positive rates (prepare_waveform checks user audio).
    """
    if int(orig_sr) == int(new_sr):
        return waveform
    orig, new = _reduced_rates(orig_sr, new_sr)
    lead, length = waveform.shape[:-1], waveform.shape[-1]
    out_len = -(-length * new // orig)  # ceil
    work_dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    flat = waveform.reshape(-1, length).to(work_dtype)
    if length == 0 or flat.shape[0] == 0:
        return waveform.new_zeros(*lead, out_len)
    _, width = _polyphase_kernel(orig, new)
    blocks = -(-out_len // new)
    right = (blocks - 1) * orig + 2 * width + orig - (length + width)
    padded = F.pad(flat, (width, max(right, 0)))
    out = _polyphase(padded, orig, new)[:, :out_len]
    return out.reshape(*lead, out_len).to(waveform.dtype)


# ------------------------------------------------------------------------ channels


def mix_channels(waveform: torch.Tensor, policy: str = "mix") -> torch.Tensor:
    """[B, C, T] float -> [B, T]: "mix" averages the channels, "first" keeps channel 0 (the reference)."""
    return waveform[:, 0] if policy == "first" else waveform.mean(dim=1)


# ------------------------------------------------------------------------ validation


def _check_sample_rate(sample_rate) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral):
        raise AudioInputError(
            f"sample_rate must be a whole number of Hz, got {sample_rate!r} "
            f"({type(sample_rate).__name__}); pass it as an int such as 44100"
        )
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"sample_rate={int(sample_rate)} Hz is outside the supported range {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} "
            "Hz; check the rate reported by your loader or convert the file to a common rate (e.g. 44100)"
        )


def _as_batch(waveform) -> torch.Tensor:
    if not isinstance(waveform, torch.Tensor):
        raise AudioInputError(
            f"audio must be a torch.Tensor, got {type(waveform).__name__}; "
            "convert it with torch.as_tensor(...)"
        )
    if waveform.ndim == 1:
        waveform = waveform[None, None]
    elif waveform.ndim == 2:
        waveform = waveform[None]
    elif waveform.ndim != 3:
        raise AudioInputError(
            f"audio must be shaped [batch, channels, samples], [channels, samples] or [samples], "
            f"got {tuple(waveform.shape)}; reshape it to one of these"
        )
    if 0 in waveform.shape:
        raise AudioInputError(
            f"the audio is empty (shape [batch, channels, samples] = {list(waveform.shape)}); "
            "pass a clip with at least one sample"
        )
    if not (waveform.is_floating_point() or waveform.dtype in _PCM_SCALE or waveform.dtype == torch.uint8):
        raise AudioInputError(
            f"unsupported audio dtype {waveform.dtype}; pass float audio in [-1, 1] "
            "or int16/int32 PCM"
        )
    return waveform


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """Float32 copy of a (small, already cropped) tensor, integer PCM scaled to [-1, 1]."""
    if x.is_floating_point():
        return x.to(torch.float32)
    if x.dtype == torch.uint8:  # 8-bit WAV is unsigned with 128 as silence
        return (x.to(torch.float32) - 128.0) / 128.0
    return x.to(torch.float32) / _PCM_SCALE[x.dtype]


def _check_seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise AudioInputError(f"{name} must be a finite number of seconds, got {value!r}; pass e.g. 0.0")
    return float(value)


def _source_segment(x: torch.Tensor, start: int, stop: int, wrap: bool) -> torch.Tensor:
    """Float32 samples [start, stop) of the last axis; outside the clip periodic if `wrap`, else 0.

    Slices (or gathers) before converting, so only the needed part is ever copied.
    """
    length = x.shape[-1]
    if wrap:
        idx = torch.arange(start, stop, device=x.device) % length
        return _to_unit_float(x.index_select(-1, idx))
    lo, hi = min(max(start, 0), length), max(min(stop, length), 0)
    part = _to_unit_float(x[..., lo:max(hi, lo)])
    return F.pad(part, (lo - start, stop - max(hi, lo)))


# ------------------------------------------------------------------------ windows


def window_count(duration_seconds: float, window_seconds: float, hop_seconds: float) -> int:
    """How many windows of `window_seconds` every `hop_seconds` (starting at 0) fit in a recording.

    At least one: a recording no longer than one window gives one (looped) window. The 1e-9 (in
    hops) lets a window that ends exactly at the end count despite float rounding. The frontend's
    `audiotokenWindowCount` (web/js/audiotoken_audio.js) is the same formula, in the same doubles;
    tests/data/window_table.json holds both to it.
    """
    if duration_seconds <= window_seconds:
        return 1
    return 1 + math.floor((duration_seconds - window_seconds) / hop_seconds + 1e-9)


# ------------------------------------------------------------------------ main entry


def prepare_waveform(
    waveform: torch.Tensor,
    sample_rate: int,
    *,
    channel_policy: str = "mix",
    start_seconds: float = 0.0,
    window_seconds: float = REFERENCE_CLIP_SECONDS,
    loop: bool = True,
) -> torch.Tensor:
    """The model-ready window: [B, round(window_seconds * 16000)] float32, 16 kHz mono, values kept.

    Semantics (the reference's, generalised to any rate): a clip that ends before
    start + window is tiled (`loop=True`, repeated without end, so the output is exactly
    periodic) or zero-padded at the end (`loop=False`); the result equals resampling the
    whole (tiled) clip to 16 kHz and then cutting [start, start + window]. Only the part used (plus a filter margin) is read,
    converted and checked, so cost does not grow with the file's length.
    """
    x = _as_batch(waveform)
    _check_sample_rate(sample_rate)
    if channel_policy not in CHANNEL_POLICIES:
        raise AudioInputError(
            f"unknown channel_policy {channel_policy!r}; choose one of {', '.join(CHANNEL_POLICIES)}"
        )
    start_s = _check_seconds(start_seconds, "start_seconds")
    window_s = _check_seconds(window_seconds, "window_seconds")
    if start_s < 0:
        raise AudioInputError(f"start_seconds={start_s} is negative; use a start >= 0")
    if not 0 < window_s <= MAX_WINDOW_SECONDS:
        raise AudioInputError(
            f"window_seconds={window_s} is out of range; use a window in (0, {MAX_WINDOW_SECONDS:g}] seconds"
        )

    sr, tgt = int(sample_rate), TARGET_SAMPLE_RATE
    length = x.shape[-1]
    n_out = max(1, round(window_s * tgt))
    first = round(start_s * tgt)  # first output sample, on the 16 kHz grid of the clip

    # Integer comparisons on a common time grid (units of 1 / (sr * tgt) s).
    # Like the reference, a looped clip counts as at least REFERENCE_CLIP_SECONDS long; a start
    # past that (or past the end of an unlooped clip) is a mistake, not something to wrap silently.
    usable = max(length * tgt, round(REFERENCE_CLIP_SECONDS * tgt) * sr) if loop else length * tgt
    if first * sr >= usable:
        duration = length / sr
        limit = usable / (sr * tgt)
        if loop and length * tgt < usable:
            hint = f"use a start below {limit:g} s (the clip loops to the reference {REFERENCE_CLIP_SECONDS:g} s)"
        else:
            hint = (f"use a start from 0 to {max(duration - window_s, 0.0):.3f} s so the "
                    f"{window_s:g} s window fits inside the clip")
        raise AudioInputError(
            f"start_seconds={start_s:g} is beyond the end of the {duration:.3f} s clip; {hint}"
        )
    wrap = bool(loop) and (first + n_out) * sr > length * tgt

    # Source samples needed, aligned to whole polyphase blocks plus the filter margin.
    if sr == tgt:
        orig = new = 1
        width = 0
    else:
        orig, new = _reduced_rates(sr, tgt)
        _, width = _polyphase_kernel(orig, new)
    block_a, block_b = first // new, -(-(first + n_out) // new)
    src_start, src_stop = block_a * orig - width, block_b * orig + width

    segment = _source_segment(x, src_start, src_stop, wrap)
    mono = mix_channels(segment, channel_policy)  # [B, S]

    if not torch.isfinite(mono).all():
        raise AudioInputError(
            "the audio contains NaN or infinite samples in the part used; "
            "re-export the file (or fix the node that produced it) so every sample is finite"
        )

    if sr != tgt:
        mono = _polyphase(mono, orig, new)  # [B, (block_b - block_a) * new]
    offset = first - block_a * new
    return mono[:, offset:offset + n_out].contiguous()
