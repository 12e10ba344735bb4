"""A tiny random transformers CLIP folder (model + tokenizer + processor) for tests.

The tokenizer is ComfyUI's SD1 tokenizer (the real CLIP vocabulary), so prompts tokenize as
they would with a real CLIP; the weights are random.
"""
from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from tools.comfy_root import find_comfyui_root


def write_tiny_clip_folder(path, *, vision_width: int = 32, vision_heads: int = 2, image_size: int = 32,
                           patch_size: int = 8, projection_dim: int = 16, layers: int = 2, seed: int = 0):
    """save_pretrained output of a random CLIPModel; returns (model, processor)."""
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(find_comfyui_root() / "comfy" / "sd1_tokenizer"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return model, processor
