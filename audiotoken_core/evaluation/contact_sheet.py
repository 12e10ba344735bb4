"""Contact sheets: one row per item, spectrogram | generated | reference frame (| floor | topline).

    sheet = eval_contact_sheet(out_dir, items)      # uint8 [H, W, 3], from an EvalRunner's output folder
    sheet = contact_sheet(rows, titles, cell=(128, 128), row_labels=["dog", "cat"])

Layout: a white sheet; `pad` pixels around every cell; a title strip of TITLE_HEIGHT above
the first row when titles are given; a label strip of width `label_width` left of each row
when row labels are given. `cell_box` gives the pixel box of any cell, so a caller (or a
test) can cut a picture back out of the sheet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..spectrogram import render_spectrogram
from .eval_set import EvalItem, item_audio, item_frame
from .runner import image_path, load_png, to_uint8

__all__ = ["TITLE_HEIGHT", "COLUMN_TITLES", "contact_sheet", "cell_box", "label_strip_width", "eval_contact_sheet",
           "spread_indices", "as_tensor"]

TITLE_HEIGHT = 16
COLUMN_TITLES = {"spectrogram": "sound", "audiotoken": "AudioToken", "reference": "reference",
                 "untrained": "untrained", "text_label": "text label"}
_BACKGROUND = 255
_INK = (20, 20, 20)


def label_strip_width(row_labels: Sequence[str] | None) -> int:
    """Width of the row-label strip: about 6 px per character of the longest label (0 without labels)."""
    if not row_labels:
        return 0
    return 8 + 6 * max(len(str(label)) for label in row_labels)


def cell_box(row: int, col: int, cell: tuple[int, int], pad: int = 4, titled: bool = True,
             label_width: int = 0) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of cell (row, col); `cell` = (width, height)."""
    width, height = cell
    top = pad + (TITLE_HEIGHT if titled else 0) + row * (height + pad)
    left = pad + label_width + col * (width + pad)
    return top, left, top + height, left + width


def _fit(picture, cell: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    array = to_uint8(picture)
    if (array.shape[1], array.shape[0]) != tuple(cell):
        array = np.asarray(Image.fromarray(array).resize(tuple(cell), Image.Resampling.BILINEAR))
    return array


def contact_sheet(rows: Sequence[Sequence], titles: Sequence[str] | None = None, cell: tuple[int, int] | None = None,
                  pad: int = 4, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Pictures ([H, W, 3] uint8 or float in [0, 1]) in a grid -> uint8 [H, W, 3].

    Every picture is resized (bilinear) to `cell` = (width, height) unless it already has that
    size; `cell` defaults to the first picture's size.
    """
    from PIL import Image, ImageDraw

    ncols = len(rows[0])
    if cell is None:
        first = to_uint8(rows[0][0])
        cell = (first.shape[1], first.shape[0])
    titled, label_width = titles is not None, label_strip_width(row_labels)
    bottom, right = cell_box(len(rows) - 1, ncols - 1, cell, pad, titled, label_width)[2:]
    sheet = np.full((bottom + pad, right + pad, 3), _BACKGROUND, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            top, left, bot, rgt = cell_box(r, c, cell, pad, titled, label_width)
            sheet[top:bot, left:rgt] = _fit(picture, cell)
    if titled or row_labels:
        image = Image.fromarray(sheet)
        draw = ImageDraw.Draw(image)
        for c, title in enumerate(titles or []):
            left = cell_box(0, c, cell, pad, titled, label_width)[1]
            draw.text((left, pad + 2), str(title)[: max(1, cell[0] // 6)], fill=_INK)
        for r, label in enumerate(row_labels or []):
            top = cell_box(r, 0, cell, pad, titled, label_width)[0]
            draw.text((pad, top + cell[1] // 2 - 5), str(label), fill=_INK)
        sheet = np.asarray(image).copy()
    return sheet


def spread_indices(items: Sequence[EvalItem], count: int) -> list[int]:
    """Up to `count` item indices taking the labels in turn (first item of each label, then the second...)."""
    by_label: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_label.setdefault(item.label, []).append(index)
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: count - len(picked)]
        depth += 1
    return picked


def eval_contact_sheet(out_dir: str | os.PathLike, items: Sequence[EvalItem],
                       columns: Sequence[str] = ("spectrogram", "audiotoken", "reference"), max_rows: int = 8,
                       indices: Sequence[int] | None = None, cell: tuple[int, int] | None = None,
                       max_cell: int = 256, row_labels: bool = True) -> np.ndarray:
    """The sheet of an evaluation folder (`items` = the evaluated set, in its order): one row per index
    of `indices` (default: `max_rows` items spread over the labels, see spread_indices), one column per
    entry of `columns` ("spectrogram", "reference", or a system whose PNGs are in out_dir/images/<system>/).

    `cell` defaults to the generated images' size, scaled down to at most `max_cell` pixels a side.
    """
    out_dir = Path(out_dir)
    items = list(items)
    indices = list(indices) if indices is not None else spread_indices(items, max(1, int(max_rows)))
    systems = [c for c in columns if c not in ("spectrogram", "reference")]
    if cell is None:
        probe = load_png(image_path(out_dir, systems[0], 0)) if systems else item_frame(items[0], (256, 256))
        h, w = int(probe.shape[0]), int(probe.shape[1])
        scale = min(1.0, max_cell / max(h, w))
        cell = (max(1, round(w * scale)), max(1, round(h * scale)))
    rows = []
    for index in indices:
        item = items[index]
        row = []
        for column in columns:
            if column == "spectrogram":
                wave, rate = item_audio(item)
                row.append(render_spectrogram(wave, rate, size=cell))
            elif column == "reference":
                row.append(item_frame(item, cell))
            else:
                row.append(load_png(image_path(out_dir, column, index)))
        rows.append(row)
    return contact_sheet(rows, [COLUMN_TITLES.get(c, c) for c in columns], cell=cell,
                         row_labels=[items[i].label for i in indices] if row_labels else None)


def as_tensor(sheet: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE [1, H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(sheet)).float().div(255.0)[None]
