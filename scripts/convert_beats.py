"""Convert an official BEATs checkpoint (.pt, read weights-only) to .safetensors.

    python scripts/convert_beats.py BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt BEATs_iter3_plus.safetensors

The AudioSet classifier head is dropped (AudioToken uses the encoder only); the config
travels in the file's metadata. Both files load as audio encoders (models/audio_encoders)..
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiotoken_core.beats_checkpoint import load_beats_state, save_beats_safetensors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="official BEATs checkpoint, e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    parser.add_argument("target", type=Path, help="output .safetensors path")
    parser.add_argument("--force", action="store_true", help="overwrite TARGET if it exists")
    args = parser.parse_args(argv)
    if args.target.exists() and not args.force:
        print(f"error: {args.target} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        config, state = load_beats_state(args.source)
        save_beats_safetensors(args.target, config, state)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.target} ({sum(t.numel() for t in state.values()) / 1e6:.1f} M values, "
          f"{config.encoder_layers} layers x {config.encoder_embed_dim})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
