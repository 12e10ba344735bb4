"""A synthetic "learnability world" for proving that AudioToken learns (issue 3) and for evaluation.

    world = build_world(seed=0)               # ~30 s on 2 CPU cores; nothing written to disk
    wave = make_sound(k, seed)                # [80000] 16 kHz, class k in 0..K-1
    z = class_latent(k)                       # [4, 8, 8] in MODEL space (after process_latent_in)
    classify_latent(z)                        # nearest class pattern -> k
    cond = world.encode("a photo of red")     # ComfyUI CONDITIONING
    z = world.sample(cond, seed)              # nodes.common_ksampler (euler/normal) -> [4, 8, 8] model space
    world.denoising_loss(cond_or_context, class_ids, seed)   # eps-MSE on fixed noise/timesteps

K = 4 sound classes (low tone, high tone, white-noise bursts, repeated rising chirps), each
drawn with per-instance randomness from its seed; K image classes are mutually orthogonal
+-1 latent patterns. The text-to-image model is a tiny SD1.5-class UNet and CLIP-L built
with ComfyUI's own classes (so every ComfyUI code path is the real one), trained at build
time to draw class k from "a photo of <WORDS[k]>", then frozen.

What makes the text conditioning stick (a plain eps loss at uniform t leaves the UNet
nearly ignoring the text): the loss is x0-weighted (eps-MSE x (1 + sigma^2)), so the
high-noise steps where only the text can tell the class count as much as the rest;
timesteps are drawn biased to high noise; the prompt is replaced by the empty prompt 10%
of the time (classifier-free guidance training), so sampling with cfg > 1 sharpens the
class; lr decays on a cosine to zero.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

K = 4
SAMPLE_RATE = 16000
WORDS = ("red", "green", "blue", "yellow")
SOUND_NAMES = ("low tone", "high tone", "noise bursts", "rising chirps")
PROMPT = "a photo of {}"
LATENT_SHAPE = (4, 8, 8)
HELDOUT_SEED_OFFSET = 1_000_000  # train instances use seeds < this, held-out ones seeds >= this
CLIP_WIDTH = 64


# --------------------------------------------------------------------------- sounds


def sound_seeds(split: str, n: int) -> list[int]:
    """`n` instance seeds of a split ("train" or "heldout"); the two never overlap."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    base = 0 if split == "train" else HELDOUT_SEED_OFFSET
    return [base + i for i in range(n)]


def make_sound(k: int, seed: int, seconds: float = 5.0) -> Tensor:
    """One instance of sound class `k` (see SOUND_NAMES) as float32 [T] at 16 kHz in [-1, 1]."""
    if not 0 <= k < K:
        raise ValueError(f"sound class must be in 0..{K - 1}, got {k}")
    rng = np.random.default_rng([int(seed), int(k), 7919])
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if k == 0:  # low tone with a weak second harmonic and a slow tremolo
        f = rng.uniform(200, 400)
        y = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.3 * np.sin(4 * np.pi * f * t)
        y *= 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t)
    elif k == 1:  # high tone, slightly vibrato
        f = rng.uniform(2500, 4000)
        phase = 2 * np.pi * f * t + rng.uniform(2, 8) * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
        y = np.sin(phase + rng.uniform(0, 2 * np.pi))
    elif k == 2:  # white-noise bursts with random gaps
        y = rng.standard_normal(n) * 0.5
        gate = np.zeros(n)
        pos = int(rng.uniform(0, 0.3) * SAMPLE_RATE)
        while pos < n:
            length = int(rng.uniform(0.15, 0.5) * SAMPLE_RATE)
            gate[pos:pos + length] = 1.0
            pos += length + int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
        y *= gate
    else:  # repeated rising chirps, 500 Hz -> 2 kHz (exponential sweep)
        period = rng.uniform(0.4, 0.9)
        f0, f1 = rng.uniform(400, 600), rng.uniform(1800, 2200)
        tau = np.mod(t + rng.uniform(0, period), period)
        rate = math.log(f1 / f0) / period
        y = np.sin(2 * np.pi * f0 * (np.exp(rate * tau) - 1) / rate)
        y *= np.minimum(1.0, np.minimum(tau, period - tau) / 0.01)  # click-free edges
    y = y / (np.abs(y).max() + 1e-9) * rng.uniform(0.3, 0.8)
    y = y + rng.standard_normal(n) * 0.003  # faint noise floor
    return torch.from_numpy(np.clip(y, -1, 1).astype(np.float32))


# --------------------------------------------------------------------------- latents


