"""An evaluation set: items of (audio file, reference frame, label).

    items = load_eval_set("input/audiotoken_eval/vgg_test")       # a folder (or a CSV file)
    wave, rate = item_audio(items[0])                             # [channels, samples], Hz
    frame = item_frame(items[0], (512, 512))                      # [H, W, 3] float in [0, 1]

Layouts:
- a folder of pairs matched by file stem, like the training folders
  (`dog/bark1.wav` + `dog/bark1.png`); the label is the subfolder's name, or the `label`
  column of `labels.csv` in the folder (columns `file`/`stem`, `label`);
- a CSV file with columns `audio`, `frame` (or `image`), `label`; relative paths are
  relative to the CSV's folder.

An evaluation set must be complete: a sound without its frame, a frame without its sound,
a missing file or a missing label is an error that names every offending file (a training
set skips such files; dropping items silently would change the scores).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..data.items import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, DatasetSourceError, pairs_from_folder, read_csv_rows
from ..data.media import MediaError, image_to_tensor, load_clip, load_image

__all__ = ["EvalItem", "EvalSet", "EvalSetError", "LABELS_CSV", "eval_set_from_folder", "eval_set_from_csv",
           "load_eval_set", "item_audio", "item_frame"]

LABELS_CSV = "labels.csv"  # picked up automatically inside an evaluation folder
_SHOWN = 8


class EvalSetError(ValueError):
    """An evaluation set that cannot be used as it is; the message names the files and the fix."""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example. `item_id` is unique in its set (relative path without extension)."""

    audio: Path
    frame: Path
    label: str
    item_id: str


class EvalSet(list):
    """A list of EvalItem (sorted by item_id) and where it came from."""

    def __init__(self, items: Iterable[EvalItem] = (), source: str = "") -> None:
        super().__init__(items)
        self.source = source

    @property
    def labels(self) -> list[str]:
        """The distinct labels, sorted (the class vocabulary of zero-shot classification)."""
        return sorted({item.label for item in self})

    def limit(self, n: int | None) -> "EvalSet":
        """The first `n` items (all for None)."""
        return self if n is None else EvalSet(self[:max(0, int(n))], self.source)


def _listing(lines: list[str]) -> str:
    shown = "\n  ".join(lines[:_SHOWN])
    more = f"\n  ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return f"\n  {shown}{more}"


def eval_set_from_folder(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> EvalSet:
    """Pairs by file stem under `root`; labels from `labels_csv`, `root/labels.csv`, or the subfolder name."""
    root = Path(root)
    if not root.is_dir():
        raise EvalSetError(f"evaluation folder not found: {root}; create it with audio + frame pairs")
    if labels_csv is None and (root / LABELS_CSV).is_file():
        labels_csv = root / LABELS_CSV
    try:
        pairs = pairs_from_folder(root, labels_csv=labels_csv)
    except DatasetSourceError as exc:
        raise EvalSetError(str(exc)) from exc
    if pairs.problems:
        raise EvalSetError(
            f"{root}: {len(pairs.problems)} file(s) have no partner; every sound needs its reference frame "
            f"(same file name, an image) and every frame its sound:" + _listing([str(p) for p in pairs.problems]))
    unlabelled = [str(p.audio) for p in pairs if not p.label.strip()]
    if unlabelled:
        raise EvalSetError(
            f"{root}: {len(unlabelled)} item(s) have no label; put each pair in a subfolder named after its label "
            f"(dog/bark1.wav + dog/bark1.png) or list it in {LABELS_CSV} (columns file,label):" + _listing(unlabelled))
    if not pairs:
        raise EvalSetError(f"{root} holds no audio + frame pairs; add e.g. dog/bark1.wav + dog/bark1.png "
                           f"(audio: {', '.join(AUDIO_EXTENSIONS)}; frames: {', '.join(IMAGE_EXTENSIONS)})")
    items = [EvalItem(audio=p.audio, frame=p.image, label=p.label.strip(), item_id=p.item_id) for p in pairs]
    return EvalSet(sorted(items, key=lambda i: i.item_id), source=str(root))


def eval_set_from_csv(csv_path: str | os.PathLike) -> EvalSet:
    """Rows `audio,frame,label` (header required; `image` may name the frame column)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise EvalSetError(f"evaluation CSV not found: {csv_path}")
    rows = read_csv_rows(csv_path)
    if not rows:
        raise EvalSetError(f"{csv_path} is empty; write a header audio,frame,label and one row per item")
    header = [cell.strip().lower() for cell in rows[0]]
    frame_col = "frame" if "frame" in header else "image"
    if "audio" not in header or frame_col not in header or "label" not in header:
        raise EvalSetError(f"{csv_path}: the header {rows[0]} needs the columns audio, frame (or image) and label")
    cols = [header.index("audio"), header.index(frame_col), header.index("label")]
    base = csv_path.parent
    items, missing, unlabelled, ids = [], [], [], set()
    for number, row in enumerate(rows[1:], start=2):
        if len(row) <= max(cols):
            raise EvalSetError(f"{csv_path}, row {number}: {row} has too few columns; write audio,frame,label")
        audio, frame, label = (row[c].strip() for c in cols)
        audio_path, frame_path = base / audio, base / frame
        for path in (audio_path, frame_path):
            if not path.is_file():
                missing.append(f"row {number}: {path}")
        if not label:
            unlabelled.append(f"row {number}: {audio}")
        item_id = Path(audio).with_suffix("").as_posix()
        if item_id in ids:
            raise EvalSetError(f"{csv_path}, row {number}: the audio file {audio} is listed twice")
        ids.add(item_id)
        items.append(EvalItem(audio=audio_path, frame=frame_path, label=label, item_id=item_id))
    if missing:
        raise EvalSetError(f"{csv_path}: {len(missing)} listed file(s) do not exist (paths are relative to the "
                           f"CSV's folder):" + _listing(missing))
    if unlabelled:
        raise EvalSetError(f"{csv_path}: {len(unlabelled)} row(s) have an empty label:" + _listing(unlabelled))
    if not items:
        raise EvalSetError(f"{csv_path} lists no items; add rows audio,frame,label")
    return EvalSet(items, source=str(csv_path))


def load_eval_set(path: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> EvalSet:
    """A folder of pairs or a CSV of (audio, frame, label) rows."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return eval_set_from_csv(path)
    return eval_set_from_folder(path, labels_csv=labels_csv)


def item_audio(item: EvalItem) -> tuple[torch.Tensor, int]:
    """The item's sound: float32 [channels, samples] in [-1, 1] and its sample rate."""
    try:
        return load_clip(item.audio)
    except MediaError as exc:
        raise EvalSetError(f"item {item.item_id}: {exc}") from exc


def item_frame(item: EvalItem, size: tuple[int, int]) -> torch.Tensor:
    """The reference frame scaled to cover `size` = (width, height) and centre-cropped: [H, W, 3] in [0, 1]."""
    try:
        return image_to_tensor(load_image(item.frame, size)).permute(1, 2, 0).contiguous()
    except MediaError as exc:
        raise EvalSetError(f"item {item.item_id}: {exc}") from exc
