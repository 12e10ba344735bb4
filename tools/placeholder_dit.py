"""Tiny diffusion transformers and VAEs of the newer families (Flux, SD3, Wan, Qwen-Image, ...).

There are no real weights on our machines, so tests build these with random weights from
ComfyUI's OWN model classes (`comfy.supported_models` configs, `comfy.model_base` models):
every code path of sampling, conditioning and decoding is ComfyUI's real one.

Two sizes:
- `tiny_model(family, context_dim, pooled_dim=None, seed=0)`: in-process, as small as the
  architecture allows (a few hundred thousand parameters), text widths as you ask. For
  training tests that go through the model directly.
- `write_placeholder_diffusion_model(...)` / `write_placeholder_vae(...)`: files that ComfyUI's
  loaders (UNETLoader -> `comfy.sd.load_diffusion_model`, VAELoader -> `comfy.sd.VAE`) detect
  as that family, at the smallest shapes detection accepts in ComfyUI 0.3.75 AND current
  upstream. Detection reads some widths from fixed tables rather than from the weights, so a
  few families are big even at one block (see DETECTION_LIMITS).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from .comfy_root import import_comfy

# Families: name -> the comfy.supported_models config class ComfyUI uses for it.
FAMILY_CLASSES = {
    "flux": "Flux",
    "sd3": "SD3",
    "wan": "WAN21_T2V",
    "qwen_image": "QwenImage",
    "chroma": "Chroma",
    "z_image": "ZImage",
    "lumina2": "Lumina2",
}
NO_POOLED = frozenset({"wan", "qwen_image", "chroma", "z_image", "lumina2"})  # no pooled text vector input
FILE_FAMILIES = ("flux", "sd3", "wan", "qwen_image")
VAE_FAMILIES = {"flux": "ae16", "sd3": "ae16", "chroma": "ae16", "wan": "wan21", "qwen_image": "wan21"}

# What ComfyUI's detection fixes instead of reading it from the weights (0.3.75 and upstream):
# Flux: 24 heads with rotary axes [16, 56, 56] (head width 128) -> hidden size 3072.
# Wan 2.1: heads = dim // 128, and the text projection width is always 4096 (umT5-XXL).
# Qwen-Image: 24 heads of 128 and text width 3584 (Qwen2.5-VL-7B) are fixed.
DETECTION_LIMITS = {"wan": {"context_dim": 4096}, "qwen_image": {"context_dim": 3584}}


def _tiny_config(family: str, context_dim: int, pooled_dim: int | None) -> dict:
    """unet_config for an in-process model: smallest widths, text widths as asked."""
    if family == "flux":  # Flux.1-dev: guidance embedding, CLIP-L pooled vector, T5 context
        return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_dim,
                "context_in_dim": context_dim, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                "qkv_bias": True, "guidance_embed": True}
    if family == "chroma":  # Flux-shaped, no pooled vector: a distilled guidance network modulates instead
        return {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": context_dim,
                "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                "out_dim": 64, "hidden_dim": 64, "n_layers": 1}
    if family == "sd3":
        return _sd3_config(context_dim, pooled_dim)
    if family == "wan":
        return _wan_config(context_dim, dim=64, heads=2)
    if family == "qwen_image":
        return {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
                "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": context_dim,
                "axes_dims_rope": (8, 12, 12)}
    if family in ("z_image", "lumina2"):  # NextDiT; Z-Image's modulation reads 256 wide: dim >= 256
        z_image = family == "z_image"
        return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256 if z_image else 64,
                "n_layers": 1, "n_refiner_layers": 1, "n_heads": 8 if z_image else 2,
                "n_kv_heads": 8 if z_image else 1, "multiple_of": 16,
                "ffn_dim_multiplier": 8.0 / 3.0 if z_image else 4.0, "norm_eps": 1e-5, "qk_norm": True,
                "cap_feat_dim": context_dim, "axes_dims": [8, 12, 12], "axes_lens": [1024, 64, 64],
                "rope_theta": 256.0 if z_image else 10000.0, "z_image_modulation": z_image,
                "time_scale": 1000.0 if z_image else 1.0}
    raise ValueError(f"Unknown family '{family}': choose one of {sorted(FAMILY_CLASSES)}.")


def _fit_params(family: str, config: dict) -> dict:
    """Add the fields that newer ComfyUI requires and 0.3.75 rejects (Flux's `txt_ids_dims`, Chroma's
    `vec_in_dim`) when the installed model's params dataclass declares them."""
    if family == "flux":
        from comfy.ldm.flux.model import FluxParams as params
    elif family == "chroma":
        from comfy.ldm.chroma.model import ChromaParams as params
    else:
        return config
    declared = {field.name for field in dataclasses.fields(params)}
    newer = {"txt_ids_dims": [], "vec_in_dim": None}
    return {**config, **{k: v for k, v in newer.items() if k in declared and k not in config}}


