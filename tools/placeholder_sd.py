"""Generate Stable Diffusion 1.5- and SDXL-shaped checkpoints with random weights.

There are no real SD weights on our machines, so tests, the demo and the benchmarks build
checkpoints that ComfyUI's own loader detects as SD1.5: the real CLIP-L text encoder and
VAE shapes, and either a one-level UNet (`tiny`, about 440 MiB in fp16, for tests) or
the full SD1.5 UNet (`full`, the real 860M parameters, for benchmarks). The weights are
random, so images are noise; what matters is that every code path is the real one.

`write_placeholder_sdxl` makes the SDXL counterpart: ComfyUI detects it as an SDXL-family
model (the KOALA-700M block pattern, which ComfyUI lists as an SDXL model with CLIP-G +
CLIP-L, but 320 channels at every level: 82M UNet parameters), with full-size CLIP-L and
OpenCLIP-bigG text encoders (ComfyUI builds them from fixed configs, so they cannot be
smaller) and the SD VAE: 1.83 GiB in fp16, written in about 12 s on 2 CPU cores (peak 2.8 GiB RAM).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .comfy_root import import_comfy

UNET_CONFIGS = {
    "tiny": {
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1,
    },
    "full": {
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
    },
}
SD15_UNET_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
SD15_VAE_CONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def _init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI layers skip weight init (torch.empty): give every tensor a sane random value.

    Norm layers are found by type (the UNet's GroupNorms are named `in_layers.0` etc.):
    scale 1, shift 0. Other weights get fan-in scaled noise and biases zero, so the UNet's
    output really depends on its inputs and on the text.
    """
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for sub in module.modules():
            for name, tensor in sub.named_parameters(recurse=False):
                if isinstance(sub, norms):
                    tensor.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or tensor.dim() <= 1:
                    tensor.zero_()
                else:
                    fan_in = max(1, tensor[0].numel())
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))


SDXL_UNET_CONFIG = {  # detected by ComfyUI 0.3.75 and current upstream as KOALA_700M, an SDXL-family model
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True,
    "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1], "transformer_depth": [0, 2, 5],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
}


def _random_clip_(state: dict[str, torch.Tensor], generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random values for a ComfyUI CLIP text-model state dict built on the meta device.

    CLIP's own init scales: embeddings N(0, 0.02), norms 1/0, biases 0, linear layers
    N(0, 1/fan_in), divided by sqrt(2 x layers) inside the encoder so the residual stream stays bounded.
    """
    depth: dict[str, int] = {}
    for key in state:
        if ".encoder.layers." in key:
            head, rest = key.split(".encoder.layers.", 1)
            depth[head] = max(depth.get(head, 0), int(rest.split(".", 1)[0]) + 1)
    out = {}
    for key, meta in state.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("logit_scale"):
            out[key] = torch.tensor(math.log(100.0))
        elif "norm" in module.rsplit(".", 1)[-1]:
            out[key] = torch.full(meta.shape, 1.0 if key.endswith(".weight") else 0.0, dtype=dtype)
        elif key.endswith(".bias"):
            out[key] = torch.zeros(meta.shape, dtype=dtype)
        else:
            std = 0.02 if ".embeddings." in key else 1.0 / math.sqrt(meta.shape[-1])
            if ".encoder.layers." in key:
                std /= math.sqrt(2.0 * depth[key.split(".encoder.layers.", 1)[0]])
            out[key] = torch.randn(meta.shape, generator=generator, dtype=dtype).mul_(std)
    return out


def build_sdxl_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A full SDXL-format state dict (`model.diffusion_model.`, `conditioner.embedders.{0,1}.`, `first_stage_model.`)."""
    import_comfy()
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    unet_model = UNetModel(**SDXL_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    _init_(unet_model, generator)
    for k, v in unet_model.state_dict().items():
        state["model.diffusion_model." + k] = v.to(dtype)
    del unet_model
    vae = AutoencoderKL(ddconfig=SD15_VAE_CONFIG, embed_dim=4)  # SDXL's VAE has the SD1.x shapes
    _init_(vae, generator)
    for k, v in vae.state_dict().items():
        state["first_stage_model." + k] = v.to(dtype)
    del vae
    # ComfyUI's own SDXL text encoders (CLIP-L + OpenCLIP-bigG) on the meta device give the names and shapes;
    # the model config then renames them to the layout of a real SDXL checkpoint (open_clip keys for bigG).
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=dtype)
    clip_state = _random_clip_(clip.state_dict(), generator, dtype)
    config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    state.update(config.process_clip_state_dict_for_saving(clip_state))
    return state


def write_placeholder_sdxl(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random SDXL-family `.safetensors` checkpoint that ComfyUI detects as SDXL (clip_g + clip_l)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_sdxl_state_dict(seed=seed, dtype=dtype)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and v.dim() else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"note": "random placeholder weights made by AudioToken tools"})
    return path


def build_sd15_state_dict(unet: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A full SD1.5-format state dict (`model.diffusion_model.`, `cond_stage_model.`, `first_stage_model.`)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    unet_model = UNetModel(**SD15_UNET_BASE, **UNET_CONFIGS[unet], operations=comfy.ops.disable_weight_init)
    _init_(unet_model, generator)
    vae = AutoencoderKL(ddconfig=SD15_VAE_CONFIG, embed_dim=4)
    _init_(vae, generator)
    torch.manual_seed(seed)
    clip_config = CLIPTextConfig(  # OpenAI CLIP ViT-L/14 text tower, as in SD1.x
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    clip = CLIPTextModel(clip_config)

    state: dict[str, torch.Tensor] = {}
    for k, v in unet_model.state_dict().items():
        state["model.diffusion_model." + k] = v
    for k, v in vae.state_dict().items():
        state["first_stage_model." + k] = v
    for k, v in clip.state_dict().items():  # transformers 5 dropped the `text_model.` level; SD files keep it
        k = k.removeprefix("text_model.")
        if k != "embeddings.position_ids":
            state["cond_stage_model.transformer.text_model." + k] = v
    return state


def write_placeholder_sd15(path: str | Path, unet: str = "tiny", seed: int = 0,
                           dtype: torch.dtype = torch.float16) -> Path:
    """Write a random SD1.5-shaped `.safetensors` checkpoint that ComfyUI detects as SD1.5."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_sd15_state_dict(unet=unet, seed=seed)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"note": "random placeholder weights made by AudioToken tools"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                        help="sd15 (default) or sdxl (an SDXL-family checkpoint with full CLIP-L + OpenCLIP-bigG, 1.9 GB)")
    parser.add_argument("--unet", choices=sorted(UNET_CONFIGS), default="tiny", help="SD1.5 UNet size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "sdxl":
        print(write_placeholder_sdxl(args.output, seed=args.seed))
    else:
        print(write_placeholder_sd15(args.output, unet=args.unet, seed=args.seed))


if __name__ == "__main__":
    main()
