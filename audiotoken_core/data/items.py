"""What a training example is made of, and three ways to list them.

Building the list only looks at file names (cheap even for 200k clips); files are opened
when the dataset loads an item, where a bad one is skipped and reported (see dataset.py).

    pairs_from_folder(root)              audio + image files matched by stem
    pairs_from_videos(root)              one video per example: its sound and a frame
    pairs_from_vggsound_csv(csv, root)   VGGSound-style CSV (ytid, start, label, split)

Each returns a `PairList`: a list of `PairItem` that also carries `.problems` (files that
were found but could not be paired, or CSV rows without a file).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FRAME_MODES",
    "ClipScorer",
    "Problem",
    "VideoFrame",
    "PairItem",
    "PairList",
    "DatasetSourceError",
    "pairs_from_folder",
    "pairs_from_videos",
    "pairs_from_vggsound_csv",
]

logger = logging.getLogger("audiotoken.data")

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
FRAME_MODES = ("middle", "random", "clip")

#: scores candidate frames against a label, higher is better (e.g. CLIP image-text similarity)
ClipScorer = Callable[[list, str], Sequence[float]]

_SHOWN_MISSING = 5  # how many missing files a summary log line names


class DatasetSourceError(ValueError):
    """A dataset source (folder, CSV, option) that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One file that was skipped, and why (kept so a run can report every skip at the end)."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class VideoFrame:
    """The image of an example is a frame of this video, chosen inside the audio window.

    mode "middle": the frame at the window's centre; "random": a uniformly random time in
    the window; "clip": `candidates` evenly spaced frames in the window, the one that
    `scorer(frames, label)` rates highest (the paper's CLIP-score pick).
    """

    path: Path
    mode: str = "middle"
    candidates: int = 5
    scorer: ClipScorer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:  # mode and scorer are checked where the lists are built (_frame_spec)
        object.__setattr__(self, "path", Path(self.path))


ImageSource = Union[Path, VideoFrame]


@dataclass(frozen=True)
class PairItem:
    """One example: where its sound and its image come from, its label and a unique id.

    `clip_start` is where the clip begins inside the audio file, in seconds (non-zero for a
    full-length VGGSound video whose labelled 10 s clip starts at `start`).
    """

    audio: Path
    image: ImageSource
    label: str
    item_id: str
    clip_start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio", Path(self.audio))
        if not isinstance(self.image, VideoFrame):
            object.__setattr__(self, "image", Path(self.image))

    @property
    def source_files(self) -> tuple[Path, ...]:
        """The files whose content defines this example (for cache keys)."""
        image = self.image.path if isinstance(self.image, VideoFrame) else self.image
        return (self.audio,) if image == self.audio else (self.audio, image)


class PairList(list):
    """A list of PairItem plus the problems met while building it (not fatal)."""

    def __init__(self, items: Iterable[PairItem] = (), problems: Iterable[Problem] = ()) -> None:
        super().__init__(items)
        self.problems: list[Problem] = list(problems)


# ------------------------------------------------------------------------ helpers