def _sd3_config(context_dim: int, pooled_dim: int | None) -> dict:
    """MMDiT as detection reads it: hidden = 64 x depth, one head per 64; SD3.5-style RMS q/k norm."""
    depth = 2
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": pooled_dim, "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": context_dim, "out_features": 64 * depth}}}


def _wan_config(context_dim: int, dim: int, heads: int) -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": dim, "out_dim": 16, "num_heads": heads,
            "ffn_dim": 2 * dim, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
            "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": context_dim}


def _detectable_config(family: str, context_dim: int, pooled_dim: int | None) -> dict:
    """unet_config equal to what ComfyUI's detection derives from the file we write."""
    need = DETECTION_LIMITS.get(family, {}).get("context_dim")
    if need is not None and context_dim != need:
        raise ValueError(
            f"ComfyUI detects a {family} diffusion model with a fixed text width of {need}, but context_dim is "
            f"{context_dim}. Use a text encoder whose output is {need} wide, or tiny_model() in-process.")
    if family == "flux":  # hidden 3072 is forced by detection; one double block, no single blocks
        if pooled_dim is None:
            raise ValueError("ComfyUI 0.3.75 detects Flux only with a pooled vector input (vector_in): pass the "
                             "CLIP-L pooled width as pooled_dim.")
        return dict(_tiny_config("flux", context_dim, pooled_dim), hidden_size=3072, num_heads=24,
                    axes_dim=[16, 56, 56], depth=1, depth_single_blocks=0)
    if family == "sd3":
        return _sd3_config(context_dim, pooled_dim)
    if family == "wan":
        return _wan_config(context_dim, dim=128, heads=1)
    if family == "qwen_image":  # 24 x 128 heads and 3584-wide text are fixed by detection
        return {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1}
    raise ValueError(f"No detectable placeholder file for family '{family}': choose one of {list(FILE_FAMILIES)}.")


_TILE = 1_000_003  # a prime: tiled noise never lines up with a row length


def _noise_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill `tensor` with N(0, std) noise. Tensors larger than _TILE get one random tile repeated from a
    random offset (memory-bound instead of generator-bound: the 0.7 GB Flux file in seconds, not a
    minute); a prime tile length means no two rows of a matrix are equal."""
    if tensor.numel() <= _TILE:
        tensor.normal_(0.0, std, generator=generator)
        return
    tile = torch.randn(_TILE, generator=generator) * std
    start = int(torch.randint(_TILE, (1,), generator=generator))
    tile = torch.cat([tile[start:], tile[:start]]).to(tensor.dtype)
    flat = tensor.view(-1)
    for begin in range(0, flat.numel(), _TILE):
        chunk = flat[begin:begin + _TILE]
        chunk.copy_(tile[:chunk.numel()])


def _init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI layers skip weight init (torch.empty): give every tensor a deterministic sane value.

    Norm layers (found by class name: LayerNorm, RMSNorm, RMS_norm, QKNorm's parts, ...) get
    scale 1 and shift 0; biases 0; other vectors small noise; matrices fan-in scaled noise, so
    the output really depends on the latent, the timestep and the text. `pos_embed` buffers
    (MMDiT allocates them empty) get small noise too.
    """
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, tensor in sub.named_parameters(recurse=False):
                if is_norm:
                    tensor.fill_(0.0 if name == "bias" else 1.0)
                elif name == "bias":
                    tensor.zero_()
                elif tensor.dim() <= 1:
                    _noise_(tensor, 0.02, generator)
                else:
                    _noise_(tensor, 1.0 / math.sqrt(max(1, tensor[0].numel())), generator)
            for name, buf in sub.named_buffers(recurse=False):
                if name == "pos_embed" and buf.is_floating_point():
                    _noise_(buf, 0.02, generator)


