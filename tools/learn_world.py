"""A synthetic "learnability world": paired sound / image classes and a tiny text-to-image model.

Used by the proof that AudioToken learns and by the evaluation.

    wave = make_sound(k, seed)                 # [80000] float32, 16 kHz, sound class k in 0..K-1
    seeds = sound_seeds("heldout", 8)          # instance seeds; "train" and "heldout" never overlap
    z = class_latent(k)                        # [4, 8, 8] image class k in MODEL space (after process_latent_in)
    classify_latent(z)                         # nearest class pattern -> k (or [B] for a batch)
    world = build_world(seed=0)                # ~25 s on 2 CPU cores; writes nothing unless cache_dir is given
    world = build_world(prediction="flow")     # the same world on a rectified-flow model (SD3-style sampling)
    cond = world.encode(world.prompt(k))       # ComfyUI CONDITIONING for "a photo of <WORDS[k]>"
    z = world.sample(cond, seed)               # nodes.common_ksampler, euler/normal, 20 steps, cfg 5
    world.denoising_loss(cond, class_ids, seed)  # eps-MSE on noise/timesteps fixed by seed

Sounds (chosen so that the mean-pooled features of a *random* BEATs separate them: random
BEATs is nearly blind to where in frequency a pure tone sits, so the classes differ in
time-frequency texture as well as in spectrum): 0 low hum (harmonic complex on 110-130 Hz),
1 high beeps (3.0-3.2 kHz tone pulsed at 4-6 Hz), 2 white-noise bursts, 3 rising chirps
(0.5 -> 2 kHz, repeated). Images: K mutually orthogonal, zero-mean +-1 latent patterns.

The text-to-image model is an SD1.5-architecture UNet (one level, 32 channels, context 64)
and a CLIP-L text encoder (width 64, 2 layers, real tokenizer and vocabulary), built with
ComfyUI's own classes, with random frozen CLIP and a UNet trained at build time. What makes
it follow the text:
  * v-prediction: `BaseModel(SD15 config, model_type=ModelType.V_PREDICTION)`, the model
    type ComfyUI gives SD2.x-v and v-pred SD1.5 checkpoints (same DDPM schedule). At high
    noise, where only the text can tell the class, an eps-UNet must output noise + x0/sigma
    with x0/sigma ~ 0.07 per element: this tiny net never resolves it and learns to ignore
    the text (25-33% accuracy after 300-600 steps with eps- or v-weighted losses and
    high-noise timestep bias alike). A v-UNet outputs ~ -x0 there: an O(1) class signal.
  * classifier-free-guidance training: 10% of prompts replaced by the empty prompt, so
    sampling with the empty negative and cfg > 1 amplifies the class;
  * AdamW lr 2e-3 with a cosine decay to 0 over 300 steps of batch 32, t uniform.

The flow world (`prediction="flow"`) is the same UNet and CLIP as a rectified-flow model, the
way ComfyUI runs SD3-style models: `BaseModel(..., model_type=ModelType.FLOW)`, i.e. CONST
(x_t = (1 - s) x0 + s eps; the net outputs the velocity eps - x0) with ModelSamplingDiscreteFlow
at SD3's shift 3.0 (FLOW_SHIFT). It is trained with the velocity MSE on the model's own 1000
sigmas (index t uniform), with the same recipe; like the v-UNet, a velocity net outputs an
O(1) class signal (-x0) at high noise, so it learns the text. Latents keep the SD1.5 format.

Timesteps: every `t` here is an index 0..999 into the model's own 1000 sigmas (`_sigma_at`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

K = 4
SAMPLE_RATE = 16000
WORDS = ("red", "green", "blue", "yellow")
SOUND_NAMES = ("low hum", "high beeps", "noise bursts", "rising chirps")
PROMPT = "a photo of {}"
LATENT_SHAPE = (4, 8, 8)
PREDICTIONS = ("v", "eps", "flow")  # the UNet's parameterisation = the world's native loss target
FLOW_SHIFT = 3.0  # ModelSamplingDiscreteFlow shift of the flow world: ComfyUI's SD3 sampling_settings
HELDOUT_SEED_OFFSET = 1_000_000  # train instances use seeds below this, held-out ones from it on
CLIP_WIDTH = 64
# The small random BEATs the tests use (write_placeholder_beats(path, seed, **BEATS_SMALL)).
BEATS_SMALL = dict(encoder_layers=12, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                   encoder_attention_heads=4, embed_dim=64)
_VERSION = 1  # bump when training changes, to invalidate cache_dir entries


# --------------------------------------------------------------------------- sounds


def sound_seeds(split: str, n: int) -> list[int]:
    """`n` instance seeds of a split ("train" or "heldout"); the two never overlap."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 <= n <= HELDOUT_SEED_OFFSET:
        raise ValueError(f"n must be in 0..{HELDOUT_SEED_OFFSET}, got {n}")
    base = 0 if split == "train" else HELDOUT_SEED_OFFSET
    return [base + i for i in range(n)]


