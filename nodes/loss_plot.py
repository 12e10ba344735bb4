"""A loss curve as a ComfyUI IMAGE ([1, H, W, 3] float in [0, 1]), drawn with Pillow alone."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

MARGIN = 48


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) <= window:
        return list(values)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), np.asarray(values, dtype=np.float64)])
    return np.convolve(padded, kernel, mode="valid").tolist()


def loss_curve_image(losses: list[float], title: str = "AudioToken training loss",
                     width: int = 768, height: int = 384) -> torch.Tensor:
    """Raw losses in light grey, a moving average in blue, log-scaled y axis when it spans >10x."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, 12), title, fill="black")
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < 2:
        draw.text((MARGIN, height // 2), "not enough steps to draw a curve", fill="black")
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    lo, hi = min(finite), max(finite)
    use_log = lo > 0 and hi / lo > 10
    f = (lambda v: math.log10(v)) if use_log else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    span = (fhi - flo) or 1.0
    x0, y0, x1, y1 = MARGIN, MARGIN, width - MARGIN // 2, height - MARGIN
    draw.rectangle([x0, y0, x1, y1], outline="black")

    def point(i: int, v: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * i / max(1, len(losses) - 1)
        y = y1 - (y1 - y0) * (f(v) - flo) / span
        return x, y

    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    draw.line(raw, fill=(200, 200, 200), width=1)
    smooth = _smooth(finite, max(1, len(finite) // 50))
    draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    draw.text((x0, y1 + 8), "step 0", fill="black")
    draw.text((x1 - 80, y1 + 8), f"step {len(losses)}", fill="black")
    draw.text((4, y0), f"{hi:.4g}", fill="black")
    draw.text((4, y1 - 10), f"{lo:.4g}", fill="black")
    if use_log:
        draw.text((x1 - 60, 12), "log y", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
