"""Write audio files for tests with PyAV (the decoder ComfyUI itself uses)."""
from __future__ import annotations

import av
import numpy as np


def write_wav(path, samples: np.ndarray, rate: int = 16000, codec: str = "pcm_s16le") -> None:
    """`samples`: float32 [T] or [1, T] in [-1, 1] (NaN allowed with codec pcm_f32le)."""
    samples = np.asarray(samples, dtype=np.float32).reshape(1, -1)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_tone(path, freq: float, seconds: float = 3.0, rate: int = 16000, amplitude: float = 0.3) -> None:
    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, amplitude * np.sin(2 * np.pi * freq * t), rate)
