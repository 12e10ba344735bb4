"""The learnability world (tools/learn_world.py) as an evaluation set, with world-specific scorers.

    learned = train_world_token(tmp_dir)                  # ~1 min on 2 CPU cores: world + trained AudioToken
    learned = train_world_token(tmp_dir, prediction="flow", objective="text_match")  # flow world, other objective
    items = write_world_eval_set(folder, per_class=6)     # held-out sounds (.wav) + class pictures (.png)
    generator = world_generator(learned)                  # the pack's ComfyGenerator on the world's models
    scorers = world_scorers(learned)                      # AIC / IIS / AIS / FID models of this world

Pictures: the world's images are latents [4, 8, 8] (model space). `latent_to_rgb` shows them as
colours, one linear map per pixel: red = (z0 + z1 - z2 - z3) / 4, green = (z0 - z1 + z2 - z3) / 4,
blue = (z0 + z1 + z2 + z3) / 4, each as 0.5 + 0.4 * value, upscaled `scale` times. Class 0 ("red")
is pink-red, class 1 ("green") light green, class 2 ("blue") blue above / dark yellow below,
class 3 ("yellow") blue left / dark yellow right. Every class pattern lies in the span of those
three directions, so `rgb_to_coords` recovers exactly what the world's classifier needs.

Scorers (the roles CLIP, Wav2CLIP and Inception play for real images):
  image embedding (IIS) = the colour coordinates of the picture, flattened [192];
  classifier (AIC)      = nearest class picture -> its word (learn_world.classify_latent's rule);
  audio embedding (AIS) = the class picture of a nearest-centroid audio classifier over the
                          encoder's mean-pooled features, centroids from TRAIN sounds, in the same
                          [192] space as the image embedding;
  FID features          = the picture's projections onto the K class pictures [K] (1 = the class picture).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tools import learn_world as lw

TRAIN_PER_CLASS = 12
HELDOUT_PER_CLASS = 6
STEPS = 150
BATCH = 16
PICTURE_SCALE = 12  # 8 x 8 latent -> 96 x 96 picture
PROMPT = "a photo of <audio>"
PLACEHOLDER = "<audio>"
WINDOW_SECONDS = 5.0  # the world's sounds are 5 s long; the token was trained on 5 s

_RGB_FROM_CHANNELS = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]]) / 4


# --------------------------------------------------------------------------- pictures


def latent_to_rgb(z: Tensor, scale: int = PICTURE_SCALE) -> Tensor:
    """[4, 8, 8] or [B, 4, 8, 8] model-space latents -> [(B,) 8*scale, 8*scale, 3] colours in [0, 1]."""
    batch = z.dim() == 4
    z = z.float().cpu().reshape(-1, *lw.LATENT_SHAPE)
    coords = torch.einsum("rc,bchw->bhwr", _RGB_FROM_CHANNELS, z)
    rgb = (0.5 + 0.4 * coords).clamp(0, 1)
    rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return rgb if batch else rgb[0]


def rgb_to_coords(images: Tensor) -> Tensor:
    """[N, H, W, 3] pictures of latent_to_rgb (any scale) -> [N, 3, 8, 8] colour coordinates."""
    n, h, w, _ = images.shape
    size = lw.LATENT_SHAPE[1]
    blocks = images.float().reshape(n, size, h // size, size, w // size, 3).mean((2, 4))
    return ((blocks - 0.5) / 0.4).permute(0, 3, 1, 2).contiguous()


def class_coords() -> Tensor:
    """[K, 3, 8, 8] colour coordinates of the class pictures."""
    return torch.einsum("rc,kchw->krhw", _RGB_FROM_CHANNELS, lw.class_patterns())


class LatentColourVAE:
    """Stands in for a VAE: decode(samples) draws the world's latents as colours (see latent_to_rgb)."""

    def __init__(self, model, scale: int = PICTURE_SCALE):
        self.model, self.scale = model, scale
        self.first_stage_model = None

    def decode(self, samples: Tensor) -> Tensor:
        return latent_to_rgb(self.model.model.process_latent_in(samples).float(), self.scale)


# --------------------------------------------------------------------------- training


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


@dataclass
class LearnedWorld:
    """The world, its audio encoder, the AudioToken trained in it, and what training saw."""

    world: Any                       # learn_world.World
    encoder: Any                     # the small random BEATs
    token: Any                       # the trained AudioToken
    untrained: Any                   # new_audiotoken(seed=0): the same initial weights, never trained
    summary: Any                     # the Trainer's summary
    train: dict                      # learn_world.paired_data("train", ...)
    heldout: dict                    # learn_world.paired_data("heldout", ...)
    train_features: Tensor
    heldout_features: Tensor
    seconds: dict = field(default_factory=dict)
    objective: str = "diffusion"     # the trainer's objective: "diffusion" (the paper's) or "text_match"


