"""The seam between the model-agnostic trainer and a concrete text-to-image model.

The trainer only ever talks to a :class:`DiffusionBackend`. The ComfyUI adapter
implements it with ComfyUI's own model code (``nodes/comfy_backend.py``); the tests
implement it with toy modules. Keeping every model-specific detail (tokenizer, splice
of the audio vectors into the text encoder, noise schedule, eps/v target, VAE) behind
this protocol is what lets one trainer serve SD1.x, SD2.x and SDXL, in ComfyUI and
headless, on one or many GPUs.

The backend's own weights are frozen: the trainer refuses a backend that exposes
parameters with ``requires_grad=True`` (see :func:`backend_trainable_parameters`),
because they would accumulate gradients every step and could leak into the optimizer.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "DiffusionBackend",
    "check_backend",
    "backend_modules",
    "backend_trainable_parameters",
    "PREDICTION_TYPES",
]

PREDICTION_TYPES = ("eps", "v")


@runtime_checkable
class DiffusionBackend(Protocol):
    widths: dict[str, int]                       # text-encoder key -> word-embedding width
    prediction: str                              # "eps" or "v"

    def encode_prompt(self, text: str, placeholder: str, vectors: dict[str, Tensor]) -> object:
        """Conditioning for a batch ([B, D] per key), differentiable w.r.t. the vectors."""

    def diffusion_loss(self, latents: Tensor, cond: object, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Per-sample denoising MSE [B] at DDPM timesteps (0..999), eps or v target."""

    def label_targets(self, labels: list[str]) -> dict[str, Tensor]:
        """Mean input word embedding of each label's tokens (no start/end) per key, [B, D]."""

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> latents as the diffusion model consumes them."""


_METHODS = ("encode_prompt", "diffusion_loss", "label_targets", "encode_images")


def check_backend(backend: object) -> None:
    """Raise TypeError/ValueError naming what a backend object lacks or gets wrong."""
    missing = [m for m in _METHODS if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(
            f"{type(backend).__name__} is not a DiffusionBackend: it lacks the method(s) "
            f"{', '.join(missing)} (see audiotoken_core/training/backend.py)"
        )
    widths = getattr(backend, "widths", None)
    if (
        not isinstance(widths, dict)
        or not widths
        or not all(isinstance(k, str) and isinstance(w, int) and w > 0 for k, w in widths.items())
    ):
        raise ValueError(
            f"{type(backend).__name__}.widths must be a non-empty dict of text-encoder key -> "
            f"positive width, e.g. {{'l': 768}}; got {widths!r}"
        )
    prediction = getattr(backend, "prediction", None)
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"{type(backend).__name__}.prediction must be one of {PREDICTION_TYPES}, got {prediction!r}"
        )


def backend_modules(backend: object) -> list[tuple[str, nn.Module]]:
    """The torch modules a backend holds: itself if it is one, else its nn.Module attributes."""
    if isinstance(backend, nn.Module):
        return [(type(backend).__name__, backend)]
    found = []
    for name, value in sorted(vars(backend).items()) if hasattr(backend, "__dict__") else []:
        if isinstance(value, nn.Module):
            found.append((name, value))
    return found


def backend_trainable_parameters(backend: object) -> list[str]:
    """Names of backend parameters that require grad (they must not; the backend is frozen)."""
    names = []
    for module_name, module in backend_modules(backend):
        for name, param in module.named_parameters():
            if param.requires_grad:
                names.append(f"{module_name}.{name}")
    return names
