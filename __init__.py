"""AudioToken for ComfyUI: any sound becomes a word that Stable Diffusion understands.

ComfyUI imports this package from custom_nodes/. The plain-torch library lives in
`audiotoken_core`; `nodes` adapts it to ComfyUI; `web` is the frontend extension.
"""
import importlib.util

WEB_DIRECTORY = "./web"

# Tools outside ComfyUI (pytest collecting the repository, packagers) import this file too;
# the nodes need ComfyUI's comfy_api, which every ComfyUI has.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