def train_world_token(tmp_dir: str | Path, steps: int = STEPS, batch: int = BATCH,
                      world_cache: str | Path | None = None, prediction: str = "v", objective: str = "diffusion",
                      world=None) -> LearnedWorld:
    """Build the world and train an AudioToken in it with the real trainer and ComfyUI backend.

    `prediction`: the world's model ("v" or "flow", see learn_world.build_world); `objective`:
    the trainer's ("diffusion", the paper's, or "text_match"); `world`: an already built world
    to reuse (its prediction must match). `world_cache`: a folder where build_world keeps the
    world's trained UNet (tools, not tests).
    """
    from tools.comfy_root import import_pack
    from tools.placeholder_beats import write_placeholder_beats

    import_pack()
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.training.config import TrainConfig
    from audiotoken.audiotoken_core.training.trainer import Trainer, new_audiotoken
    from audiotoken.nodes.comfy_backend import ComfyBackend

    tmp_dir = Path(tmp_dir)
    t0 = time.perf_counter()
    if world is None:
        world = lw.build_world(seed=0, cache_dir=world_cache, prediction=prediction)
    elif world.prediction != prediction:
        raise ValueError(f"the given world is a {world.prediction!r} world but prediction={prediction!r} was asked for")
    t_world = time.perf_counter() - t0
    encoder = load_audio_encoder(write_placeholder_beats(tmp_dir / "beats.pt", seed=0, **lw.BEATS_SMALL))
    train, heldout = lw.paired_data("train", TRAIN_PER_CLASS), lw.paired_data("heldout", HELDOUT_PER_CLASS)
    with torch.no_grad():
        train_features = torch.cat([encoder(w) for w in train["wave16"].split(16)])
        heldout_features = torch.cat([encoder(w) for w in heldout["wave16"].split(16)])
    token = new_audiotoken({"l": lw.CLIP_WIDTH}, encoder.spec, seed=0)
    untrained = new_audiotoken({"l": lw.CLIP_WIDTH}, encoder.spec, seed=0).eval()
    config = TrainConfig(steps=steps, batch_size=batch, base_lr=1e-4, lambda_l1=0.01, seed=0, save_every=10**6,
                         log_every=10**6, objective=objective)
    data = PairBatches(train_features, train["latents"], train["label"], batch)
    t1 = time.perf_counter()
    with ComfyBackend(world.model, world.clip) as backend:
        summary = Trainer(config, backend, token, None, data, tmp_dir / "run").run()
    token.eval()
    return LearnedWorld(world=world, encoder=encoder, token=token, untrained=untrained, summary=summary, train=train,
                        heldout=heldout, train_features=train_features, heldout_features=heldout_features,
                        seconds={"world": round(t_world, 1), "training": round(time.perf_counter() - t1, 1)},
                        objective=objective)


# --------------------------------------------------------------------------- evaluation set, generator, scorers


def write_world_eval_set(folder: str | Path, per_class: int = HELDOUT_PER_CLASS, split: str = "heldout",
                         scale: int = PICTURE_SCALE):
    """`folder/<word>/<word>_<i>.wav` (16 kHz sounds of the split) + `.png` (the class picture) -> the EvalSet."""
    from audiotoken.audiotoken_core.audio_io import save_wav
    from audiotoken.audiotoken_core.evaluation.eval_set import load_eval_set
    from PIL import Image

    folder = Path(folder)
    for k, word in enumerate(lw.WORDS):
        (folder / word).mkdir(parents=True, exist_ok=True)
        picture = (latent_to_rgb(lw.class_latent(k), scale) * 255).round().to(torch.uint8).numpy()
        for i, seed in enumerate(lw.sound_seeds(split, per_class)):
            stem = folder / word / f"{word}_{i:03d}"
            save_wav(stem.with_suffix(".wav"), lw.make_sound(k, seed).numpy(), lw.SAMPLE_RATE)
            Image.fromarray(picture).save(stem.with_suffix(".png"))
    return load_eval_set(folder)


