"""Convert the official Wav2CLIP checkpoint (.pt, read weights-only) to .safetensors.

    python scripts/convert_wav2clip.py Wav2CLIP.pt Wav2CLIP.safetensors

Only the audio encoder and its projection are kept (the weights the AIS metric uses); both files
load in the evaluation (models/audiotoken_eval).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiotoken_core.evaluation.wav2clip import load_wav2clip  # noqa: E402
from audiotoken_core.io import save_safetensors  # noqa: E402
from converter_cli import convert_main  # noqa: E402  (scripts/, beside this file)


def convert(source: Path, target: Path) -> str:
    model = load_wav2clip(source)
    save_safetensors(target, {k: v.contiguous() for k, v in model.state_dict().items()},
                     metadata={"format": "wav2clip", "source": source.name})
    return f"wrote {target} ({sum(p.numel() for p in model.parameters()):,} parameters)"


def main(argv: list[str] | None = None) -> int:
    return convert_main(__doc__.splitlines()[0], "the official Wav2CLIP.pt (or a Lightning .ckpt of it)", convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
