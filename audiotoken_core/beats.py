"""BEATs audio encoder: our own inference port, numerically equal to the public code.

BEATs ("Audio Pre-Training with Acoustic Tokenizers", Chen et al. 2022; public code in
microsoft/unilm, folder `beats/`, MIT licence) is the frozen audio encoder of AudioToken.
This module re-implements its forward pass for inference:

    wave16 [B, T] in [-1, 1] --beats_fbank--> fbank [B, frames, 128]
      -> patch_embedding Conv2d(1 -> embed_dim, k = s = 16) -> tokens [B, N, embed_dim]
         (time-major: the 8 frequency patches of one time step are adjacent)
      -> layer_norm -> post_extract_proj (embed_dim -> encoder_embed_dim)
      -> encoder: x + GELU(weight-normed grouped Conv1d(x)) -> LayerNorm (post-LN models)
         -> encoder_layers x [self-attention with (gated) relative position bias + FFN]

Design notes
- The module and parameter names reproduce the public state-dict keys exactly, so an
  official checkpoint's `model` dict loads with `strict=True` once the AudioSet
  classification head (`predictor.*`) is dropped. The relative-position embedding is one
  module shared by every layer, as in the public code, so its weight appears under each
  `encoder.layers.<i>.self_attn.` prefix.
- Inference only: no dropout, layer drop, padding masks or gradient scaling
  (`layer_wise_gradient_decay_ratio` only scales gradients in the public code; the
  forward pass is unchanged). The model runs under the caller's grad mode.
- The attention reproduces the public arithmetic (scale q, divide by 32, subtract the
  row max, multiply by 32, add the gated bias) so results match it to float rounding,
  also in half precision. Relative-position buckets are computed on the CPU, as the
  public code does, so bucket boundaries never depend on the device's `log`.
- `forward` returns the output of every transformer layer (a list), and stops after
  `num_layers` layers when asked, so unused layers are never computed.
- Inputs are trusted: `encoders.load_audio_encoder` and `AudioEncoder.forward` check files,
  layers and audio length. Reading and writing checkpoint files is `beats_checkpoint.py`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fbank import beats_fbank

__all__ = ["BEATsConfig", "BEATs"]

# The public attention subtracts the row max in a 1/32-scaled space ("alpha" there).
_ATTENTION_ALPHA = 32.0
_ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear", "glu")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class BEATsConfig:
    """BEATs hyper-parameters, named like the keys of the official `cfg` dict.

    Defaults are the values of the released BEATs_iter3+ (AS2M) checkpoints, e.g.
    `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt` (the AudioToken reference).
    Dropout and layer-drop values are kept for round trips only; inference ignores them.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_dropout: float = 0.0
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None) -> "BEATsConfig":
        """The config of a checkpoint's dict: unknown keys ignored, values checked (ValueError).

        Missing keys take this class's defaults (the AS2M values), or `defaults` when given
        (official pickles pass the public class's defaults, which its loader fills in).
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"a BEATs config must be a dict, got {type(cfg).__name__}")
        values = {**(defaults or {}), **cfg}
        config = cls(**{f.name: _coerce(f.name, f.type, values[f.name])
                        for f in dataclasses.fields(cls) if f.name in values})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError when the values cannot describe a BEATs model."""
        problems = [f"{name}={getattr(self, name)} must be >= 1"
                    for name in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                                 "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups")
                    if getattr(self, name) < 1]
        if not problems:
            for divisor in ("encoder_attention_heads", "conv_pos_groups"):
                if self.encoder_embed_dim % getattr(self, divisor):
                    problems.append(f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
                                    f"{divisor}={getattr(self, divisor)}")
        if self.deep_norm and self.layer_norm_first:
            problems.append("deep_norm and layer_norm_first cannot both be set")
        if self.activation_fn not in _ACTIVATIONS:
            problems.append(f"activation_fn={self.activation_fn!r} is not one of {', '.join(_ACTIVATIONS)}")
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance < self.num_buckets // 4 + 1):
            problems.append(
                f"num_buckets={self.num_buckets} / max_distance={self.max_distance} are invalid for "
                "relative position embedding (need num_buckets >= 4 and max_distance > num_buckets // 4)"
            )
        if problems:
            raise ValueError("invalid BEATs config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A config value as the field's type (`kind` is the annotation's name); ValueError if it is not one."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if kind == "bool" and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if kind == "bool" and isinstance(value, (bool, int, float)):
        return bool(value)
    if kind == "int" and not (isinstance(value, float) and not value.is_integer()):
        try:
            return int(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    if kind == "float" and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    if kind == "str" and isinstance(value, str):
        return value
    raise ValueError(f"BEATs config key {name!r} has an invalid value {value!r} (expected {kind})")


# --------------------------------------------------------------------------- modules


def _gelu(x: Tensor) -> Tensor:
    # The public code evaluates GELU in float32 and casts back.
    return F.gelu(x.float()).type_as(x)


def _gelu_accurate(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _activation(name: str):
    return {
        "relu": F.relu,
        "gelu": _gelu,
        "gelu_fast": _gelu_accurate,
        "gelu_accurate": _gelu_accurate,
        "tanh": torch.tanh,
        "linear": lambda x: x,
        "glu": lambda x: x,  # the gating lives in fc1
    }[name]


class BEATsGLULinear(nn.Module):
    """fc1 of `activation_fn="glu"` models: Linear to 2x width, first half * swish(second half)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features * 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        value, gate = x[..., : self.out_features], x[..., self.out_features:]
        return value * (gate * torch.sigmoid(gate))


class BEATsWeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight normalisation over the kernel axis (`weight_g`, `weight_v`).

    Equivalent to `torch.nn.utils.weight_norm(conv, dim=2)`, the form the public code was
    saved with; the effective weight is recomputed from the two tensors at every call.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * channels)))

    def forward(self, x: Tensor) -> Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class BEATsTrimLast(nn.Module):
    """Drop the extra last step that an even kernel with padding k // 2 produces."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : -self.remove] if self.remove else x


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5-style buckets, as BEATs computes them (integer tensor in, long out)."""
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    is_small = distance < max_exact
    # Distance 0 is always "small"; clamping only avoids log(0) in the unused branch.
    large = max_exact + (
        torch.log(distance.clamp_min(1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return buckets + torch.where(is_small, distance, large)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with BEATs' gated relative position bias."""

    def __init__(self, config: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim, heads = config.encoder_embed_dim, config.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim ** -0.5
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.gru_rel_pos = config.gru_rel_pos
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if config.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def compute_bias(self, length: int) -> Tensor:
        """Relative position bias [heads, length, length] (buckets computed on the CPU)."""
        positions = torch.arange(length, dtype=torch.long)
        relative = positions[None, :] - positions[:, None]  # key - query
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        weight = self.relative_attention_bias.weight
        return F.embedding(buckets.to(weight.device), weight).permute(2, 0, 1)

    def forward(self, x: Tensor, position_bias: Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(x) * self.scaling
        q = q * (1.0 / _ATTENTION_ALPHA)
        k = self.k_proj(x)
        v = self.v_proj(x)
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, N, d]
        k = k.view(batch, length, heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, heads, head_dim).transpose(1, 2)

        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * _ATTENTION_ALPHA
        if position_bias is not None:
            bias = position_bias  # [H, N, N]
            if self.gru_rel_pos:
                query = q * _ATTENTION_ALPHA / self.scaling
                gates = torch.sigmoid(self.grep_linear(query).view(batch, heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, N, 1] each
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias
        probs = F.softmax(scores, dim=-1).type_as(scores)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out)


class BEATsEncoderLayer(nn.Module):
    """One transformer block: post-LN with deep-norm residual scaling, or pre-LN."""

    def __init__(self, config: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim, ffn = config.encoder_embed_dim, config.encoder_ffn_embed_dim
        self.layer_norm_first = config.layer_norm_first
        self.deep_norm_alpha = math.pow(2 * config.encoder_layers, 0.25) if config.deep_norm else 1.0
        self.activation = _activation(config.activation_fn)
        self.self_attn = BEATsAttention(config, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = BEATsGLULinear(dim, ffn) if config.activation_fn == "glu" else nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: Tensor, position_bias: Tensor | None = None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.deep_norm_alpha + self._feed_forward(x))


class BEATsEncoder(nn.Module):
    """Convolutional positional embedding + the transformer layers."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.relative_position_embedding = config.relative_position_embedding
        self.layer_norm_first = config.layer_norm_first
        self.pos_conv = nn.Sequential(
            BEATsWeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups),
            BEATsTrimLast(config.conv_pos),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(
            BEATsEncoderLayer(config, has_relative_attention_bias=config.relative_position_embedding and i == 0)
            for i in range(config.encoder_layers)
        )
        if config.relative_position_embedding:
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, num_layers: int | None = None) -> list[Tensor]:
        """[B, N, C] -> the outputs of the first `num_layers` layers (default all), each [B, N, C]."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = None
        if self.relative_position_embedding:
            position_bias = self.layers[0].self_attn.compute_bias(x.shape[1])
        outputs = []
        for layer in self.layers[: len(self.layers) if num_layers is None else num_layers]:
            x = layer(x, position_bias)
            outputs.append(x)
        return outputs


class BEATs(nn.Module):
    """BEATs encoder (no classification head). Output: a list with every layer's [B, N, C]."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        self.config = config
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.patch_embedding = nn.Conv2d(
            1, config.embed_dim, kernel_size=config.input_patch_size, stride=config.input_patch_size,
            bias=config.conv_bias,
        )
        self.encoder = BEATsEncoder(config)
        self.layer_norm = nn.LayerNorm(config.embed_dim)

    @classmethod
    def from_state_dict(
        cls, config: BEATsConfig, state_dict: Mapping[str, Tensor], *, dtype: torch.dtype | None = torch.float32
    ) -> "BEATs":
        """Build the model straight from a state dict (no random init), strict key check."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.encoder_embed_dim

    def num_tokens(self, num_samples: int, num_mel_bins: int = 128) -> int:
        """Tokens produced for `num_samples` 16 kHz samples (25 ms frames, 10 ms shift)."""
        frames = 0 if num_samples < 400 else 1 + (num_samples - 400) // 160
        patch = self.config.input_patch_size
        return (frames // patch) * (num_mel_bins // patch)

    def embed_patches(self, fbank: Tensor) -> Tensor:
        """fbank [B, frames >= patch, bins] -> patch tokens [B, N, encoder_embed_dim], time-major order."""
        weight = self.patch_embedding.weight
        x = self.patch_embedding(fbank.to(device=weight.device, dtype=weight.dtype).unsqueeze(1))  # [B, C, T', F']
        x = x.flatten(2).transpose(1, 2)  # token index = t * F' + f
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return x

    def forward_fbank(self, fbank: Tensor, num_layers: int | None = None) -> list[Tensor]:
        """fbank [B, frames, bins] -> outputs of layers 1..num_layers (default all), each [B, N, C]."""
        return self.encoder(self.embed_patches(fbank), num_layers)

    def forward(self, wave16: Tensor, num_layers: int | None = None) -> list[Tensor]:
        """wave16 [B, T] in [-1, 1] at 16 kHz -> outputs of layers 1..num_layers, each [B, N, C]."""
        return self.forward_fbank(beats_fbank(wave16.to(device=self.patch_embedding.weight.device)), num_layers)
