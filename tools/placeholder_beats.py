"""Write an official-format BEATs checkpoint with random (but sensibly initialised) weights.

No real BEATs weights exist on our machines. Tests, the demo and benchmarks use this file
instead: `torch.save({'cfg': dict, 'model': state_dict})`, exactly the layout of the
released `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt` (including its AudioSet
`predictor` head when `finetuned_model` is set), so every loading path is the real one.
The default is the real size (12 layers, 768 wide, about 90M parameters, ~363 MB).

Initialisation follows the public code: BERT-style N(0, 0.02) linears with zero biases,
deep-norm Xavier gains for q/k/v/out/fc1/fc2, LayerNorm weight 1 / bias 0, `grep_a` 1,
the weight-normed positional conv with N(0, sqrt(4 / (k * C))) and `weight_g = |weight_v|`.
All draws come from one `torch.Generator` seeded with `seed` in sorted key order.

    python -m tools.placeholder_beats OUT.pt [--seed 0] [--set encoder_layers=2 ...]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from audiotoken_core.beats import BEATs, BEATsConfig


def _xavier_std(shape: tuple[int, ...], gain: float) -> float:
    fan_out, fan_in = shape[0], shape[1]
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def placeholder_beats_state(config: BEATsConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full official-layout state dict (with `predictor.*` when `finetuned_model`)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BEATs(config).state_dict(keep_vars=True).items()}
    if config.finetuned_model:
        shapes["predictor.weight"] = (config.predictor_class, config.encoder_embed_dim)
        shapes["predictor.bias"] = (config.predictor_class,)
    generator = torch.Generator().manual_seed(seed)
    beta = math.pow(8 * config.encoder_layers, -0.25)
    state: dict[str, torch.Tensor] = {}
    shared_bias = None
    for key in sorted(shapes):
        shape = shapes[key]
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""

        def normal(std: float) -> torch.Tensor:
            return torch.randn(shape, generator=generator) * std

        if key.endswith("relative_attention_bias.weight"):
            if shared_bias is None:
                shared_bias = normal(0.02)
            state[key] = shared_bias  # one table shared by every layer, as in the public model
        elif "layer_norm" in parent:
            state[key] = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        elif leaf == "grep_a":
            state[key] = torch.ones(shape)
        elif leaf == "weight_v":
            state[key] = normal(math.sqrt(4.0 / (config.conv_pos * config.encoder_embed_dim)))
        elif leaf == "weight_g":
            continue  # filled from weight_v below so that the effective weight equals weight_v
        elif leaf == "bias":
            state[key] = torch.zeros(shape)
        elif key == "patch_embedding.weight":
            state[key] = normal(1.0 / math.sqrt(math.prod(shape[1:])))
        elif config.deep_norm and parent in ("k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2") and leaf == "weight":
            gain = 1.0 if parent in ("k_proj", "q_proj") else beta
            state[key] = normal(_xavier_std(shape, gain))
        else:
            state[key] = normal(0.02)
    v = state["encoder.pos_conv.0.weight_v"]
    state["encoder.pos_conv.0.weight_g"] = v.norm(dim=(0, 1), keepdim=True)
    return state


def write_placeholder_beats(path: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Write `{'cfg': dict, 'model': state_dict}` with torch.save; returns the path.

    `config_overrides` are BEATsConfig fields (e.g. encoder_layers=2, encoder_embed_dim=64).
    """
    base = BEATsConfig().to_dict()
    unknown = sorted(set(config_overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown BEATs config keys {unknown}; valid keys: {', '.join(sorted(base))}")
    config = BEATsConfig.from_dict({**base, **config_overrides})
    state = placeholder_beats_state(config, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": config.to_dict(), "model": state}, path)
    return path


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.placeholder_beats", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .pt path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a BEATs config key")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    out = write_placeholder_beats(args.out, seed=args.seed, **overrides)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
