"""Pick training frames by CLIP score against the label (the paper's frame choice).

A local transformers CLIP folder (config.json + safetensors, tokenizer and image-processor
files) rates candidate frames with cosine(image, "a photo of <label>"); the dataset keeps
the best one. Never downloads: local_files_only. The CLIP itself is the evaluation code's
:class:`~audiotoken_core.evaluation.clip_models.HFClip` (one loader for both uses).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

ClipScorer = Callable[[Sequence["PIL.Image.Image"], str], list[float]]  # noqa: F821


def load_clip_scorer(folder: str | Path, template: str = "a photo of {}", device: str | torch.device = "cpu") -> ClipScorer:
    """`scorer(frames, label) -> [cosine per frame]` from a local CLIPModel folder."""
    from ..evaluation.clip_models import load_hf_clip  # lazy: evaluation may import data

    clip = load_hf_clip(folder, device=device)

    def scorer(frames, label: str) -> list[float]:
        text = clip.embed_texts([template.format(label)])
        images = clip.embed_images(list(frames))
        return (images @ text[0]).tolist()

    scorer.clip = clip
    return scorer
