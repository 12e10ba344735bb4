"""Reading the raw media of one example: audio clip, still images, video frames.

Every failure is raised as `MediaError` whose message names the file and the fix, so the
dataset can skip the example and report exactly that message.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..audio import AudioInputError
from ..audio_io import load_audio_file

__all__ = ["MediaError", "load_clip", "load_image", "decode_frames", "fit_image", "image_to_tensor"]


class MediaError(ValueError):
    """An example's file cannot be used; the message says which file, what is wrong and the fix."""


def load_clip(path: str | os.PathLike, clip_start: float = 0.0,
              clip_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """[channels, samples] float32 of the clip [clip_start, clip_start + clip_seconds) of `path`, and its rate.

    The whole audio track is decoded and then cut (10 s clips and full YouTube videos
    decode in milliseconds to a fraction of a second).
    """
    try:
        wave, rate = load_audio_file(path)
    except AudioInputError as exc:  # already names the file and the fix
        raise MediaError(str(exc)) from exc
    first = int(round(clip_start * rate))
    if first >= wave.shape[-1]:
        raise MediaError(
            f"{path}: the clip starts at {clip_start:g} s but the audio lasts only {wave.shape[-1] / rate:.3f} s; "
            "check the start time in the CSV or the file"
        )
    last = wave.shape[-1] if clip_seconds is None else min(wave.shape[-1], first + int(round(clip_seconds * rate)))
    return wave[:, first:last], rate


def _open_image(path: Path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as exc:
        raise MediaError(f"image not found: {path}; check the path") from exc
    except Image.DecompressionBombError as exc:  # Pillow's guard against huge images (MAX_IMAGE_PIXELS)
        raise MediaError(f"image {path} is too large to decode ({exc}); downscale it, e.g. to 1024 px") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"could not read image {path}: {exc}; re-save it as PNG or JPEG") from exc
    return image


def _to_rgb(image):
    """RGB copy; transparent parts become white (not the black a plain convert would give)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image, size: tuple[int, int]):
    """Scale `image` to cover (width, height) keeping its aspect ratio, then centre-crop to it."""
    from PIL import Image

    width, height = size
    image = _to_rgb(image)
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, math.ceil(image.width * scale - 1e-6)), max(height, math.ceil(image.height * scale - 1e-6))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def load_image(path: str | os.PathLike, size: tuple[int, int]):
    """The image at `path`, fitted to `size` (PIL RGB)."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"{path} is a folder, not an image; pass an image file")
    return fit_image(_open_image(path), size)


def decode_frames(path: str | os.PathLike, times: Sequence[float]) -> list:
    """The frames (PIL RGB) shown at each of `times` (seconds from the video's start).

    Seeks once to the earliest time and decodes forward, so a few frames inside one 5 s
    window cost about one window of decoding. A time past the last frame gets the last frame.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}; check the path")
    order = sorted(range(len(times)), key=lambda i: times[i])
    picked: list = [None] * len(times)
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream; use a video file, or pair the audio with an image")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            base = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            first = times[order[0]] + base
            if first > 1.0 and stream.time_base is not None:
                try:
                    container.seek(int(first / stream.time_base), stream=stream, backward=True, any_frame=False)
                except av.error.FFmpegError:
                    container.seek(0)
            position, previous = 0, None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                now = float(frame.pts * stream.time_base)
                while position < len(order) and now > times[order[position]] + base + 1e-6:
                    picked[order[position]] = previous if previous is not None else frame
                    position += 1
                if position == len(order):
                    break
                previous = frame
            while position < len(order) and previous is not None:
                picked[order[position]] = previous
                position += 1
            images = [frame.to_image() if frame is not None else None for frame in picked]
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise MediaError(f"could not decode video frames of {path}: {exc}; re-encode the file (e.g. to H.264 MP4)") from exc
    if any(image is None for image in images):
        raise MediaError(f"{path}: no video frames could be decoded (empty or truncated file); re-encode or remove it")
    return images
