"""The torch Dataset the trainer reads: a 5 s audio window and a matching image per example.

Reference behaviour: the clip is tiled (or cut) to 10 s; in training the window starts at a
random whole second 0..4; for videos the image is a frame from inside that window. Every
random draw comes from a torch.Generator seeded by (seed, epoch, index), so an epoch is
reproducible whatever the worker count or order.

A bad example (no audio track, unreadable, shorter than `min_seconds`, corrupt image) never
stops a run: it is logged, recorded in `dataset.problems`, and the next good example takes
its place (so batches keep their size). DataLoader workers record problems in their own copy
of the dataset; each sample therefore also carries the problems met while producing it, the
collated batch gathers them in `batch["problems"]`, and `dataset.note_problems(...)` merges
them into the main process's list.
"""
from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..audio import REFERENCE_CLIP_SECONDS, AudioInputError, TARGET_SAMPLE_RATE, prepare_waveform
from .items import DatasetSourceError, PairItem, Problem, VideoFrame
from .media import MediaError, decode_frames, fit_image, image_to_tensor, load_clip, load_image

__all__ = ["AudioImageDataset", "Clip", "collate", "DEFAULT_IMAGE_SIZE", "seeded_generator"]

logger = logging.getLogger("audiotoken.data")

#: (width, height) of the reference's training frames
DEFAULT_IMAGE_SIZE = (512, 320)


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from a hash of `parts` (e.g. seed, epoch, index): independent streams."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Clip:
    """The decoded audio clip of one example: [channels, samples] at `rate` Hz."""

    __slots__ = ("wave", "rate")

    def __init__(self, wave: Tensor, rate: int) -> None:
        self.wave, self.rate = wave, rate

    @property
    def seconds(self) -> float:
        return self.wave.shape[-1] / self.rate


