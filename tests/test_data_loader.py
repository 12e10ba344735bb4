"""build_train_batches / TrainBatches: seeded shuffles, rank shards, cached features."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from audio_files import write_tone
from audiotoken_core.data import DatasetSourceError, build_train_batches, pairs_from_folder


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for i in range(6):
        folder = root / ("low" if i % 2 else "high")
        folder.mkdir(exist_ok=True)
        write_tone(folder / f"clip{i}.wav", 300 + 100 * i, seconds=2.0)
        Image.new("RGB", (40, 24), (40 * i, 0, 0)).save(folder / f"clip{i}.png")
    found = pairs_from_folder(root)
    assert len(found) == 6 and not found.problems
    return found


def _ids(batches) -> list[list[str]]:
    return [list(b["id"]) for b in batches]


def test_ranks_take_disjoint_shards_and_epochs_reshuffle(items):
    r0 = build_train_batches(items, batch_size=1, seed=3, image_size=(32, 16), rank=0, world_size=2)
    r1 = build_train_batches(items, batch_size=1, seed=3, image_size=(32, 16), rank=1, world_size=2)
    a, b = _ids(r0), _ids(r1)
    assert len(a) == len(b) == 3
    assert not {x for batch in a for x in batch} & {x for batch in b for x in batch}
    # Two ranks at batch 1 see, step by step, the samples of one process at batch 2.
    single = _ids(build_train_batches(items, batch_size=2, seed=3, image_size=(32, 16)))
    assert single == [x + y for x, y in zip(a, b)]
    assert _ids(r0) == a  # same epoch, same order
    r0.set_epoch(1)
    orders = {tuple(map(tuple, _ids(r0)))}
    for epoch in range(2, 6):
        r0.set_epoch(epoch)
        orders.add(tuple(map(tuple, _ids(r0))))
    assert len(orders) > 1
    batch = next(iter(r0))
    assert batch["wave16"].shape == (1, 80000) and batch["images"].shape == (1, 3, 16, 32)


def test_incomplete_batches_are_dropped_and_too_little_data_is_an_error(items):
    batches = build_train_batches(items, batch_size=4, image_size=(32, 16))
    assert len(batches) == 1 and len(list(batches)) == 1
    with pytest.raises(DatasetSourceError, match="batch_size"):
        build_train_batches(items, batch_size=4, image_size=(32, 16), world_size=2)


def test_cache_runs_the_frozen_models_once(items, tmp_path):
    calls = {"audio": 0, "image": 0}

    def encode_audio(wave):
        calls["audio"] += 1
        return wave.reshape(wave.shape[0], 100, -1)[..., :8].clone()

    def encode_images(images):
        calls["image"] += 1
        return images[:, :, ::8, ::8].clone()

    kwargs = dict(batch_size=2, image_size=(32, 16), encode_audio=encode_audio, encode_images=encode_images,
                  cache_dir=tmp_path, cache_settings={"encoder": "test"})
    first = build_train_batches(items, **kwargs)
    made = dict(calls)
    assert made["audio"] > 0 and made["image"] > 0
    batch = next(iter(first))
    assert batch["features"].shape == (2, 100, 8) and batch["latents"].shape == (2, 3, 2, 4)
    second = build_train_batches(items, **kwargs)
    list(second)
    assert calls == made  # everything came from disk


def write_huge_png(path: Path, side: int = 30000) -> None:
    """A valid 1-bit greyscale PNG of side x side pixels, all black: about 100 kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("cached", [False, True])
def test_oversized_image_is_skipped_and_reported(items, tmp_path, cached):
    """Pillow refuses images over MAX_IMAGE_PIXELS (DecompressionBombError): that pair is skipped, never fatal."""
    root = tmp_path / "pairs"
    shutil.copytree(Path(items[0].audio).parent.parent, root)
    shutil.copy(items[0].audio, root / "high" / "huge.wav")
    write_huge_png(root / "high" / "huge.png")
    header = (root / "high" / "huge.png").read_bytes()
    assert struct.unpack(">II", header[16:24]) == (30000, 30000) and len(header) < 200_000
    found = pairs_from_folder(root)
    assert len(found) == 7 and "high/huge" in [item.item_id for item in found]

    from audiotoken_core.data import AudioImageDataset

    dataset = AudioImageDataset(found, image_size=(32, 16))
    problems = dataset.scan(threads=1)
    assert [Path(p.file).name for p in problems] == ["huge.png"] and "too large" in problems[0].reason
    assert sorted(item.item_id for item in dataset.items) == sorted(item.item_id for item in items)

    kwargs = {}
    if cached:
        kwargs = dict(encode_audio=lambda w: w.reshape(w.shape[0], 100, -1)[..., :8].clone(),
                      encode_images=lambda x: x[:, :, ::8, ::8].clone(), cache_dir=tmp_path / "cache",
                      cache_settings={"encoder": "test"})
    batches = build_train_batches(found, batch_size=1, image_size=(32, 16), **kwargs)
    seen, reported = [], []
    for epoch in range(2):
        batches.set_epoch(epoch)
        for batch in batches:
            seen += batch["id"]
            reported += batch["problems"]
    reported += batches.dataset.dataset.problems if cached else batches.dataset.problems
    assert "high/huge" not in seen and len(seen) == (12 if cached else 14)
    assert {Path(p.file).name for p in reported} == {"huge.png"}
    assert all("too large" in p.reason and "downscale" in p.reason for p in reported)


def test_module_fingerprint_tells_weights_apart():
    from audiotoken_core.data import module_fingerprint

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert module_fingerprint(a) == module_fingerprint(a) and len(module_fingerprint(a)) == 16
    assert module_fingerprint(a) != module_fingerprint(b)


def test_module_fingerprint_ignores_clip_tensors_comfyui_leaves_uninitialised():
    """SD1.x checkpoints lack CLIP's text_projection / logit_scale: ComfyUI leaves them as torch.empty memory,
    different in every process, so they must not change the fingerprint (a resumed evaluation would refuse)."""
    from audiotoken_core.data import module_fingerprint

    def clip_like(garbage: float) -> torch.nn.Module:
        m = torch.nn.Module()
        torch.manual_seed(0)
        m.embed, m.layer = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        m.final = torch.nn.LayerNorm(4)
        m.text_projection = torch.nn.Linear(4, 4, bias=False)
        m.logit_scale = torch.nn.Parameter(torch.tensor(garbage))
        torch.nn.init.constant_(m.text_projection.weight, garbage)
        return m

    assert module_fingerprint(clip_like(1.0)) == module_fingerprint(clip_like(-7.0))
    changed = clip_like(1.0)
    with torch.no_grad():
        changed.final.weight.add_(1.0)  # real weights still count
    assert module_fingerprint(changed) != module_fingerprint(clip_like(1.0))