def class_patterns() -> Tensor:
    """[K, 4, 8, 8] mutually orthogonal, zero-mean +-1 patterns (model space)."""
    c = torch.arange(4).view(4, 1, 1).float()
    y = torch.arange(8).view(1, 8, 1).float()
    x = torch.arange(8).view(1, 1, 8).float()
    ones = torch.ones(4, 8, 8)
    pats = [
        ones * torch.where(c < 2, 1.0, -1.0),  # channels 0,1 vs 2,3
        ones * torch.where(c % 2 == 0, 1.0, -1.0),  # even vs odd channels
        ones * torch.where(y < 4, 1.0, -1.0),  # top vs bottom
        ones * torch.where(x < 4, 1.0, -1.0),  # left vs right
    ]
    return torch.stack(pats)


def class_latent(k: int) -> Tensor:
    """The [4, 8, 8] model-space latent of image class `k`."""
    return class_patterns()[k].clone()


def classify_latent(z: Tensor) -> int | Tensor:
    """Nearest class pattern: [4, 8, 8] -> int, or [B, 4, 8, 8] -> LongTensor [B]."""
    pats = class_patterns().to(z.device, torch.float32)
    flat = z.float().reshape(-1, pats[0].numel())
    d = torch.cdist(flat, pats.flatten(1))
    out = d.argmin(1)
    return int(out[0]) if z.dim() == 3 else out


# --------------------------------------------------------------------------- model


def _init_unet(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI leaves weights uninitialised; draw them in sorted-name order from one generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def _init_clip(module: torch.nn.Module, seed: int) -> None:
    """A random CLIP-L text encoder whose word embeddings differ clearly after two layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("logit_scale"):
                continue
            if "norm" in name and name.endswith(".weight"):
                p.fill_(1.0)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _comfy():
    from tools.comfy_root import import_comfy

    import_comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import nodes

    return comfy, nodes


@dataclass
class TrainConfig:
    """Training of the world's text-to-image model."""

    steps: int = 500
    batch: int = 32
    lr: float = 3e-3
    uncond_prob: float = 0.1  # empty-prompt dropout (classifier-free guidance training)
    t_power: float = 0.7  # t = 999 * u**t_power: < 1 favours high noise
    weighting: str = "native"  # "native": the model's own target (eps or v); "eps": eps-MSE; "x0": x0-MSE
    prediction: str = "v"  # the UNet's parameterisation: "eps" (SD1.5) or "v" (like SD2.x-v)
    model_channels: int = 32


@dataclass
class World:
    """The frozen text-to-image model of the world plus its helpers (see the module docstring)."""

    model: Any  # comfy.model_patcher.ModelPatcher
    clip: Any  # comfy.sd.CLIP
    words: tuple[str, ...]
    patterns: Tensor  # [K, 4, 8, 8] model space
    cfg: float = 4.0
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "normal"
    train_log: dict = field(default_factory=dict)

    def prompt(self, k: int) -> str:
        return PROMPT.format(self.words[k])

    def encode(self, text: str) -> list:
        """ComfyUI CONDITIONING for `text`."""
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def context(self, texts: Sequence[str]) -> Tensor:
        """Cross-attention context [B, 77, CLIP_WIDTH] for `texts`."""
        return torch.cat([self.encode(t)[0][0] for t in texts])

    def sample_many(self, positive: list, seed: int, n: int, negative: list | None = None) -> Tensor:
        """`n` samples in one `nodes.common_ksampler` call -> [n, 4, 8, 8] model-space latents."""
        _, nodes = _comfy()
        negative = self.encode("") if negative is None else negative
        latent = {"samples": torch.zeros(n, *LATENT_SHAPE)}
        out = nodes.common_ksampler(self.model, seed, self.steps, self.cfg, self.sampler, self.scheduler,
                                    positive, negative, latent)[0]["samples"]
        return self.model.model.process_latent_in(out).float()

    def sample(self, positive: list, seed: int, negative: list | None = None) -> Tensor:
        """One sample for ComfyUI CONDITIONING `positive` -> [4, 8, 8] model-space latent."""
        return self.sample_many(positive, seed, 1, negative)[0]

    def text_accuracy(self, seed: int = HELDOUT_SEED_OFFSET, per_class: int = 8) -> float:
        """Fraction of samples from "a photo of <word_k>" that classify as k."""
        correct = 0
        for k in range(len(self.words)):
            z = self.sample_many(self.encode(self.prompt(k)), seed + k, per_class)
            correct += int((classify_latent(z) == k).sum())
        return correct / (per_class * len(self.words))

    def denoising_loss(self, conditioning: Tensor | list, class_ids: Sequence[int], seed: int = 0,
                       repeats: int = 4, target: str = "eps") -> float:
        """Mean `target`-MSE ("eps", "v" or "x0") of class_ids' patterns under `conditioning`.

        Noise and timesteps (uniform over the 1000 DDPM steps) are fixed by `seed`.

        `conditioning` is a context tensor [B or 1, 77, D], a ComfyUI CONDITIONING, or a list of
        CONDITIONINGs (one per class id). Each item is evaluated `repeats` times.
        """
        ctx = _as_context(conditioning)
        ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        b = len(ids)
        if ctx.shape[0] == 1:
            ctx = ctx.expand(b, -1, -1)
        ids, ctx = ids.repeat(repeats), ctx.repeat(repeats, 1, 1)
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (len(ids),), generator=g).float()
        noise = torch.randn(len(ids), *LATENT_SHAPE, generator=g)
        with torch.no_grad():
            mse, sigma = _x0_mse(self.model.model, self.patterns[ids], ctx, t, noise)
            return float((mse * _target_weight(target, sigma)).mean())


