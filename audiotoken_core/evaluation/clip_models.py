"""CLIP image and text embeddings from a local transformers ``CLIPModel`` folder.

The folder is ``save_pretrained`` output: ``config.json`` + ``*.safetensors`` + the tokenizer and
image-processor files (e.g. a local copy of ``openai/clip-vit-base-patch32``, the CLIP that AIS
needs because Wav2CLIP was trained into its image space). Loading never downloads
(``local_files_only``) and reads safetensors only.

Images are preprocessed by the folder's own CLIP image processor from 8-bit pixels
(``round(x * 255)``), i.e. exactly as if each image had been saved as a PNG and opened with PIL,
so ComfyUI ``IMAGE`` tensors and image files give the same embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["HFClip", "load_hf_clip"]


def _features(out) -> Tensor:
    """transformers 4 returns a tensor, transformers 5 an output whose pooler_output is projected."""
    return getattr(out, "pooler_output", out) if not isinstance(out, Tensor) else out


class HFClip:
    """``embed_images`` / ``embed_texts`` -> L2-normalised float32 ``[N, D]`` on the CPU."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", folder: Path | None = None):
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.folder = folder
        self.model.to(self.device)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def name(self) -> str:
        return getattr(self.model.config, "_name_or_path", "") or (self.folder.name if self.folder else "clip")

    def _to_pil_list(self, images) -> list:
        from PIL import Image

        if isinstance(images, Tensor):
            arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            if arr.shape[-1] == 1:
                arr = arr.repeat(3, axis=-1)
            return [Image.fromarray(a[..., :3]) for a in arr]
        return [im.convert("RGB") if hasattr(im, "convert") else im for im in images]

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 32) -> Tensor:
        """``images``: ``[N, H, W, 3]`` in 0..1 or a list of PIL images."""
        pil = self._to_pil_list(images)
        out = [torch.zeros(0, self.embed_dim)]
        for start in range(0, len(pil), batch_size):
            pixels = self.processor(images=pil[start:start + batch_size], return_tensors="pt")["pixel_values"]
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        texts = [str(t) for t in texts]
        out = [torch.zeros(0, self.embed_dim)]
        for start in range(0, len(texts), batch_size):
            tok = self.processor(text=texts[start:start + batch_size], return_tensors="pt", padding=True,
                                 truncation=True)
            feats = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                           attention_mask=tok["attention_mask"].to(self.device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)


def load_hf_clip(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HFClip:
    """A local transformers CLIP folder -> :class:`HFClip` (eval mode, no gradients)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: point at a local transformers CLIP folder "
                                f"(save_pretrained output with the processor files).")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights: save the CLIP model with "
                                f"save_pretrained(..., safe_serialization=True); .bin pickles are not loaded.")
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model.to(dtype).requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return HFClip(model, processor, device=device, folder=folder)
