"""Test-only ComfyUI nodes: expose what a graph computed so tests can check the numbers.

Installed only into the scratch ComfyUI the test suite starts; never part of the pack.
"""
import os

import folder_paths
from safetensors.torch import save_file


class SaveConditioningForTest:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {"default": "cond"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, filename):
        tensors = {}
        for i, (cond, extras) in enumerate(conditioning):
            tensors[f"{i}.cond"] = cond.detach().float().cpu().contiguous()
            pooled = extras.get("pooled_output")
            if pooled is not None:
                tensors[f"{i}.pooled"] = pooled.detach().float().cpu().contiguous()
        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".safetensors")
        save_file(tensors, path)
        return {"ui": {"text": [path]}}


NODE_CLASS_MAPPINGS = {"AudioTokenTest_SaveConditioning": SaveConditioningForTest}


class SaveStringForTest:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}), "filename": ("STRING", {"default": "text"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, text, filename):
        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".txt")
        with open(path, "w") as f:
            f.write(text)
        return {"ui": {"text": [path]}}


NODE_CLASS_MAPPINGS["AudioTokenTest_SaveString"] = SaveStringForTest


def _repo_tools():
    """The repository's `tools` package (tiny models for tests); this folder is tests/comfy_test_nodes."""
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parent.parent.parent)
    if repo not in sys.path:
        sys.path.append(repo)  # appended: ComfyUI's own `nodes` module must keep priority over the repo's nodes/
    import tools.placeholder_dit
    import tools.tiny_text_encoders

    return tools


class TinyClipForTest:
    """A tiny in-process CLIP of a newer family (real tokenizer and TE classes, 1-4 layers):
    full-size text encoders (T5-XXL, Qwen2.5-7B) cannot be built in tests."""

    @classmethod
    def INPUT_TYPES(cls):
        families = list(_repo_tools().tiny_text_encoders.TINY_FAMILIES)
        return {"required": {"family": (families,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        return (_repo_tools().tiny_text_encoders.tiny_clip(family, seed),)


class TinyModelForTest:
    """A tiny in-process diffusion model of a family whose detectable file would not fit a tiny
    text encoder (Qwen-Image detection fixes a 3584-wide text input); pooled_dim 0 = none."""

    @classmethod
    def INPUT_TYPES(cls):
        families = sorted(_repo_tools().placeholder_dit.FAMILY_CLASSES)
        return {"required": {"family": (families,),
                             "context_dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                             "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 16384}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, context_dim, pooled_dim, seed):
        return (_repo_tools().placeholder_dit.tiny_model(family, context_dim, pooled_dim or None, seed),)


NODE_CLASS_MAPPINGS["AudioTokenTest_TinyCLIP"] = TinyClipForTest
NODE_CLASS_MAPPINGS["AudioTokenTest_TinyModel"] = TinyModelForTest
