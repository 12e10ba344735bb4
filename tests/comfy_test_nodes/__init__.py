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
