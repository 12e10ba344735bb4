"""BEATs checkpoint files: read the official release, write and read our .safetensors form.

- `load_beats_state(path)` reads an official torch pickle `{'cfg': dict, 'model':
  state_dict, ...}` weights-only (`io.load_torch_weights_only`: a pickle that carries code
  is refused), or a `.safetensors` file whose metadata key `beats_config` holds the config
  as JSON. The kind is sniffed from the first bytes, not taken from the file name.
- `save_beats_safetensors(path, config, state_dict)` writes the latter, atomically;
  `python scripts/convert_beats.py SRC.pt DST.safetensors` converts a release.

Every problem with a file is an `AudioEncoderFileError` naming the file and what was expected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .beats import BEATs, BEATsConfig
from .encoders import AudioEncoderFileError
from .io import is_safetensors, load_torch_weights_only, save_safetensors

__all__ = ["load_beats_state", "save_beats_safetensors", "OFFICIAL_CLASS_DEFAULTS", "SAFETENSORS_CONFIG_KEY"]

SAFETENSORS_CONFIG_KEY = "beats_config"
CONVERT_HINT = "Convert an official BEATs .pt with `python scripts/convert_beats.py SRC.pt DST.safetensors`."

# Defaults of the public `BEATsConfig` class (used for keys an official cfg dict lacks).
OFFICIAL_CLASS_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}
# Checkpoints re-saved with torch.nn.utils.parametrizations.weight_norm name the conv's two tensors so.
_RENAMES = {
    "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
}
_SHARED_BIAS = "encoder.layers.0.self_attn.relative_attention_bias.weight"


def _describe_keys(keys: Iterable[Any], limit: int = 8) -> str:
    keys = sorted(map(str, keys))
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return shown or "(none)"


def _require_beats_keys(state_dict: Mapping[str, Any], name: str) -> None:
    """Tell a file of another kind apart from a BEATs model whose config does not fit its weights."""
    if "patch_embedding.weight" not in state_dict or not any(str(k).startswith("encoder.layers.0.") for k in state_dict):
        raise AudioEncoderFileError(
            f"{name} is not a BEATs checkpoint: found keys {_describe_keys(state_dict)}; expected BEATs keys such as "
            "patch_embedding.weight, layer_norm.weight, encoder.pos_conv.0.weight_v, encoder.layers.0.self_attn.q_proj.weight"
        )


def _checked_state(state_dict: Mapping[str, Any], config: BEATsConfig, name: str) -> dict[str, Tensor]:
    """The encoder's state dict: the classifier head dropped, known key variants renamed, keys and shapes checked."""
    sd = {_RENAMES.get(k, k): v for k, v in state_dict.items() if not str(k).startswith("predictor.")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BEATs(config).state_dict(keep_vars=True).items()}
    # The shared relative-position table is stored under every layer; accept files keeping only layer 0.
    for key in expected:
        if key.endswith(".self_attn.relative_attention_bias.weight") and key not in sd and _SHARED_BIAS in sd:
            sd[key] = sd[_SHARED_BIAS]
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in sd.items()}
    wrong = [f"{k}: file {shapes[k]} vs config {expected[k]}" for k in sorted(set(sd) & set(expected))
             if shapes[k] != expected[k]]
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:6]) + (f"; ... ({len(wrong)} in all)" if len(wrong) > 6 else ""))
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise AudioEncoderFileError(
            f"{name}: the weights do not match its BEATs config (encoder_layers={config.encoder_layers}, "
            f"encoder_embed_dim={config.encoder_embed_dim}, embed_dim={config.embed_dim}): " + " | ".join(parts)
        )
    return sd


def _read(path: Path) -> tuple[Any, Mapping[str, Any], Mapping[str, Any] | None]:
    """(config dict or its JSON text, state dict, defaults for missing config keys) of either file kind."""
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                keys = list(handle.keys())
                tensors = {k: handle.get_tensor(k) for k in keys} if SAFETENSORS_CONFIG_KEY in metadata else {}
        except Exception as exc:  # noqa: BLE001 - a damaged file, whatever safetensors says about it
            raise AudioEncoderFileError(f"{path.name} is not a readable safetensors file ({exc})") from exc
        if SAFETENSORS_CONFIG_KEY not in metadata:
            kind = f" (its metadata says format={metadata['format']!r})" if "format" in metadata else ""
            raise AudioEncoderFileError(
                f"{path.name} is not a BEATs safetensors file{kind}: metadata key {SAFETENSORS_CONFIG_KEY!r} is "
                f"missing (tensors: {_describe_keys(keys)}). {CONVERT_HINT}"
            )
        return metadata[SAFETENSORS_CONFIG_KEY], tensors, None
    obj = load_torch_weights_only(path, "an official BEATs checkpoint ({'cfg': dict, 'model': state dict})")
    if not (isinstance(obj, Mapping) and isinstance(obj.get("cfg"), Mapping) and isinstance(obj.get("model"), Mapping)):
        found = f"keys {_describe_keys(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise AudioEncoderFileError(
            f"{path.name} is not a BEATs checkpoint: expected top-level keys 'cfg' and 'model' (the official "
            f"BEATs format: a config dict and a state dict), found {found}"
        )
    return obj["cfg"], obj["model"], OFFICIAL_CLASS_DEFAULTS


def load_beats_state(path: str | Path) -> tuple[BEATsConfig, dict[str, Tensor]]:
    """Read a BEATs checkpoint -> (config, encoder state dict without `predictor.*`).

    Raises FileNotFoundError, `io.UnsafeFileError` (a pickle that carries code), ValueError
    (a file torch cannot read) or AudioEncoderFileError (any other file that is not a
    loadable BEATs checkpoint); every message names the file.
    """
    path = Path(path)
    cfg, state, defaults = _read(path)
    _require_beats_keys(state, path.name)
    try:
        config = BEATsConfig.from_dict(json.loads(cfg) if isinstance(cfg, str) else cfg, defaults=defaults)
    except ValueError as exc:  # includes JSONDecodeError
        raise AudioEncoderFileError(f"{path.name}: its BEATs config is not usable ({exc})") from None
    return config, _checked_state(state, config, path.name)


def save_beats_safetensors(path: str | Path, config: BEATsConfig, state_dict: Mapping[str, Tensor]) -> Path:
    """Write `state_dict` (checked against `config`, classifier head dropped) to a BEATs .safetensors file.

    Every tensor is written as its own copy: safetensors refuses shared storage, and the
    relative-position table is one tensor shared by every layer.
    """
    path = Path(path)
    sd = _checked_state(state_dict, config, path.name)
    tensors = {key: sd[key].detach().to("cpu").contiguous().clone() for key in sorted(sd)}
    metadata = {"format": "beats", SAFETENSORS_CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True)}
    save_safetensors(path, tensors, metadata)
    return path
