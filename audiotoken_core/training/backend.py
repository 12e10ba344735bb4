"""The seam between the model-agnostic trainer and a concrete text-to-image model.

The trainer only ever talks to a :class:`DiffusionBackend`. The ComfyUI adapter
implements it with ComfyUI's own model code (``nodes/comfy_backend.py``); the tests
implement it with toy modules. Keeping every model-specific detail (tokenizer, splice
of the audio vectors into the text encoder, noise schedule, eps/v/flow target, VAE) behind
this protocol is what lets one trainer serve SD1.x, SD2.x, SDXL and the flow-matching
families (SD3.x, Flux.1, Wan 2.x, Qwen-Image...), in ComfyUI and headless, on one or many GPUs.

A backend's own weights are frozen (``requires_grad=False``): only the Embedders train.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["DiffusionBackend"]


@runtime_checkable
class DiffusionBackend(Protocol):
    widths: dict[str, int]                       # text-encoder key -> word-embedding width
    prediction: str                              # "eps", "v" or "flow"

    def encode_prompt(self, text: str, placeholder: str, vectors: dict[str, Tensor]) -> object:
        """Conditioning for a batch ([B, D] per key), differentiable w.r.t. the vectors."""

    def diffusion_loss(self, latents: Tensor, cond: object, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Per-sample denoising MSE [B] at the trainer's draws t in 0..999, in the model's target space.

        eps / v models: DDPM timestep t, target eps or v. Flow models: sigma from
        u = (t + 1/2) / 1000 through the model's own schedule (objective.timestep_fraction),
        x_t = (1 - sigma) x0 + sigma eps, target the velocity eps - x0. ``latents`` and
        ``noise`` have the model's latent layout ([B, C, h, w], or [B, C, T, h, w] for video)."""

    def label_targets(self, labels: list[str]) -> dict[str, Tensor]:
        """Mean input word embedding of each label's tokens (no start/end) per key, [B, D]."""

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> latents as the diffusion model consumes them (video models:
        one 1-frame clip per image, [B, C, 1, h, w])."""