def _check_root(root: str | os.PathLike, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DatasetSourceError(f"{what} folder not found: {path}; pass an existing folder")
    return path


def _walk(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Files under `root` with one of `extensions` (case-insensitive), sorted; hidden ones skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(folder) / name)
    return sorted(found)


def _item_id(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _folder_label(path: Path, root: Path) -> str:
    """The name of the folder holding `path`, or "" for files directly in `root`."""
    return "" if path.parent == root else path.parent.name


def _log_problems(problems: list[Problem], what: str) -> None:
    if not problems:
        return
    shown = "; ".join(str(p) for p in problems[:_SHOWN_MISSING])
    more = f" (and {len(problems) - _SHOWN_MISSING} more)" if len(problems) > _SHOWN_MISSING else ""
    logger.warning("%s: %d file(s) skipped: %s%s", what, len(problems), shown, more)


def read_csv_rows(path: str | os.PathLike) -> list[list[str]]:
    """The non-blank rows of a CSV file (a UTF-8 byte-order mark is ignored)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]


def _read_labels_csv(path: str | os.PathLike) -> dict[str, str]:
    """`file`/`stem` -> label from a CSV with a header naming those columns (or two plain columns)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetSourceError(f"labels CSV not found: {path}; pass an existing file or leave labels_csv empty")
    rows = read_csv_rows(path)
    if not rows:
        return {}
    header = [cell.strip().lower() for cell in rows[0]]
    key_col = next((header.index(k) for k in ("file", "stem", "filename", "name") if k in header), None)
    first_row = 2
    if key_col is not None and "label" in header:
        label_col, rows = header.index("label"), rows[1:]
    elif key_col is None and "label" not in header:
        key_col, label_col, first_row = 0, 1, 1  # no header: file/stem, label
    else:
        raise DatasetSourceError(
            f"{path}: the header {rows[0]} needs a 'file' (or 'stem') column and a 'label' column"
        )
    labels = {}
    for number, row in enumerate(rows, start=first_row):
        if len(row) <= max(key_col, label_col):
            raise DatasetSourceError(f"{path}, row {number}: {row} has fewer than 2 columns; write 'file,label'")
        key = row[key_col].strip().replace("\\", "/")
        labels[key] = row[label_col].strip()
    return labels


def _csv_label(labels: dict[str, str], path: Path, root: Path) -> str | None:
    """Look a file up in the CSV by relative path, file name, or stem (with or without folders)."""
    rel = path.relative_to(root).as_posix()
    for key in (rel, rel.rsplit(".", 1)[0], path.name, path.stem):
        if key in labels:
            return labels[key]
    return None


# ------------------------------------------------------------------------ (a) folder of pairs


def pairs_from_folder(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> PairList:
    """Audio and image files under `root` paired by file stem (any folder depth).

    A stem with exactly one audio and one image file pairs them wherever they sit (so
    `audio/x.wav` + `images/x.png` works); a stem used more than once pairs files in the same
    folder. Label: the CSV's (columns file or stem, label) when given and listed, else the
    name of the folder holding the audio file ("" for files directly in `root`). Files
    without a partner are reported in `.problems` and skipped.
    """
    root = _check_root(root, "dataset")
    labels = _read_labels_csv(labels_csv) if labels_csv is not None else None
    by_stem: dict[str, tuple[list[Path], list[Path]]] = {}
    for path in _walk(root, AUDIO_EXTENSIONS + IMAGE_EXTENSIONS):
        audios, images = by_stem.setdefault(path.stem, ([], []))
        (audios if path.suffix.lower() in AUDIO_EXTENSIONS else images).append(path)

    pairs: list[tuple[Path, Path]] = []
    problems: list[Problem] = []
    for stem, (audios, images) in sorted(by_stem.items()):
        if len(audios) == 1 and len(images) == 1:
            pairs.append((audios[0], images[0]))
            continue
        for audio in audios:
            partners = [image for image in images if image.parent == audio.parent]
            if len(partners) == 1:
                pairs.append((audio, partners[0]))
                images.remove(partners[0])
            else:
                why = "no image" if not partners else f"{len(partners)} images"
                problems.append(Problem(str(audio), f"{why} with the stem {stem!r} in its folder; "
                                                    f"add one .png/.jpg/.jpeg/.webp named {stem}"))
        for image in images:  # those left after pairing by folder
            problems.append(Problem(str(image), f"no audio file with the stem {stem!r}; add one "
                                                    f"{'/'.join(e[1:] for e in AUDIO_EXTENSIONS)} file named {stem}"))

    items = []
    ids: set[str] = set()
    for audio, image in sorted(pairs):
        label = _csv_label(labels, audio, root) if labels is not None else None
        if label is None and labels is not None:
            label = _csv_label(labels, image, root)
        if label is None:
            label = _folder_label(audio, root)
        item_id = _item_id(audio, root)
        if item_id in ids:  # e.g. x.wav and x.flac in one folder (the second had no own image)
            problems.append(Problem(str(audio), f"another audio file already uses the id {item_id!r}; rename it"))
            continue
        ids.add(item_id)
        items.append(PairItem(audio=audio, image=image, label=label, item_id=item_id))
    problems.sort(key=lambda p: p.file)
    _log_problems(problems, f"pairs_from_folder({root})")
    return PairList(items, problems)


# ------------------------------------------------------------------------ (b) folder of videos


def _frame_spec(frame: str | None, clip_scorer: ClipScorer | None) -> str:
    if frame is None:
        return "clip" if clip_scorer is not None else "middle"
    if frame not in FRAME_MODES:
        raise DatasetSourceError(f"unknown frame choice {frame!r}; choose one of {', '.join(FRAME_MODES)}")
    if frame == "clip" and clip_scorer is None:
        raise DatasetSourceError("frame='clip' needs clip_scorer (frames, label) -> scores; pass one or use 'middle'")
    if frame != "clip" and clip_scorer is not None:
        raise DatasetSourceError(f"clip_scorer is only used with frame='clip', but frame={frame!r}; drop one of them")
    return frame


def pairs_from_videos(
    root: str | os.PathLike,
    frame: str | None = None,
    clip_scorer: ClipScorer | None = None,
    *,
    candidates: int = 5,
) -> PairList:
    """Every video under `root` is one example: its audio track and a frame inside the audio window.

    `frame`: "middle" (default), "random", or "clip" (default when `clip_scorer` is given:
    `clip_scorer(frames: list[PIL.Image], label) -> list[float]` picks among `candidates`
    frames of the window). Label: the name of the folder holding the video. Files are not
    opened here; one without an audio track is skipped when the dataset loads it.
    """
    root = _check_root(root, "video")
    mode = _frame_spec(frame, clip_scorer)
    items = [
        PairItem(
            audio=path,
            image=VideoFrame(path, mode=mode, candidates=candidates, scorer=clip_scorer),
            label=_folder_label(path, root),
            item_id=_item_id(path, root),
        )
        for path in _walk(root, VIDEO_EXTENSIONS)
    ]
    return PairList(items)


# ------------------------------------------------------------------------ (c) VGGSound CSV


def _parse_vggsound_row(row: list[str]) -> tuple[str, float, str, str] | None:
    """(ytid, start, label, split) or None for a header row; labels may hold unquoted commas."""
    if len(row) < 4:
        raise ValueError(f"expected 4 columns (ytid, start, label, split), got {len(row)}")
    try:
        start = float(row[1])
    except ValueError:
        return None
    if not start >= 0:
        raise ValueError(f"start {row[1]!r} is negative")
    return row[0].strip(), start, ",".join(row[2:-1]).strip().strip('"').strip(), row[-1].strip()


def pairs_from_vggsound_csv(
    csv_path: str | os.PathLike,
    media_root: str | os.PathLike,
    split: str | None = "train",
    *,
    frame: str | None = None,
    clip_scorer: ClipScorer | None = None,
    candidates: int = 5,
) -> PairList:
    """Examples from a VGGSound-style CSV (ytid, start, label, split; header optional).

    Clips are looked up anywhere under `media_root` as `<ytid>_<start:06d>.<ext>` (a cut
    10 s clip) or else `<ytid>.<ext>` (the full video; the clip then starts at `start`),
    ext one of mp4/mkv/webm/avi/mov. `split=None` keeps every row. Rows whose file is
    missing are reported in `.problems` and skipped. Frame options as in pairs_from_videos.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetSourceError(f"VGGSound CSV not found: {csv_path}; pass the path of vggsound.csv")
    media_root = _check_root(media_root, "VGGSound media")
    mode = _frame_spec(frame, clip_scorer)
    files: dict[str, Path] = {}
    for path in _walk(media_root, VIDEO_EXTENSIONS):  # one walk instead of a stat per row
        files.setdefault(path.stem, path)

    items: list[PairItem] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                parsed = _parse_vggsound_row(row)
            except ValueError as exc:
                raise DatasetSourceError(f"{csv_path}, row {number}: {exc}; fix or delete the row") from exc
            if parsed is None:
                if number == 1:
                    continue  # header
                raise DatasetSourceError(f"{csv_path}, row {number}: start {row[1]!r} is not a number of seconds")
            ytid, start, label, row_split = parsed
            if split is not None and row_split != split:
                continue
            clip_id = f"{ytid}_{int(start):06d}"
            if clip_id in seen:
                continue
            seen.add(clip_id)
            path, clip_start = files.get(clip_id), 0.0
            if path is None and ytid in files:
                path, clip_start = files[ytid], start
            if path is None:
                problems.append(Problem(str(media_root / f"{clip_id}.mp4"),
                                        f"missing (CSV row {number}; also tried {ytid}.mp4)"))
                continue
            items.append(PairItem(
                audio=path,
                image=VideoFrame(path, mode=mode, candidates=candidates, scorer=clip_scorer),
                label=label,
                item_id=clip_id,
                clip_start=clip_start,
            ))
    _log_problems(problems, f"pairs_from_vggsound_csv({csv_path})")
    return PairList(items, problems)