class _ItemError(Exception):
    """Internal: an example failed; `file` is the file to blame."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(reason)
        self.file, self.reason = file, reason


class AudioImageDataset(Dataset):
    """Examples as {"wave16": [T], "image": [3, H, W], "label", "id", "window_start", "frame_seconds", "problems"}.

    `image_size` is (width, height), multiples of 8 (the VAE downsamples by 8). In training
    (`train=True`) the window starts at a random whole second in `window_starts(clip)`;
    otherwise at 0. `clip_seconds=None` keeps whole files (still tiled to at least 10 s)
    instead of the reference's 10 s clip.
    """

    def __init__(
        self,
        items: Sequence[PairItem],
        *,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        window_seconds: float = 5.0,
        clip_seconds: float | None = REFERENCE_CLIP_SECONDS,
        train: bool = True,
        seed: int = 0,
        channel_policy: str = "mix",
        min_seconds: float = 0.2,
    ) -> None:
        width, height = (int(v) for v in image_size)
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise DatasetSourceError(
                f"image_size {width}x{height} must be multiples of 8 pixels (the VAE downsamples by 8); "
                "the reference uses (512, 320)"
            )
        self.items: list[PairItem] = list(items)
        self.image_size = (width, height)
        self.window_seconds = float(window_seconds)
        self.clip_seconds = None if clip_seconds is None else float(clip_seconds)
        self.train = bool(train)
        self.seed = int(seed)
        self.channel_policy = channel_policy
        self.min_seconds = float(min_seconds)
        self.epoch = 0
        self.problems: list[Problem] = list(getattr(items, "problems", []))
        self._known = set(self.problems)
        self._bad: set[int] = set()

    # ------------------------------------------------------------------ bookkeeping

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random windows and frames __getitem__ draws."""
        self.epoch = int(epoch)

    def settings(self) -> dict[str, Any]:
        """Everything that changes what an example decodes to (for cache keys)."""
        return {
            "image_size": list(self.image_size),
            "window_seconds": self.window_seconds,
            "clip_seconds": self.clip_seconds,
            "channel_policy": self.channel_policy,
            "sample_rate": TARGET_SAMPLE_RATE,
        }

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The generator of example `index` in `epoch` (default: the current epoch)."""
        return seeded_generator(self.seed, self.epoch if epoch is None else epoch, index)

    def note_problems(self, problems: Iterable[Problem]) -> list[Problem]:
        """Merge problems (e.g. `batch["problems"]` from workers); returns the ones not seen before."""
        new = []
        for problem in problems:
            if problem not in self._known:
                self._known.add(problem)
                self.problems.append(problem)
                new.append(problem)
        return new

    def _report(self, index: int, error: _ItemError) -> Problem:
        problem = Problem(error.file, error.reason)
        self._bad.add(index)
        if self.note_problems([problem]):
            logger.warning("skipping %s (item %r): %s", error.file, self.items[index].item_id, error.reason)
        return problem

    # ------------------------------------------------------------------ the pieces (also used by the cache)

    def load_clip(self, index: int) -> Clip:
        """The example's audio clip (cut to `clip_seconds` from its start), checked for length."""
        item = self.items[index]
        try:
            wave, rate = load_clip(item.audio, item.clip_start, self.clip_seconds)
        except MediaError as exc:
            raise _ItemError(str(item.audio), str(exc)) from exc
        clip = Clip(wave, rate)
        if clip.seconds < self.min_seconds:
            raise _ItemError(str(item.audio), f"the audio lasts {clip.seconds:.3f} s, shorter than the "
                                              f"{self.min_seconds:g} s minimum; use a longer clip or remove the file")
        return clip

    def tiled_seconds(self, clip: Clip) -> float:
        """Length of the (tiled) clip the windows are cut from: 10 s by default."""
        if self.clip_seconds is not None:
            return self.clip_seconds
        return max(clip.seconds, REFERENCE_CLIP_SECONDS, self.window_seconds)

    def window_starts(self, clip: Clip | None = None) -> list[int]:
        """Whole-second starts a training window may take: 0 .. tiled - window - 1 (0..4 for 10 s / 5 s)."""
        tiled = self.clip_seconds if clip is None else self.tiled_seconds(clip)
        if tiled is None:
            raise DatasetSourceError("with clip_seconds=None the starts depend on each clip; pass the clip")
        return list(range(max(1, math.floor(tiled - self.window_seconds + 1e-9))))

    def draw_start(self, clip: Clip, generator: torch.Generator) -> int:
        """The training window start (the generator's first draw); 0 when not training."""
        if not self.train:
            return 0
        starts = self.window_starts(clip)
        return starts[int(torch.randint(len(starts), (1,), generator=generator))]

    def window(self, index: int, clip: Clip, start: float) -> Tensor:
        """[round(window_seconds * 16000)] float32: the window at `start` s of the tiled clip."""
        offset = math.fmod(start, clip.seconds)  # the tiled clip is periodic
        try:
            wave = prepare_waveform(clip.wave, clip.rate, channel_policy=self.channel_policy,
                                    start_seconds=offset, window_seconds=self.window_seconds, loop=True)
        except AudioInputError as exc:
            raise _ItemError(str(self.items[index].audio), str(exc)) from exc
        return wave[0]

    def frame_times(self, index: int, clip: Clip, start: float, generator: torch.Generator | None) -> list[float]:
        """Candidate frame times (seconds into the video file) inside the window at `start`."""
        spec = self.items[index].image
        assert isinstance(spec, VideoFrame)
        w = self.window_seconds
        if spec.mode == "middle":
            offsets = [w / 2]
        elif spec.mode == "random":
            u = float(torch.rand((), generator=generator)) if generator is not None else 0.5
            offsets = [w * u]
        else:
            offsets = [w * (k + 0.5) / spec.candidates for k in range(spec.candidates)]
        item = self.items[index]
        return [item.clip_start + math.fmod(start + o, clip.seconds) for o in offsets]

    def image(self, index: int, clip: Clip, start: float,
              generator: torch.Generator | None) -> tuple[Tensor, float | None]:
        """The example's image [3, H, W] in [0, 1], and the frame's time in the file (None for stills)."""
        item = self.items[index]
        spec = item.image
        if not isinstance(spec, VideoFrame):
            try:
                return image_to_tensor(load_image(spec, self.image_size)), None
            except MediaError as exc:
                raise _ItemError(str(spec), str(exc)) from exc
        times = self.frame_times(index, clip, start, generator)
        try:
            frames = [fit_image(f, self.image_size) for f in decode_frames(spec.path, times)]
        except MediaError as exc:
            raise _ItemError(str(spec.path), str(exc)) from exc
        pick = 0
        if spec.mode == "clip":
            scores = [float(s) for s in spec.scorer(frames, item.label)]
            pick = max(range(len(scores)), key=scores.__getitem__)
        return image_to_tensor(frames[pick]), times[pick]

    def load(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        """Example `index` with the draws of `generator`; raises on a bad file (see __getitem__)."""
        item = self.items[index]
        clip = self.load_clip(index)
        start = self.draw_start(clip, generator)
        wave = self.window(index, clip, start)
        image, frame_seconds = self.image(index, clip, start, generator)
        return {"wave16": wave, "image": image, "label": item.label, "id": item.item_id,
                "window_start": start, "frame_seconds": frame_seconds}

    # ------------------------------------------------------------------ Dataset API

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.items)} examples")
        met: list[Problem] = []
        for step in range(len(self.items)):
            j = (index + step) % len(self.items)
            if j in self._bad:
                continue
            try:
                # Seeded by the requested index: a substitute does not repeat item j's own draws.
                sample = self.load(j, self.generator(index))
            except _ItemError as error:
                met.append(self._report(j, error))
                continue
            sample["problems"] = met
            return sample
        raise self._empty_error()

    def _empty_error(self) -> DatasetSourceError:
        shown = "; ".join(str(p) for p in self.problems[:3])
        return DatasetSourceError(
            f"none of the {len(self.items)} examples could be loaded (first problems: {shown}); "
            "check the dataset folder and `dataset.problems`"
        )

    def scan(self, threads: int = 4) -> list[Problem]:
        """Load every example once, drop the bad ones from `items`, and return their problems.

        Optional: costs about one epoch of decoding, but afterwards indices never shift to
        substitutes and the problem report is complete before training starts.
        """
        def check(index: int) -> Problem | None:
            try:
                self.load(index, self.generator(index, epoch=0))
            except _ItemError as error:
                return Problem(error.file, error.reason)
            return None

        indices = range(len(self.items))
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(check, indices))
        else:
            results = [check(i) for i in indices]
        found = [(i, p) for i, p in zip(indices, results) if p is not None]
        for i, problem in found:
            if self.note_problems([problem]):
                logger.warning("skipping %s (item %r): %s", problem.file, self.items[i].item_id, problem.reason)
        bad = {i for i, _ in found}
        self.items = [item for i, item in enumerate(self.items) if i not in bad]
        self._bad.clear()
        return [p for _, p in found]


_STACKED = {"wave16": "wave16", "image": "images", "features": "features", "latents": "latents"}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> the trainer's batch: wave16 [B, T] / features [B, N, F], images [B, 3, H, W] /
    latents [B, C, h, w], label and id lists, window_start [B], frame_seconds list, problems list."""
    batch: dict[str, Any] = {}
    for key, name in _STACKED.items():
        if key in samples[0]:
            batch[name] = torch.stack([s[key] for s in samples])
    batch["label"] = [s["label"] for s in samples]
    batch["id"] = [s["id"] for s in samples]
    batch["window_start"] = torch.tensor([int(s.get("window_start", 0)) for s in samples], dtype=torch.long)
    batch["frame_seconds"] = [s.get("frame_seconds") for s in samples]
    batch["problems"] = [p for s in samples for p in s.get("problems", ())]
    return batch
