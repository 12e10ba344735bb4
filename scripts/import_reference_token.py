"""Convert the AudioToken authors' embedder_learned_embeds.bin into an AudioToken .safetensors file,
or print an AudioToken file's metadata.

    python scripts/import_reference_token.py embedder_learned_embeds.bin audiotoken_reference_sd14.safetensors
    python scripts/import_reference_token.py --info audiotoken_reference_sd14.safetensors

The pickle is read weights-only: a file that carries code is refused. OUTPUT is never
overwritten unless --force is given. Same conversion as the 'Import Reference AudioToken' node.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiotoken_core.token_file import import_reference_embedder, load_audiotoken, save_audiotoken  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="reference checkpoint (torch pickle or safetensors), or with --info an AudioToken file")
    parser.add_argument("output", nargs="?", help="AudioToken file to write (.safetensors)")
    parser.add_argument("--info", action="store_true", help="print the metadata of the AudioToken file INPUT")
    parser.add_argument("--key", default=None, help="text-encoder key (default: from the width)")
    parser.add_argument("--placeholder", default="<audio>")
    parser.add_argument("--prompt-template", default="a photo of <audio>")
    parser.add_argument("--description", default=None)
    parser.add_argument("--encoder", type=json.loads, default=None, help="encoder spec as JSON (default: BEATs 4,8,12)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        if args.info:
            token = load_audiotoken(args.input)
            print(json.dumps({"widths": token.widths, "encoder": token.encoder, "placeholder": token.placeholder,
                              "prompt_template": token.prompt_template, "training": token.training_info,
                              "description": token.description}, indent=2))
            return 0
        if args.output is None:
            parser.error("OUTPUT is required (or use --info)")
        if os.path.lexists(args.output) and not args.force:
            print(f"error: {args.output} exists (use --force to overwrite)", file=sys.stderr)
            return 1
        token = import_reference_embedder(args.input, encoder=args.encoder, placeholder=args.placeholder,
                                          prompt_template=args.prompt_template, key=args.key,
                                          description=args.description)
        save_audiotoken(args.output, token)
        print(f"wrote {args.output}: widths {token.widths}, encoder {token.encoder}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