def _as_context(conditioning: Tensor | list) -> Tensor:
    if isinstance(conditioning, Tensor):
        return conditioning.float()
    if conditioning and isinstance(conditioning[0], list) and isinstance(conditioning[0][0], Tensor):
        return conditioning[0][0].float()  # one CONDITIONING
    return torch.cat([c[0][0] for c in conditioning]).float()  # one CONDITIONING per item


def _x0_mse(base_model, x0: Tensor, ctx: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample MSE [B] of the denoised prediction (ComfyUI's BaseModel.apply_model) and sigma [B]."""
    ms = base_model.model_sampling
    sigma = ms.sigma(t)
    xt = ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
    den = base_model.apply_model(xt, sigma, c_crossattn=ctx)
    return ((den - x0) ** 2).flatten(1).mean(1), sigma


def _target_weight(kind: str, sigma: Tensor) -> Tensor:
    """x0-MSE -> `kind` MSE: eps-MSE = x0-MSE / s^2, v-MSE = x0-MSE (1 + s^2) / s^2."""
    if kind == "eps":
        return sigma ** -2
    if kind == "v":
        return (1 + sigma ** 2) / sigma ** 2
    if kind == "x0":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown loss target {kind!r}")


def _build_clip(comfy, seed: int):
    target = comfy.supported_models.SD15({}).clip_target()
    opts = {"dtype": torch.float32, "clip_l_model_config": {
        "hidden_size": CLIP_WIDTH, "intermediate_size": 2 * CLIP_WIDTH, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77}}
    clip = comfy.sd.CLIP(target=target, model_options=opts)
    _init_clip(clip.cond_stage_model, seed)
    return clip


def _build_unet(comfy, channels: int, seed: int, prediction: str = "eps"):
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": channels, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "context_dim": CLIP_WIDTH, "num_heads": 4, "num_head_channels": -1, "use_linear_in_transformer": False,
        "use_temporal_resblock": False, "use_temporal_attention": False, "num_res_blocks": [1],
        "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1,
    }
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet_config), model_type=model_type)
    _init_unet(model.diffusion_model, seed)
    return model


def build_world(seed: int = 0, config: TrainConfig | None = None, cfg: float = 4.0) -> World:
    """Build and train the world's frozen text-to-image model (deterministic on CPU for a seed)."""
    comfy, _ = _comfy()
    config = config or TrainConfig()
    clip = _build_clip(comfy, seed * 1000 + 1)
    model = _build_unet(comfy, config.model_channels, seed * 1000 + 2, config.prediction)
    kind = config.prediction if config.weighting == "native" else config.weighting
    world = World(model=None, clip=clip, words=WORDS, patterns=class_patterns(), cfg=cfg)
    with torch.no_grad():
        ctx = world.context([world.prompt(k) for k in range(K)])  # [K, 77, D]
        empty = world.context([""])  # [1, 77, D]
    g = torch.Generator().manual_seed(seed * 1000 + 3)
    params = list(model.diffusion_model.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    t0, losses = time.time(), []
    model.train()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        k = torch.randint(0, K, (config.batch,), generator=g)
        t = (999 * torch.rand(config.batch, generator=g) ** config.t_power).round()
        noise = torch.randn(config.batch, *LATENT_SHAPE, generator=g)
        drop = torch.rand(config.batch, generator=g) < config.uncond_prob
        c = torch.where(drop.view(-1, 1, 1), empty, ctx[k])
        mse, sigma = _x0_mse(model, world.patterns[k], c, t, noise)
        loss = (mse * _target_weight(kind, sigma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mm = comfy.model_management
    world.model = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    world.train_log = {"seconds": time.time() - t0, "losses": losses}
    return world
