"""build_train_batches / TrainBatches: seeded shuffles, rank shards, cached features."""
from __future__ import annotations

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
