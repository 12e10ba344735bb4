"""Write audio files for tests with PyAV (the decoder ComfyUI itself uses)."""
from __future__ import annotations

import numpy as np

from audiotoken_core.audio_io import save_wav


def write_wav(path, samples: np.ndarray, rate: int = 16000, codec: str = "pcm_s16le") -> None:
    """`samples`: float32 [T] or [1, T] in [-1, 1] (NaN allowed with codec pcm_f32le)."""
    save_wav(path, samples, rate, codec)


def write_tone(path, freq: float, seconds: float = 3.0, rate: int = 16000, amplitude: float = 0.3) -> None:
    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, amplitude * np.sin(2 * np.pi * freq * t), rate)
