"""Session assets for the newer model families (Flux, SD3, Wan, Qwen-Image) in the real ComfyUI server.

Diffusion models and VAEs are random files that ComfyUI's own loaders detect as that family
(tools/placeholder_dit.py); text encoders are tiny in-process CLIPs (tools/tiny_text_encoders.py,
served by the test node AudioTokenTest_TinyCLIP) because full-size T5-XXL / LLMs cannot be built
here. The diffusion model's text-input widths are read from one encode of that tiny CLIP, and
each family gets a random AudioToken with one Embedder per key of its CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from comfy_fixtures import _token

from audiotoken_core.token_file import save_audiotoken


@dataclass(frozen=True)
class FamilyAssets:
    family: str
    unet: str | None  # file under models/diffusion_models, None = in-process tiny model (AudioTokenTest_TinyModel)
    vae: str  # file under models/vae
    token: str  # file under models/audiotoken
    widths: dict  # token key -> input word-embedding width of the tiny CLIP
    context_dim: int  # cond.shape[-1] of the tiny CLIP
    pooled_dim: int | None  # pooled_output.shape[-1], None when the CLIP has no pooled output


VAES = {"flux": "ae16_tiny.safetensors", "sd3": "ae16_tiny.safetensors", "wan": "wan21_vae_tiny.safetensors",
        "qwen_image": "wan21_vae_tiny.safetensors"}
DETECTED = ("sd3", "wan", "flux")  # written as files: ComfyUI's detection accepts them at these widths
IN_PROCESS = ("qwen_image",)  # detection fixes a 3584-wide text input; the tiny Qwen CLIP is narrower


def clip_widths_of(clip) -> tuple[dict[str, int], int, int | None]:
    """(input embedding width per token key, cond width, pooled width) of a tiny CLIP, from the model itself."""
    from tools.tiny_text_encoders import text_encoders

    widths = {key: int(enc.transformer.get_input_embeddings().weight.shape[1])
              for key, enc in text_encoders(clip).items()}
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a dog"), return_pooled=True)
    return widths, int(cond.shape[-1]), (None if pooled is None else int(pooled.shape[-1]))


@pytest.fixture(scope="session")
def family_models(comfy):
    """{family: FamilyAssets}; the files are in the session server's models folders."""
    from tools.placeholder_dit import (
        write_placeholder_diffusion_model,
        write_placeholder_vae,
    )
    from tools.tiny_text_encoders import tiny_clip

    models = comfy.base / "models"
    assets = {}
    for i, family in enumerate(DETECTED + IN_PROCESS):
        widths, context_dim, pooled_dim = clip_widths_of(tiny_clip(family, 0))
        unet = None
        if family in DETECTED:
            unet = f"{family}_tiny.safetensors"
            write_placeholder_diffusion_model(family, models / "diffusion_models" / unet, context_dim, pooled_dim,
                                              seed=20 + i)
        vae = models / "vae" / VAES[family]
        if not vae.exists():
            write_placeholder_vae(family, vae, seed=30 + i)
        token = f"token_{family}.safetensors"
        save_audiotoken(models / "audiotoken" / token, _token(widths, seed=40 + i))
        assets[family] = FamilyAssets(family, unet, VAES[family], token, widths, context_dim, pooled_dim)
    yield assets
    # pytest keeps the last three sessions' folders: do not keep these 1.6 GB (Flux 0.77 GB, the AE, 4096-wide tokens)
    for a in assets.values():
        written = [models / "vae" / a.vae, models / "audiotoken" / a.token]
        if a.unet is not None:
            written.append(models / "diffusion_models" / a.unet)
        for path in written:
            path.unlink(missing_ok=True)