def world_generator(learned: LearnedWorld, scale: int = PICTURE_SCALE):
    """The pack's ComfyGenerator (splice + common_ksampler) on the world's UNet and CLIP, latents drawn as colours."""
    from audiotoken.nodes.eval_generator import ComfyGenerator
    from audiotoken.nodes.runtime import LoadedAudioToken, LoadedEncoder

    world = learned.world
    loaded = LoadedAudioToken(token=learned.token, encoder=LoadedEncoder(encoder=learned.encoder, name="beats_small"),
                              name="learn_world_token")
    size = 8 * lw.LATENT_SHAPE[1]
    return ComfyGenerator(world.model, world.clip, LatentColourVAE(world.model, scale), loaded, prompt=PROMPT,
                          placeholder=PLACEHOLDER, negative="", steps=world.steps, cfg=world.cfg, sampler=world.sampler,
                          scheduler=world.scheduler, width=size, height=size, window_seconds=WINDOW_SECONDS,
                          checkpoint_name="learn_world seed 0")


def world_scorers(learned: LearnedWorld):
    """Scorers of the world (see the module docstring)."""
    from audiotoken.audiotoken_core.evaluation.runner import Scorers

    pictures = class_coords().flatten(1)  # [K, 192]
    words = list(lw.WORDS)
    pooled = learned.train_features.mean(1)
    centroids = torch.stack([pooled[learned.train["class_id"] == k].mean(0) for k in range(lw.K)])
    encoder = learned.encoder

    def embed_images(images: Tensor) -> Tensor:
        return rgb_to_coords(images).flatten(1)

    def classify(images: Tensor, labels: list) -> list:
        return [words[int(k)] for k in torch.cdist(embed_images(images), pictures).argmin(1)]

    def embed_audio(waves: Tensor) -> Tensor:
        with torch.no_grad():
            features = encoder(waves).mean(1)
        return pictures[torch.cdist(features, centroids).argmin(1)]

    def fid_features(images: Tensor) -> Tensor:
        return embed_images(images) @ pictures.T / pictures.square().sum(1)  # 1 on the own class picture

    return Scorers(image_embedder=embed_images, classifier=classify, audio_embedder=embed_audio,
                   audio_image_embedder=embed_images, fid_features=fid_features, candidate_labels=words,
                   names={"IIS image embedder": "the picture's colour coordinates (flattened latent)",
                          "AIC classifier": "nearest class picture (learn_world.classify_latent's rule)",
                          "AIS": "nearest-centroid audio classifier (train sounds) -> its class picture",
                          "FID": "projections onto the K class pictures"})


def evaluate_world(learned: LearnedWorld, folder: str | Path, per_class: int = HELDOUT_PER_CLASS, seed: int = 0,
                   progress=None):
    """Write the held-out set, evaluate the three systems; -> (EvalSet, EvalResults, contact sheet uint8)."""
    from audiotoken.audiotoken_core.evaluation.runner import EvalProtocol
    from audiotoken.nodes.eval_generator import evaluate

    folder = Path(folder)
    items = write_world_eval_set(folder / "set", per_class)
    protocol = EvalProtocol(seed=seed, audio_seconds=WINDOW_SECONDS)
    results, sheet = evaluate(items, world_generator(learned), world_scorers(learned), folder / "out", protocol,
                              progress=progress)
    return items, results, sheet


def heldout_accuracy(learned: LearnedWorld, token, seed_base: int = 1000) -> float:
    """Fraction of held-out sounds whose sample (noise seed seed_base + i) is classified as their class."""
    from audiotoken.nodes import splice

    world, features, class_ids = learned.world, learned.heldout_features, learned.heldout["class_id"]
    with torch.no_grad():
        vectors = {k: e.eval()(features) for k, e in token.embedders.items()}
    cond = splice.encode_with_vectors(world.clip, PROMPT, PLACEHOLDER, vectors, "test token")
    correct = 0
    for i, k in enumerate(class_ids.tolist()):
        item = [[c[0][i:i + 1], {n: (v[i:i + 1] if torch.is_tensor(v) else v) for n, v in c[1].items()}] for c in cond]
        correct += int(lw.classify_latent(world.sample(item, seed=seed_base + i)) == k)
    return correct / len(class_ids)


def mean_loss(history: list, first: bool) -> float:
    part = history[:10] if first else history[-10:]
    return sum(h["loss"] for h in part) / len(part)


__all__ = ["latent_to_rgb", "rgb_to_coords", "class_coords", "LatentColourVAE", "PairBatches", "LearnedWorld",
           "train_world_token", "write_world_eval_set", "world_generator", "world_scorers", "evaluate_world",
           "heldout_accuracy", "mean_loss"]
