"""Convert the official Wav2CLIP checkpoint (.pt, read weights-only) to .safetensors.

    python scripts/convert_wav2clip.py Wav2CLIP.pt Wav2CLIP.safetensors

Only the audio encoder and its projection are kept (the weights the AIS metric uses); both files
load in the evaluation (models/audiotoken_eval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiotoken_core.evaluation.wav2clip import load_wav2clip  # noqa: E402
from audiotoken_core.io import save_safetensors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the official Wav2CLIP.pt (or a Lightning .ckpt of it)")
    parser.add_argument("target", type=Path, help="output .safetensors path")
    parser.add_argument("--force", action="store_true", help="overwrite TARGET if it exists")
    args = parser.parse_args(argv)
    if args.target.exists() and not args.force:
        print(f"error: {args.target} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        model = load_wav2clip(args.source)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_safetensors(args.target, {k: v.contiguous() for k, v in model.state_dict().items()},
                     metadata={"format": "wav2clip", "source": args.source.name})
    print(f"wrote {args.target} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