def _gate(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random on/off bursts: on 0.15-0.5 s, off 0.05-0.3 s."""
    gate = np.zeros(n)
    pos = int(rng.uniform(0, 0.3) * SAMPLE_RATE)
    while pos < n:
        length = int(rng.uniform(0.15, 0.5) * SAMPLE_RATE)
        gate[pos:pos + length] = 1.0
        pos += length + int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    return gate


def make_sound(k: int, seed: int, seconds: float = 5.0) -> Tensor:
    """Instance `seed` of sound class `k` (SOUND_NAMES[k]): float32 [T] at 16 kHz in [-1, 1]."""
    if not 0 <= k < K:
        raise ValueError(f"sound class must be in 0..{K - 1}, got {k}")
    rng = np.random.default_rng([int(seed), int(k), 7919])
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if k == 0:  # low hum: 20 harmonics of 110-130 Hz with 1/h amplitudes, slow tremolo
        f = rng.uniform(110, 130)
        y = sum(np.sin(2 * np.pi * f * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 21))
        y = y * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    elif k == 1:  # high beeps: 3.0-3.2 kHz tone, 50% duty at 4-6 Hz, 5 ms ramps
        f, rate = rng.uniform(3000, 3200), rng.uniform(4, 6)
        cycle = np.mod(t * rate + rng.uniform(), 1.0)
        env = np.clip(np.minimum(cycle, 0.5 - cycle) / (0.005 * rate), 0, 1)
        y = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * env
    elif k == 2:  # white-noise bursts with random gaps
        y = rng.standard_normal(n) * _gate(rng, n)
    else:  # rising chirps: exponential sweeps ~500 Hz -> ~2 kHz every 0.4-0.9 s
        period = rng.uniform(0.4, 0.9)
        f0, f1 = rng.uniform(400, 600), rng.uniform(1800, 2200)
        tau = np.mod(t + rng.uniform(0, period), period)
        rate = math.log(f1 / f0) / period
        y = np.sin(2 * np.pi * f0 * (np.exp(rate * tau) - 1) / rate)
        y = y * np.minimum(1.0, np.minimum(tau, period - tau) / 0.01)  # click-free edges
    y = y / (np.abs(y).max() + 1e-9) * rng.uniform(0.3, 0.8)
    y = y + rng.standard_normal(n) * 0.003  # faint noise floor
    return torch.from_numpy(np.clip(y, -1.0, 1.0).astype(np.float32))


def make_sounds(k: int, seeds: Sequence[int], seconds: float = 5.0) -> Tensor:
    """[len(seeds), T] instances of class `k`."""
    return torch.stack([make_sound(k, s, seconds) for s in seeds])


def paired_data(split: str, per_class: int, seconds: float = 5.0) -> dict:
    """Audio/image pairs: `wave16` [N, T], `latents` [N, 4, 8, 8] (model space), `label` (the class
    word, so a label's CLIP embedding is the word that draws its image), `class_id` [N]."""
    seeds = sound_seeds(split, per_class)
    ids = [k for k in range(K) for _ in seeds]
    return {
        "wave16": torch.cat([make_sounds(k, seeds, seconds) for k in range(K)]),
        "latents": class_patterns()[ids],
        "label": [WORDS[k] for k in ids],
        "class_id": torch.tensor(ids),
    }


# --------------------------------------------------------------------------- audio features


@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, waves: Tensor, batch: int = 8) -> Tensor:
    """Mean over tokens of an audio encoder's features: [N, T] -> [N, F]."""
    return torch.cat([encoder(waves[i:i + batch]).mean(1) for i in range(0, len(waves), batch)])


def nearest_centroid_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Accuracy of the nearest class centroid (centroids from the train set) on the test set."""
    classes = torch.unique(train_y)
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in classes])
    pred = classes[torch.cdist(test_x.float(), centroids.float()).argmin(1)]
    return float((pred == test_y).float().mean())


# --------------------------------------------------------------------------- latents


def class_patterns() -> Tensor:
    """[K, 4, 8, 8] mutually orthogonal, zero-mean +-1 patterns (model space)."""
    c = torch.arange(4).view(4, 1, 1)
    y = torch.arange(8).view(1, 8, 1)
    x = torch.arange(8).view(1, 1, 8)
    ones = torch.ones(LATENT_SHAPE)
    sign = lambda cond: torch.where(cond, 1.0, -1.0)  # noqa: E731
    return torch.stack([
        ones * sign(c < 2),  # channels 0,1 vs 2,3
        ones * sign(c % 2 == 0),  # even vs odd channels
        ones * sign(y < 4),  # top vs bottom
        ones * sign(x < 4),  # left vs right
    ])


def class_latent(k: int) -> Tensor:
    """The [4, 8, 8] model-space latent of image class `k`."""
    return class_patterns()[k]


def classify_latent(z: Tensor) -> int | Tensor:
    """Nearest class pattern: [4, 8, 8] -> int, or [B, 4, 8, 8] -> LongTensor [B]."""
    pats = class_patterns().flatten(1)
    pred = torch.cdist(z.detach().float().cpu().reshape(-1, pats.shape[1]), pats).argmin(1)
    return int(pred[0]) if z.dim() == 3 else pred


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TrainConfig:
    """How the world's UNet is trained."""

    steps: int = 300
    batch: int = 32
    lr: float = 2e-3  # AdamW, cosine decay to 0
    uncond_prob: float = 0.1  # empty-prompt dropout (classifier-free guidance training)
    model_channels: int = 32
    prediction: str = "v"  # "v" (default) or "flow" learn the text; "eps" does not (see module doc)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"TrainConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")


def _comfy():
    """ComfyUI's `comfy` package and its `nodes` module (not this repository's `nodes` package)."""
    from tools.comfy_root import import_comfy, import_pack

    import_comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    import_pack()
    from audiotoken.nodes.eval_generator import comfy_nodes

    return comfy, comfy_nodes()


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


def init_clip_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights for a small ComfyUI CLIP text model (ComfyUI leaves them torch.empty):
    norms 1, embeddings N(0, 0.5^2), matrices fan-in scaled; the class words give clearly different contexts."""
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


def _build_clip(comfy, seed: int):
    target = comfy.supported_models.SD15({}).clip_target()
    options = {"dtype": torch.float32, "clip_l_model_config": {
        "hidden_size": CLIP_WIDTH, "intermediate_size": 2 * CLIP_WIDTH, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77}}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    init_clip_weights(clip.cond_stage_model, seed)
    return clip


def _build_unet(comfy, channels: int, prediction: str, seed: int):
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": channels, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "context_dim": CLIP_WIDTH, "num_heads": 4, "num_head_channels": -1, "use_linear_in_transformer": False,
        "use_temporal_resblock": False, "use_temporal_attention": False, "num_res_blocks": [1],
        "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1,
    }
    types = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
             "flow": comfy.model_base.ModelType.FLOW}
    if prediction not in types:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    model_config = comfy.supported_models.SD15(unet_config)
    if prediction == "flow":  # read by ModelSamplingDiscreteFlow when BaseModel builds its model_sampling
        model_config.sampling_settings = {"shift": FLOW_SHIFT, "multiplier": 1000}
    model = comfy.model_base.BaseModel(model_config, model_type=types[prediction])
    _init_unet(model.diffusion_model, seed)
    return model


def _prediction(base_model) -> str:
    """"eps", "v" or "flow" from ComfyUI's model type."""
    names = {"EPS": "eps", "V_PREDICTION": "v", "FLOW": "flow"}
    name = base_model.model_type.name
    if name not in names:
        raise ValueError(f"the world has no loss for ComfyUI model type {name}; it builds {list(names)} models")
    return names[name]


def _sigma_at(base_model, t: Tensor) -> Tensor:
    """Sigma [B] of timestep indices t (0..999) of the model's own schedule: DDPM sigmas for eps/v,
    ModelSamplingDiscreteFlow's shifted sigmas (t + 1) / 1000 for flow (never 0, where x_t = x0)."""
    ms = base_model.model_sampling
    if _prediction(base_model) == "flow":
        return ms.sigmas[t.long()]
    return ms.sigma(t)


def _x0_mse(base_model, x0: Tensor, ctx: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample MSE [B] of the denoised prediction (via ComfyUI's BaseModel.apply_model), and sigma [B]."""
    ms = base_model.model_sampling
    sigma = _sigma_at(base_model, t)
    xt = ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
    den = base_model.apply_model(xt, sigma, c_crossattn=ctx)
    return ((den - x0) ** 2).flatten(1).mean(1), sigma


def _target_weight(target: str, sigma: Tensor, prediction: str = "v") -> Tensor:
    """x0-MSE -> target MSE. DDPM models (ComfyUI's sigma space, x_t = x0 + s eps): eps = (x_t - x0)/s,
    v = (eps - s x0)/sqrt(1 + s^2). Flow models (x_t = (1 - s) x0 + s eps): velocity "flow" =
    eps - x0 = (x_t - x0)/s, eps = (x_t - (1 - s) x0)/s."""
    flow = prediction == "flow"
    if target == "x0":
        return torch.ones_like(sigma)
    if target == "eps":
        return ((1 - sigma) / sigma) ** 2 if flow else sigma ** -2
    if target == "v" and not flow:
        return (1 + sigma ** 2) / sigma ** 2
    if target == "flow" and flow:
        return sigma ** -2
    allowed = ("flow", "eps", "x0") if flow else ("eps", "v", "x0")
    raise ValueError(f"target must be one of {allowed} for a {prediction!r} model, got {target!r}")


def _as_context(conditioning: Tensor | list) -> Tensor:
    """A context tensor, one ComfyUI CONDITIONING, or a list of CONDITIONINGs -> [B, 77, D]."""
    if isinstance(conditioning, Tensor):
        return conditioning.float()
    if conditioning and isinstance(conditioning[0], list) and isinstance(conditioning[0][0], Tensor):
        return conditioning[0][0].float()
    return torch.cat([c[0][0] for c in conditioning]).float()


@dataclass
class World:
    """The frozen text-to-image model of the world and its helpers."""

    model: Any  # comfy.model_patcher.ModelPatcher (SD1.5 architecture, v-prediction by default, or flow)
    clip: Any  # comfy.sd.CLIP (CLIP-L architecture, width 64)
    words: tuple[str, ...] = WORDS
    patterns: Tensor = field(default_factory=class_patterns)  # [K, 4, 8, 8] model space
    cfg: float = 5.0
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "normal"
    train_log: dict = field(default_factory=dict)  # seconds, losses, config, cached

    @property
    def prediction(self) -> str:
        """"eps", "v" or "flow": the UNet's parameterisation (and the native loss target)."""
        return _prediction(self.model.model)

    def prompt(self, k: int) -> str:
        return PROMPT.format(self.words[k])

    def encode(self, text: str) -> list:
        """ComfyUI CONDITIONING for `text`."""
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def context(self, texts: Sequence[str]) -> Tensor:
        """Cross-attention contexts [len(texts), 77, CLIP_WIDTH]."""
        return torch.cat([self.encode(t)[0][0] for t in texts])

    def sample_many(self, positive: list, seed: int, n: int, negative: list | None = None) -> Tensor:
        """`n` samples in one `nodes.common_ksampler` call -> [n, 4, 8, 8] model-space latents.

        The negative defaults to the empty prompt (the model's trained unconditional branch).
        """
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
        """Fraction of samples drawn from "a photo of <word_k>" (noise seeds seed + k) classified as k."""
        correct = 0
        for k in range(len(self.words)):
            z = self.sample_many(self.encode(self.prompt(k)), seed + k, per_class)
            correct += int((classify_latent(z) == k).sum())
        return correct / (per_class * len(self.words))

    def denoising_loss(self, conditioning: Tensor | list, class_ids: Sequence[int], seed: int = 0,
                       repeats: int = 4, target: str = "eps") -> float:
        """Mean `target`-MSE of the class_ids' patterns under `conditioning`: "eps", "x0", and the
        native "v" (v world) or "flow" (velocity, flow world).

        `conditioning`: context [B or 1, 77, D], a ComfyUI CONDITIONING (batch B or 1), or a list
        of B CONDITIONINGs. Each item is noised `repeats` times; noise and timesteps (uniform
        over the model's 1000 sigmas) are fixed by `seed`, so conditionings compare fairly.
        """
        ctx = _as_context(conditioning)
        ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        if ctx.shape[0] == 1:
            ctx = ctx.expand(len(ids), -1, -1)
        if ctx.shape[0] != len(ids):
            raise ValueError(f"{ctx.shape[0]} conditionings for {len(ids)} class ids")
        ids, ctx = ids.repeat(repeats), ctx.repeat(repeats, 1, 1)
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (len(ids),), generator=g).float()
        noise = torch.randn(len(ids), *LATENT_SHAPE, generator=g)
        with torch.no_grad():
            mse, sigma = _x0_mse(self.model.model, self.patterns[ids], ctx.to(torch.float32), t, noise)
            return float((mse * _target_weight(target, sigma, self.prediction)).mean())


def _train(model, ctx: Tensor, empty: Tensor, patterns: Tensor, config: TrainConfig, seed: int) -> list[float]:
    """Train the UNet on (prompt k -> pattern k) with empty-prompt dropout; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    target = config.prediction  # the native target: eps, v or the flow velocity
    opt = torch.optim.AdamW(model.diffusion_model.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        k = torch.randint(0, len(patterns), (config.batch,), generator=g)
        t = torch.randint(0, 1000, (config.batch,), generator=g).float()
        noise = torch.randn(config.batch, *LATENT_SHAPE, generator=g)
        drop = torch.rand(config.batch, generator=g) < config.uncond_prob
        c = torch.where(drop.view(-1, 1, 1), empty, ctx[k])
        mse, sigma = _x0_mse(model, patterns[k], c, t, noise)
        loss = (mse * _target_weight(target, sigma, config.prediction)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


def build_world(seed: int = 0, config: TrainConfig | None = None, cfg: float = 5.0,
                cache_dir: str | Path | None = None, prediction: str | None = None) -> World:
    """Build the world's CLIP and UNet and train the UNet (deterministic on CPU for a seed and config).

    `prediction` ("v" default, "flow", "eps") is a shorthand for `TrainConfig(prediction=...)`.
    Nothing touches the disk unless `cache_dir` is given: then the trained UNet weights are
    stored there (safetensors keyed by seed, config and version) and reused on later calls.
    """
    comfy, _ = _comfy()
    if config is None:
        config = TrainConfig() if prediction is None else TrainConfig(prediction=prediction)
    elif prediction is not None and prediction != config.prediction:
        raise ValueError(f"build_world(prediction={prediction!r}) contradicts config.prediction="
                         f"{config.prediction!r}: give one of them")
    clip = _build_clip(comfy, seed * 1000 + 1)
    unet = _build_unet(comfy, config.model_channels, config.prediction, seed * 1000 + 2)
    mm = comfy.model_management
    world = World(model=comfy.model_patcher.ModelPatcher(unet, mm.get_torch_device(), mm.unet_offload_device()),
                  clip=clip, cfg=cfg)
    cache = None
    if cache_dir is not None:
        sampling = {"flow_shift": FLOW_SHIFT} if config.prediction == "flow" else {}
        key = json.dumps({"seed": seed, "config": asdict(config), "version": _VERSION, **sampling}, sort_keys=True)
        cache = Path(cache_dir) / f"learn_world_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    t0, loaded = time.time(), cache is not None and cache.is_file()
    if loaded:
        from safetensors.torch import load_file

        unet.diffusion_model.load_state_dict(load_file(str(cache)))
        unet.eval()
        losses = []
    else:
        with torch.no_grad():
            ctx = world.context([world.prompt(k) for k in range(K)])
            empty = world.context([""])
        losses = _train(unet, ctx, empty, world.patterns, config, seed * 1000 + 3)
        if cache is not None:
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in unet.diffusion_model.state_dict().items()}, str(cache))
    unet.requires_grad_(False)
    world.train_log = {"seconds": time.time() - t0, "losses": losses, "config": asdict(config), "cached": loaded}
    return world
