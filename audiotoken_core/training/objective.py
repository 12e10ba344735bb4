"""The AudioToken training objective (paper eqs. 2, 8 and 9).

    loss = E_t,eps || target - model(x_t, t, cond(e_audio)) ||^2          (eq. 2, by the backend)
         + lambda_l1 * mean |e_audio|                                     (eq. 8)
         + lambda_cl * mean (1 - cos(e_audio, label_target))^2            (eq. 9, optional)

with t ~ U{0..999} and eps ~ N(0, I). The backend turns t into the model's noise level and
computes the first term in the model's own target space:

* eps prediction (SD1.x, SDXL): DDPM timestep t, target eps;
* v prediction (SD2.x 768-v): DDPM timestep t, target v = sqrt(a) eps - sqrt(1 - a) x0;
* flow (rectified flow: SD3.x, Flux.1, Wan 2.x, Qwen-Image...): u = (t + 1/2) / 1000
  (``timestep_fraction``), sigma = the model's own percent_to_sigma(1 - u) (its time shift),
  x_t = (1 - sigma) x0 + sigma eps, target the velocity eps - x0.

Randomness is counter based: the timestep and noise of the sample with global index
``i`` come from a ``torch.Generator`` seeded with ``sample_seed(seed, i)``. A batch of 4
therefore draws exactly what two accumulated batches of 2, or two data-parallel ranks
with 2 each, draw; and a resumed run draws what the uninterrupted run drew, without
having to carry generator state around. Latents of any rank (video [B, C, T, h, w]) get
noise of their own shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "sample_seed",
    "sample_timesteps_and_noise",
    "per_sample_timesteps_and_noise",
    "timestep_fraction",
    "l1_penalty",
    "classification_loss",
    "ObjectiveTerms",
    "compute_objective",
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


def timestep_fraction(timesteps: Tensor, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """u = (t + 1/2) / num_timesteps in (0, 1), float64 [B]: the midpoints of num_timesteps equal
    bins, so a flow model sees noise levels spread over (0, 1) and never exactly 0 or 1."""
    return (timesteps.detach().to("cpu", torch.float64) + 0.5) / float(num_timesteps)


def l1_penalty(vectors: Mapping[str, Tensor]) -> Tensor:
    """mean |e_audio| over every element of every key's [B, D] vectors (eq. 8), float32.

    With several keys (SDXL: l 768 + g 1280) this is the mean over all 2048 numbers of a
    sample, i.e. keys weigh by their width; with one key it is the reference's term.
    """
    return torch.cat([v.float().abs().reshape(-1) for v in vectors.values()]).mean()


def classification_loss(vectors: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """mean over batch and keys of (1 - cos(e_audio, label_target))^2 (eq. 9), float32."""
    terms = []
    for key, v in vectors.items():
        cos = F.cosine_similarity(v.float(), targets[key].to(device=v.device, dtype=torch.float32), dim=-1)
        terms.append(((1.0 - cos) ** 2).mean())
    return torch.stack(terms).mean()


@dataclass
class ObjectiveTerms:
    """The loss to backpropagate and its detached, unweighted parts (tensors: no GPU sync)."""

    total: Tensor
    diffusion: Tensor
    l1: Tensor
    cl: Tensor


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
    diffusion = backend.diffusion_loss(latents, cond, timesteps, noise).float().mean()
    l1 = l1_penalty(vectors)
    total = diffusion + float(lambda_l1) * l1
    if lambda_cl > 0:
        cl = classification_loss(vectors, label_targets)
        total = total + float(lambda_cl) * cl
    else:
        cl = torch.zeros((), device=diffusion.device)
    return ObjectiveTerms(total=total, diffusion=diffusion.detach(), l1=l1.detach(), cl=cl.detach())
