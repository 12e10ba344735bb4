"""Proof that AudioToken learns (issue 3, point 5), in the synthetic paired world of tools/learn_world.py.

K = 4 sound classes (hum, beeps, noise bursts, chirps) are paired with K image classes that
a small frozen text-to-image model (ComfyUI classes, v-prediction) draws from "a photo of
red/green/blue/yellow". AudioToken is trained on the pairs with the real trainer and the
real ComfyUI backend, through a small random BEATs. Then images are sampled through
ComfyUI's sampling path (`nodes.common_ksampler`) from HELD-OUT audio.

Bars: trained accuracy >= 80 % (chance 25 %), the untrained Embedder <= 50 %, and the
matched-audio denoising loss below the shuffled-audio loss.
"""
from __future__ import annotations

import torch

from tools import learn_world as lw
from tools.comfy_root import import_pack
from tools.placeholder_beats import write_placeholder_beats

TRAIN_PER_CLASS = 12
HELDOUT_PER_CLASS = 6
STEPS = 150
BATCH = 16
ACCURACY_BAR = 0.80
UNTRAINED_MAX = 0.50


class PairBatches:
    """Batches of cached features + latents, reshuffled per epoch (the trainer's data contract)."""

    def __init__(self, features, latents, labels, batch: int, seed: int = 0):
        self.features, self.latents, self.labels, self.batch, self.seed = features, latents, labels, batch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for i in range(0, len(order) - self.batch + 1, self.batch):
            idx = order[i:i + self.batch]
            yield {"features": self.features[idx], "latents": self.latents[idx],
                   "label": [self.labels[j] for j in idx.tolist()]}


def _vectors(token, features):
    with torch.no_grad():
        return {k: e.eval()(features) for k, e in token.embedders.items()}


def _accuracy(world, splice, token, features, class_ids) -> float:
    vectors = _vectors(token, features)
    cond = splice.encode_with_vectors(world.clip, "a photo of <audio>", "<audio>", vectors, "test token")
    correct = 0
    for i, k in enumerate(class_ids.tolist()):
        item = [[c[0][i:i + 1], {n: (v[i:i + 1] if torch.is_tensor(v) else v) for n, v in c[1].items()}] for c in cond]
        correct += int(lw.classify_latent(world.sample(item, seed=1000 + i)) == k)
    return correct / len(class_ids)


def test_audiotoken_learns_the_paired_world(tmp_path):
    import_pack()
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.training.config import TrainConfig
    from audiotoken.audiotoken_core.training.trainer import Trainer, new_audiotoken
    from audiotoken.nodes import splice
    from audiotoken.nodes.comfy_backend import ComfyBackend

    world = lw.build_world(seed=0)
    encoder = load_audio_encoder(write_placeholder_beats(tmp_path / "beats.pt", seed=0, **lw.BEATS_SMALL))
    train, heldout = lw.paired_data("train", TRAIN_PER_CLASS), lw.paired_data("heldout", HELDOUT_PER_CLASS)
    with torch.no_grad():
        train_features = torch.cat([encoder(w) for w in train["wave16"].split(16)])
        heldout_features = torch.cat([encoder(w) for w in heldout["wave16"].split(16)])

    token = new_audiotoken({"l": lw.CLIP_WIDTH}, encoder.spec, seed=0)
    untrained = _accuracy(world, splice, token, heldout_features, heldout["class_id"])

    config = TrainConfig(steps=STEPS, batch_size=BATCH, base_lr=1e-4, lambda_l1=0.01, seed=0, save_every=10**6,
                         log_every=10**6)
    data = PairBatches(train_features, train["latents"], train["label"], BATCH)
    with ComfyBackend(world.model, world.clip) as backend:
        assert backend.prediction == "v"
        summary = Trainer(config, backend, token, None, data, tmp_path / "run").run()
    assert summary.status == "completed"
    first = sum(h["loss"] for h in summary.history[:10]) / 10
    last = sum(h["loss"] for h in summary.history[-10:]) / 10
    assert last < first

    trained = _accuracy(world, splice, token, heldout_features, heldout["class_id"])
    vectors = _vectors(token, heldout_features)
    matched = splice.encode_with_vectors(world.clip, "a photo of <audio>", "<audio>", vectors, "trained")
    shuffled_ids = (heldout["class_id"] + 1) % lw.K
    matched_loss = world.denoising_loss(matched, heldout["class_id"].tolist(), seed=3, target="v")
    shuffled_loss = world.denoising_loss(matched, shuffled_ids.tolist(), seed=3, target="v")
    print(f"untrained {untrained:.2f}  trained {trained:.2f}  loss matched {matched_loss:.4f} shuffled {shuffled_loss:.4f}")
    assert trained >= ACCURACY_BAR, (trained, untrained)
    assert untrained <= UNTRAINED_MAX, untrained
    assert matched_loss < shuffled_loss
