"""Draw the pack's registry icon and banner (assets/icon.png, assets/banner.png).

The Comfy Registry and ComfyUI-Manager show `[tool.comfy] Icon` (square, at most 400 x 400) and
`Banner` (21:9) from pyproject.toml. The motif is the placeholder word the pack is about: a sound's
waveform between the angle brackets of `<audio>`. Plain drawing (no randomness, the font built into
Pillow >= 10.1), so running this again gives the committed files back; tests/test_registry.py checks that.

    python -m tools.brand_images            # rewrite assets/icon.png and assets/banner.png
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
ICON_PATH = REPO / "assets" / "icon.png"
BANNER_PATH = REPO / "assets" / "banner.png"
ICON_SIZE = (400, 400)
BANNER_SIZE = (1344, 576)  # 21:9
SUPERSAMPLE = 4  # drawn this much larger, then reduced: smooth edges without an antialiasing renderer

BACKGROUND_TOP, BACKGROUND_BOTTOM = (18, 27, 44), (33, 52, 78)
BRACKET = (238, 242, 247)
WAVE_LOW, WAVE_HIGH = (64, 196, 200), (250, 186, 74)  # teal at the baseline, amber at the peaks
TEXT_MAIN, TEXT_SUB = (246, 248, 250), (170, 190, 214)
TITLE = "AudioToken"
SUBTITLE = ("any sound becomes a word in your prompt", "ComfyUI nodes: SD, SDXL, Flux, Wan and more")


def _gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    w, h = size
    column = Image.new("RGB", (1, h))
    for y in range(h):
        t = y / max(h - 1, 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize((w, h), Image.Resampling.NEAREST)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _bar_heights(count: int) -> list[float]:
    """Heights in [0, 1] of a bark-like burst: two attacks with decaying, beating partials."""
    heights = []
    for i in range(count):
        t = i / (count - 1)
        burst = sum(math.exp(-((t - c) / w) ** 2) for c, w in ((0.3, 0.16), (0.68, 0.2)))
        ripple = 0.55 + 0.45 * abs(math.sin(19.0 * t) * math.cos(7.0 * t + 0.4))
        heights.append(min(1.0, 0.1 + 0.9 * burst * ripple))
    return heights


def _emblem(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float]) -> None:
    """`< waveform >` inside box (left, top, right, bottom)."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    cy = (top + bottom) / 2
    stroke = w * 0.055
    arm_x, arm_y = w * 0.16, h * 0.34
    for tip_x, sign in ((left + w * 0.02, 1), (right - w * 0.02, -1)):
        points = [(tip_x + sign * arm_x, cy - arm_y), (tip_x, cy), (tip_x + sign * arm_x, cy + arm_y)]
        draw.line(points, fill=BRACKET, width=round(stroke), joint="curve")
        for x, y in points:  # round caps
            draw.ellipse((x - stroke / 2, y - stroke / 2, x + stroke / 2, y + stroke / 2), fill=BRACKET)
    wave_left, wave_right = left + w * 0.26, right - w * 0.26
    count = 13
    pitch = (wave_right - wave_left) / count
    bar = pitch * 0.62
    for i, height in enumerate(_bar_heights(count)):
        x = wave_left + i * pitch + (pitch - bar) / 2
        half = max(bar / 2, height * h * 0.4)
        draw.rounded_rectangle((x, cy - half, x + bar, cy + half), radius=bar / 2,
                               fill=_mix(WAVE_LOW, WAVE_HIGH, height))


def draw_icon(size: tuple[int, int] = ICON_SIZE) -> Image.Image:
    s = SUPERSAMPLE
    w, h = size[0] * s, size[1] * s
    image = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    tile = _gradient((w, h), BACKGROUND_TOP, BACKGROUND_BOTTOM).convert("RGBA")
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, w - 1, h - 1), radius=w * 0.18, fill=255)
    image.paste(tile, (0, 0), mask)
    _emblem(ImageDraw.Draw(image), (w * 0.1, h * 0.14, w * 0.9, h * 0.86))
    return image.resize(size, Image.Resampling.LANCZOS)


def draw_banner(size: tuple[int, int] = BANNER_SIZE) -> Image.Image:
    s = SUPERSAMPLE
    w, h = size[0] * s, size[1] * s
    image = _gradient((w, h), BACKGROUND_TOP, BACKGROUND_BOTTOM)
    draw = ImageDraw.Draw(image)
    emblem = h * 0.56
    _emblem(draw, (w * 0.06, (h - emblem) / 2, w * 0.06 + emblem * 1.25, (h + emblem) / 2))
    text_left = w * 0.06 + emblem * 1.25 + w * 0.05
    title = ImageFont.load_default(size=round(h * 0.2))
    sub = ImageFont.load_default(size=round(h * 0.06))
    draw.text((text_left, h * 0.47), TITLE, font=title, fill=TEXT_MAIN, anchor="ls")
    for i, line in enumerate(SUBTITLE):
        draw.text((text_left + h * 0.008, h * (0.59 + 0.09 * i)), line, font=sub, fill=TEXT_SUB, anchor="ls")
    right = max(draw.textbbox((text_left, h / 2), text, font=font, anchor="ls")[2]
                for text, font in [(TITLE, title), *((line, sub) for line in SUBTITLE)])
    if right > w * 0.97:
        raise ValueError(f"banner text runs {right / s:.0f} px wide on a {size[0]} px banner: shorten it")
    return image.resize(size, Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.brand_images", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    ICON_PATH.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(ICON_PATH, optimize=True)
    draw_banner().save(BANNER_PATH, optimize=True)
    for path in (ICON_PATH, BANNER_PATH):
        print(f"{path.relative_to(REPO)}: {Image.open(path).size[0]} x {Image.open(path).size[1]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
