"""The AudioToken training objective (paper eqs. 2, 8 and 9).

    loss = E_t,eps || target - model(x_t, t, cond(e_audio)) ||^2          (eq. 2, by the backend)
         + lambda_l1 * mean |e_audio|                                     (eq. 8)
         + lambda_cl * mean (1 - cos(e_audio, label_target))^2            (eq. 9, optional)

with t ~ U{0..999} (DDPM) and eps ~ N(0, I).

Randomness is counter based: the timestep and noise of the sample with global index
``i`` come from a ``torch.Generator`` seeded with ``sample_seed(seed, i)``. A batch of 4
therefore draws exactly what two accumulated batches of 2, or two data-parallel ranks
with 2 each, draw; and a resumed run draws what the uninterrupted run drew, without
having to carry generator state around.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "sample_seed",
    "sample_timesteps_and_noise",
    "per_sample_timesteps_and_noise",
    "l1_penalty",
    "classification_loss",
    "ObjectiveTerms",
    "compute_objective",
    "audiotoken_loss",
]

NUM_TRAIN_TIMESTEPS = 1000
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (e.g. run seed, stream id, index)."""
    x = 0
    for value in values:
        x = _splitmix64(x ^ (int(value) & _MASK64))
    return x & ((1 << 63) - 1)


def sample_timesteps_and_noise(
    latents: Tensor, generator: torch.Generator, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[Tensor, Tensor]:
    """t ~ U{0..num_timesteps-1} [B] (long) then eps ~ N(0, I) like ``latents``, both from ``generator``.

    The generator is a CPU generator (so the draws are the same on every device); the
    results are moved to the latents' device, noise in float32.
    """
    b = latents.shape[0]
    t = torch.randint(0, num_timesteps, (b,), generator=generator, dtype=torch.long)
    noise = torch.randn(tuple(latents.shape), generator=generator, dtype=torch.float32)
    return t.to(latents.device), noise.to(latents.device)


def per_sample_timesteps_and_noise(
    latents: Tensor, seed: int, first_index: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[Tensor, Tensor]:
    """Timesteps and noise for samples ``first_index .. first_index + B - 1`` of a run.

    Sample ``i`` uses its own generator seeded with ``sample_seed(seed, i)``, so the
    draws do not depend on how samples are grouped into batches, accumulation steps or
    data-parallel ranks.
    """
    ts, noises = [], []
    generator = torch.Generator(device="cpu")
    for offset in range(latents.shape[0]):
        generator.manual_seed(sample_seed(seed, 0x6E6F697365, first_index + offset))  # "noise"
        t, noise = sample_timesteps_and_noise(latents[offset : offset + 1], generator, num_timesteps)
        ts.append(t)
        noises.append(noise)
    return torch.cat(ts), torch.cat(noises)


def _check_vectors(vectors: Mapping[str, Tensor]) -> None:
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("the objective needs the audio vectors as a non-empty dict {key: [B, D]}")
    for key, v in vectors.items():
        if not isinstance(v, Tensor) or v.dim() != 2:
            shape = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"audio vector {key!r} must be a [B, D] tensor, got {shape}")


def l1_penalty(vectors: Mapping[str, Tensor]) -> Tensor:
    """mean |e_audio| over every element of every key's [B, D] vectors (eq. 8), float32.

    With several keys (SDXL: l 768 + g 1280) this is the mean over all 2048 numbers of a
    sample, i.e. keys weigh by their width; with one key it is the reference's term.
    """
    _check_vectors(vectors)
    return torch.cat([v.float().abs().reshape(-1) for v in vectors.values()]).mean()


def classification_loss(vectors: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """mean over batch and keys of (1 - cos(e_audio, label_target))^2 (eq. 9), float32."""
    _check_vectors(vectors)
    if set(targets) != set(vectors):
        raise ValueError(
            f"label targets have keys {sorted(targets)} but the audio vectors have {sorted(vectors)}; "
            "DiffusionBackend.label_targets must return one [B, D] target per text-encoder key"
        )
    terms = []
    for key, v in vectors.items():
        target = targets[key]
        if tuple(target.shape) != tuple(v.shape):
            raise ValueError(
                f"label target {key!r} has shape {list(target.shape)}, expected {list(v.shape)} like the audio vector"
            )
        cos = F.cosine_similarity(v.float(), target.to(device=v.device, dtype=torch.float32), dim=-1)
        terms.append(((1.0 - cos) ** 2).mean())
    return torch.stack(terms).mean()


@dataclass
class ObjectiveTerms:
    """The loss to backpropagate and its detached, unweighted parts (tensors: no GPU sync)."""

    total: Tensor
    diffusion: Tensor
    l1: Tensor
    cl: Tensor

    def parts(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "diffusion": float(self.diffusion),
            "l1": float(self.l1),
            "cl": float(self.cl),
        }


def compute_objective(
    backend,
    latents: Tensor,
    cond: object,
    vectors: Mapping[str, Tensor],
    timesteps: Tensor,
    noise: Tensor,
    *,
    lambda_l1: float,
    lambda_cl: float = 0.0,
    label_targets: Mapping[str, Tensor] | None = None,
) -> ObjectiveTerms:
    """Diffusion loss (mean over the batch) + lambda_l1 * L1 (+ lambda_cl * CL when > 0)."""
    per_sample = backend.diffusion_loss(latents, cond, timesteps, noise)
    if not isinstance(per_sample, Tensor) or tuple(per_sample.shape) != (latents.shape[0],):
        shape = list(per_sample.shape) if isinstance(per_sample, Tensor) else type(per_sample).__name__
        raise ValueError(
            f"{type(backend).__name__}.diffusion_loss must return a per-sample loss of shape "
            f"[{latents.shape[0]}], got {shape}"
        )
    diffusion = per_sample.float().mean()
    l1 = l1_penalty(vectors)
    total = diffusion + float(lambda_l1) * l1
    if lambda_cl > 0:
        if label_targets is None:
            raise ValueError("lambda_cl > 0 needs label targets (batches must carry 'label')")
        cl = classification_loss(vectors, label_targets)
        total = total + float(lambda_cl) * cl
    else:
        cl = torch.zeros((), device=diffusion.device)
    return ObjectiveTerms(total=total, diffusion=diffusion.detach(), l1=l1.detach(), cl=cl.detach())


def audiotoken_loss(
    backend,
    latents: Tensor,
    cond: object,
    vectors: Mapping[str, Tensor],
    generator: torch.Generator,
    *,
    lambda_l1: float = 0.01,
    lambda_cl: float = 0.0,
    labels: Sequence[str] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One-call objective: draws t and noise from ``generator``; returns (total, parts as floats).

    ``labels`` are needed only when ``lambda_cl > 0`` (their targets come from
    ``backend.label_targets``, computed without gradient).
    """
    timesteps, noise = sample_timesteps_and_noise(latents, generator)
    targets = None
    if lambda_cl > 0:
        if labels is None:
            raise ValueError("lambda_cl > 0 needs labels for the classification loss")
        with torch.no_grad():
            targets = backend.label_targets(list(labels))
    terms = compute_objective(
        backend, latents, cond, vectors, timesteps, noise,
        lambda_l1=lambda_l1, lambda_cl=lambda_cl, label_targets=targets,
    )
    return terms.total, terms.parts()
