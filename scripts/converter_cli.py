"""The shared command line of the converters: SOURCE TARGET [--force], one error line, no traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def convert_main(description: str, source_help: str, convert: Callable[[Path, Path], str], argv=None) -> int:
    """Run `convert(source, target)` (returns what to print); an existing TARGET is kept unless --force."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("source", type=Path, help=source_help)
    parser.add_argument("target", type=Path, help="output .safetensors path")
    parser.add_argument("--force", action="store_true", help="overwrite TARGET if it exists")
    args = parser.parse_args(argv)
    if args.target.exists() and not args.force:
        print(f"error: {args.target} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        print(convert(args.source, args.target))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
