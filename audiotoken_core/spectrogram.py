"""Spectrogram pictures of a sound (log-mel, coloured), like the paper's Figure 1.

    image = render_spectrogram(waveform, sample_rate, size=(256, 128))   # uint8 [128, 256, 3]

Built on our Kaldi filterbank (`fbank.kaldi_fbank`, the features BEATs hears): 128 mel bins,
25 ms frames every 10 ms, log power shown in dB over a fixed dynamic range below the loudest
bin, low frequencies at the bottom, time left to right, a perceptually ordered colour map
(magma, built in: no matplotlib needed).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .audio import TARGET_SAMPLE_RATE, AudioInputError, resample
from .fbank import kaldi_fbank

__all__ = ["COLOUR_MAPS", "log_mel_db", "colourise", "render_spectrogram"]

# Anchor colours (0..255) at evenly spaced positions; linear in between.
COLOUR_MAPS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "magma": ((0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122), (229, 80, 100),
              (251, 135, 97), (254, 194, 135), (252, 253, 191)),
    "viridis": ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                (92, 200, 99), (170, 220, 50), (253, 231, 37)),
    "gray": ((0, 0, 0), (255, 255, 255)),
}

_FRAME_SAMPLES = 400  # one 25 ms frame at 16 kHz: the shortest sound that has a spectrogram column


def _mono16(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Decoded float audio [samples] or [channels, samples] -> its mono mix at 16 kHz, at least one frame long."""
    wave = waveform.mean(0) if waveform.ndim == 2 else waveform
    if not torch.isfinite(wave).all():
        raise AudioInputError("the audio contains NaN or infinite samples; re-export the file so every sample is finite")
    wave = resample(wave.float(), int(sample_rate), TARGET_SAMPLE_RATE)
    if wave.shape[-1] < _FRAME_SAMPLES:
        wave = torch.nn.functional.pad(wave, (0, _FRAME_SAMPLES - wave.shape[-1]))
    return wave


def log_mel_db(waveform: torch.Tensor, sample_rate: int = TARGET_SAMPLE_RATE, n_mels: int = 128) -> torch.Tensor:
    """Log-mel power in dB, [n_mels, frames] (row 0 = lowest band), of mono [T] or [C, T] audio."""
    wave16 = _mono16(waveform, sample_rate)
    fbank = kaldi_fbank(wave16[None] * 2.0**15, sample_rate=TARGET_SAMPLE_RATE, num_mel_bins=n_mels)[0]
    return (fbank * (10.0 / math.log(10.0))).T.contiguous()


def colourise(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """[...] floats in [0, 1] -> [..., 3] uint8 through a colour map of COLOUR_MAPS."""
    anchors = np.asarray(COLOUR_MAPS[cmap], dtype=np.float64)
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(anchors) - 2)
    frac = (x - low)[..., None]
    rgb = anchors[low] * (1.0 - frac) + anchors[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def render_spectrogram(waveform: torch.Tensor, sample_rate: int = TARGET_SAMPLE_RATE, *,
                       size: tuple[int, int] | None = None, cmap: str = "magma", dynamic_range_db: float = 80.0,
                       n_mels: int = 128) -> np.ndarray:
    """A coloured log-mel spectrogram as uint8 [H, W, 3] (low frequencies at the bottom).

    `size` = (width, height) resizes the picture (bilinear); None keeps one pixel per frame
    and mel bin. Levels: the loudest bin is the top of the colour map, `dynamic_range_db`
    below it the bottom (silence renders as the map's darkest colour).
    """
    db = log_mel_db(waveform, sample_rate, n_mels)
    top = float(db.max())
    level = ((db - (top - dynamic_range_db)) / dynamic_range_db).clamp(0.0, 1.0)
    if float(waveform.abs().max()) == 0.0:
        level.zero_()  # digital silence: every bin sits at the log floor
    image = colourise(level.flip(0).numpy(), cmap)
    if size is not None:
        from PIL import Image

        width, height = int(size[0]), int(size[1])
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    return image
