"""Decode audio files with PyAV (the decoder ComfyUI itself uses), without torchaudio."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .audio import AudioInputError

# Sample formats PyAV hands out (planar variants end in "p"), and the value that maps to 1.0.
_INT_SCALE = {"s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63}
_FIX = "re-export the file as WAV/FLAC"


class AudioFileError(AudioInputError):
    """A file that cannot be read as audio; the message names the file and the fix."""


class AudioFileNotFoundError(AudioFileError, FileNotFoundError):
    """The path does not exist (also a FileNotFoundError, for callers that catch that)."""


def _frame_to_array(frame) -> np.ndarray:
    """One decoded frame -> float32 [channels, samples] in [-1, 1]."""
    name = frame.format.name
    base = name[:-1] if frame.format.is_planar else name
    channels = frame.layout.nb_channels
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # interleaved: [1, samples * channels]
        data = data.reshape(-1, channels).T
    if base in ("flt", "dbl"):
        return data.astype(np.float32, copy=False)
    if base == "u8":
        return (data.astype(np.float32) - 128.0) / 128.0
    if base in _INT_SCALE:
        return (data.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
    raise AudioFileError(f"unsupported decoded sample format {name!r}; {_FIX}")


def load_audio_file(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream of `path` -> (float32 [channels, samples] in [-1, 1], sample_rate).

    Reads anything FFmpeg reads (wav, flac, ogg, mp3, the audio track of mp4/mkv ...).
    """
    import av  # deferred: only file loading needs PyAV

    path = Path(path)
    if not path.exists():
        raise AudioFileNotFoundError(f"audio file not found: {path}; check the path and file name")
    if path.is_dir():
        raise AudioFileError(f"{path} is a folder, not an audio file; pass the path of one file inside it")

    chunks: list[np.ndarray] = []
    rate = channels = None
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                raise AudioFileError(
                    f"{path} has no audio stream; pick a file with a sound track or {_FIX}"
                )
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                array = _frame_to_array(frame)
                if rate is None:
                    rate, channels = frame.sample_rate, array.shape[0]
                elif frame.sample_rate != rate or array.shape[0] != channels:
                    raise AudioFileError(
                        f"{path} changes its sample rate or channel count mid-stream "
                        f"({rate} Hz x {channels} -> {frame.sample_rate} Hz x {array.shape[0]}); {_FIX}"
                    )
                chunks.append(array)
    except AudioInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise AudioFileError(f"could not decode {path}: {exc}; {_FIX}") from exc

    if not chunks:
        raise AudioFileError(f"could not decode {path}: no audio samples were found (empty or truncated file); {_FIX}")
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1))
    return waveform, int(rate)


def save_wav(path: str | os.PathLike, samples: np.ndarray, rate: int, codec: str = "pcm_s16le") -> None:
    """Write mono float samples [T] (or [1, T]) in [-1, 1] as a WAV file with PyAV.

    `codec="pcm_f32le"` keeps the floats exactly (and can hold NaN, which tests need).
    """
    import av

    samples = np.asarray(samples, dtype=np.float32).reshape(1, -1)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream(codec, rate=int(rate), layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = int(rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
