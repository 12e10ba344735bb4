"""Convert an official BEATs checkpoint (.pt, read weights-only) to .safetensors.

    python scripts/convert_beats.py BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt BEATs_iter3_plus.safetensors

The AudioSet classifier head is dropped (AudioToken uses the encoder only); the config
travels in the file's metadata. Both files load as audio encoders (models/audio_encoders)..
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiotoken_core.beats_checkpoint import load_beats_state, save_beats_safetensors  # noqa: E402
from converter_cli import convert_main  # noqa: E402  (scripts/, beside this file)


def convert(source: Path, target: Path) -> str:
    config, state = load_beats_state(source)
    save_beats_safetensors(target, config, state)
    return (f"wrote {target} ({sum(t.numel() for t in state.values()) / 1e6:.1f} M values, "
            f"{config.encoder_layers} layers x {config.encoder_embed_dim})")


def main(argv: list[str] | None = None) -> int:
    return convert_main(__doc__.splitlines()[0], "official BEATs checkpoint, e.g. "
                        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
