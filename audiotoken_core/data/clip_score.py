"""Pick training frames by CLIP score against the label (the paper's frame choice).

A local transformers CLIP folder (config.json + safetensors, tokenizer and image-processor
files) rates candidate frames with cosine(image, "a photo of <label>"); the dataset keeps
the best one. Never downloads: local_files_only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

ClipScorer = Callable[[Sequence["PIL.Image.Image"], str], list[float]]  # noqa: F821


def load_clip_scorer(folder: str | Path, template: str = "a photo of {}", device: str | torch.device = "cpu") -> ClipScorer:
    """`scorer(frames, label) -> [cosine per frame]` from a local CLIPModel folder."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: point at a local transformers CLIP folder "
                                f"(save_pretrained output with the processor files).")
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def scorer(frames, label: str) -> list[float]:
        text = processor(text=[template.format(label)], return_tensors="pt", padding=True)
        images = processor(images=list(frames), return_tensors="pt")
        t = model.get_text_features(**{k: v.to(device) for k, v in text.items()})
        i = model.get_image_features(pixel_values=images["pixel_values"].to(device))
        t, i = (getattr(x, "pooler_output", x) for x in (t, i))
        t = torch.nn.functional.normalize(t.float(), dim=-1)
        i = torch.nn.functional.normalize(i.float(), dim=-1)
        return (i @ t[0]).cpu().tolist()

    return scorer
