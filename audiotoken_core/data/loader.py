"""Batches for the trainer: a seeded shuffle per epoch, sharded by rank, collated.

One function builds the whole input pipeline for every front end (the ComfyUI training
node, the headless/torchrun command, tests), so they all see the same samples: items ->
AudioImageDataset -> (optionally) CachedFeatures that run the frozen audio encoder and the
VAE once and keep their outputs on disk -> TrainBatches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .cache import CachedFeatures, FeatureCache
from .dataset import AudioImageDataset, collate, seeded_generator
from .items import DatasetSourceError, PairItem


class TrainBatches:
    """Iterable of batch dicts; `set_epoch(e)` reshuffles.

    Step k's global batch is the k-th run of batch_size x world_size samples of the epoch's
    permutation and rank r takes the r-th consecutive slice of it, which is what the trainer's
    per-sample noise assumes: w processes at batch b see exactly the samples (and noise) of one
    process at batch w x b. Incomplete last batches are dropped so all ranks step together."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> None:
        if len(dataset) < batch_size * world_size:
            raise DatasetSourceError(
                f"the dataset has {len(dataset)} usable examples but one step needs batch_size x GPUs = "
                f"{batch_size * world_size}; add data or lower batch_size")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _batches_of_indices(self) -> list[list[int]]:
        order = torch.randperm(len(self.dataset), generator=seeded_generator(self.seed, self.epoch, 0x5EED)).tolist()
        step = self.batch_size * self.world_size
        first = self.rank * self.batch_size
        return [order[k + first:k + first + self.batch_size] for k in range(0, len(order) - step + 1, step)]

    def __len__(self) -> int:
        return len(self._batches_of_indices())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches_of_indices()
        if self.num_workers > 0:
            yield from DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=self.num_workers)
        else:
            for indices in batches:
                yield collate([self.dataset[i] for i in indices])


def build_train_batches(
    items: Sequence[PairItem],
    *,
    batch_size: int,
    seed: int = 0,
    image_size: tuple[int, int] = (512, 320),
    window_seconds: float = 5.0,
    encode_audio: Callable[[Tensor], Tensor] | None = None,
    encode_images: Callable[[Tensor], Tensor] | None = None,
    cache_dir: str | Path | None = None,
    cache_settings: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> TrainBatches:
    """The trainer's data. With `cache_dir`, audio features and latents are computed once
    (by `encode_audio` / `encode_images`) and stored keyed by file content and `cache_settings`
    (name the encoder, its layers and the VAE there); later epochs and runs skip those models."""
    dataset = AudioImageDataset(items, image_size=image_size, window_seconds=window_seconds, seed=seed)
    if cache_dir is not None:  # with encode_audio and encode_images
        distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and rank != 0:
            torch.distributed.barrier()  # rank 0 fills the cache first; the others then only read it
        cache = FeatureCache(Path(cache_dir), dict(cache_settings or {}))
        cached = CachedFeatures(dataset, encode_audio, encode_images, cache)
        with torch.no_grad():
            cached.precompute(progress=progress)
        cache.flush()
        if distributed and rank == 0:
            torch.distributed.barrier()
        dataset = cached
    return TrainBatches(dataset, batch_size, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
