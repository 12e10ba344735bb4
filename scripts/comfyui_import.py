"""Find the user's ComfyUI for the command-line scripts (ComfyUI's model code loads the checkpoints).

The scripts are run from a checkout of this pack, beside a ComfyUI that is not a Python package:
`--comfyui PATH` (default: the COMFYUI_ROOT environment variable) names the folder holding main.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK = "audiotoken"  # this repository, imported as the ComfyUI custom-node package


def add_comfyui_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_ROOT"),
                        help="your ComfyUI folder (the one with main.py); default: $COMFYUI_ROOT")


def import_comfyui(root: Path | None, cpu: bool) -> None:
    """Make ComfyUI's packages and this pack (as ``audiotoken``) importable, as ComfyUI itself would."""
    if root is None:
        sys.exit("ComfyUI is needed for its model code: pass --comfyui /path/to/ComfyUI or set COMFYUI_ROOT.")
    root = Path(root).expanduser().resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        sys.exit(f"{root} is not a ComfyUI folder (no main.py and comfy/ in it): pass the folder you start ComfyUI from.")
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    spec = importlib.util.spec_from_file_location(PACK, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    sys.modules[PACK] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