def _build(family: str, unet_config: dict, seed: int, dtype: torch.dtype, device=None):
    """ComfyUI's own model_base model for `family` from `unet_config`, weights initialised from `seed`."""
    import_comfy()
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, FAMILY_CLASSES[family])
    model_config = config_class(_fit_params(family, unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    _init_(model.diffusion_model, torch.Generator().manual_seed(seed))
    return model.eval()


def _check_widths(family: str, context_dim, pooled_dim) -> None:
    if family not in FAMILY_CLASSES:
        raise ValueError(f"Unknown family '{family}': choose one of {sorted(FAMILY_CLASSES)}.")
    if not isinstance(context_dim, int) or context_dim <= 0:
        raise ValueError(f"context_dim must be a positive int (the text encoder's cond width), got {context_dim!r}.")
    if pooled_dim is not None and (not isinstance(pooled_dim, int) or pooled_dim <= 0):
        raise ValueError(f"pooled_dim must be None or a positive int (the pooled output width), got {pooled_dim!r}.")
    if pooled_dim is not None and family in NO_POOLED:
        raise ValueError(f"A {family} model takes no pooled text vector: pass pooled_dim=None.")


def tiny_model(family: str, context_dim: int, pooled_dim: int | None = None, seed: int = 0):
    """A tiny random diffusion model of `family` as a `comfy.model_patcher.ModelPatcher` (float32, CPU).

    tiny_model(family, context_dim, pooled_dim=None, seed=0) -> ModelPatcher
      family: "flux" (Flux.1-dev: guidance embedding; `pooled_dim` = CLIP-L pooled width, None = no vector_in),
              "sd3" (MMDiT with SD3.5's RMS q/k norm; `pooled_dim` = pooled width, None = no y embedder),
              "wan" (Wan 2.1 T2V: 5-D latents [B, 16, T, H, W]), "qwen_image", "chroma" (Flux-shaped,
              distilled guidance), "z_image", "lumina2" (NextDiT): these five take no pooled vector
              (pooled_dim must be None).
      context_dim: width of the text encoder's cond (cond.shape[-1]).
    Same family, widths and seed give identical weights. `patcher.model` is the `comfy.model_base` model:
    `patcher.model.apply_model(x, sigma, c_crossattn=cond, y=pooled, guidance=...)`,
    `patcher.model.model_sampling`, `patcher.model.latent_format`.
    """
    import_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher

    _check_widths(family, context_dim, pooled_dim)
    model = _build(family, _tiny_config(family, context_dim, pooled_dim), seed, torch.float32)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_diffusion_state_dict(family: str, context_dim: int, pooled_dim: int | None = None, seed: int = 0,
                               dtype: torch.dtype = torch.float16, device=None) -> dict[str, torch.Tensor]:
    """The diffusion model's state dict (no prefix, as in a ComfyUI `diffusion_models/` file).
    device="meta" gives the names and shapes only (enough for ComfyUI's detection), instantly."""
    _check_widths(family, context_dim, pooled_dim)
    model = _build(family, _detectable_config(family, context_dim, pooled_dim), seed, dtype, device)
    return {k: v.detach().to(dtype).contiguous() for k, v in model.diffusion_model.state_dict().items()}


def write_placeholder_diffusion_model(family: str, path: str | Path, context_dim: int, pooled_dim: int | None = None,
                                      seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random diffusion model `.safetensors` that UNETLoader detects as `family`.

    Sizes in fp16: sd3 3 MB, wan 1 MB; flux (hidden 3072, one double block) 0.77 GB;
    qwen_image (one block of 3072, text width 3584) 0.73 GB.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_diffusion_state_dict(family, context_dim, pooled_dim, seed, dtype)
    save_file(state, str(path), metadata={"note": f"random placeholder {family} weights made by AudioToken tools"})
    return path


def _vae_model(kind: str):
    """ComfyUI's own VAE module for `kind`, with the shapes its VAE detection expects."""
    import_comfy()
    if kind == "ae16":  # Flux / SD3 autoencoder: SD VAE layout with 16 latent channels, no quant convs
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        return AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    if kind == "wan21":  # Wan 2.1 VAE (Qwen-Image uses the same one); detection reads `dim` from the weights
        from comfy.ldm.wan.vae import WanVAE

        return WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
    raise ValueError(f"Unknown VAE kind '{kind}'.")


def write_placeholder_vae(family: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random VAE `.safetensors` that VAELoader detects as `family`'s VAE.

    flux / sd3 / chroma: the 16-channel autoencoder (detection fixes its widths: 84M parameters, 160 MB);
    wan / qwen_image: the Wan 2.1 video VAE at base width 16 (6 MB).
    """
    from safetensors.torch import save_file

    if family not in VAE_FAMILIES:
        raise ValueError(f"No placeholder VAE for family '{family}': choose one of {sorted(VAE_FAMILIES)}.")
    model = _vae_model(VAE_FAMILIES[family])
    _init_(model, torch.Generator().manual_seed(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(state, str(path), metadata={"note": f"random placeholder {family} VAE made by AudioToken tools"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["model", "vae"])
    parser.add_argument("family", choices=sorted(FAMILY_CLASSES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--context-dim", type=int, default=4096, help="text encoder cond width")
    parser.add_argument("--pooled-dim", type=int, default=None, help="pooled text width (flux, sd3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "vae":
        print(write_placeholder_vae(args.family, args.output, seed=args.seed))
    else:
        print(write_placeholder_diffusion_model(args.family, args.output, args.context_dim, args.pooled_dim,
                                                seed=args.seed))


if __name__ == "__main__":
    main()
