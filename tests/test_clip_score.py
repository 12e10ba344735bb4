"""load_clip_scorer: frames rated by a local transformers CLIP against the label."""
from __future__ import annotations

import torch
from PIL import Image

from audiotoken_core.data import load_clip_scorer
from tiny_clip import write_tiny_clip_folder


def test_scores_are_cosines_of_the_projected_features(tmp_path):
    model, processor = write_tiny_clip_folder(tmp_path / "clip")
    scorer = load_clip_scorer(tmp_path / "clip")
    frames = [Image.new("RGB", (48, 40), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    scores = scorer(frames, "dog")
    with torch.no_grad():
        out = model(**processor(text=["a photo of dog"], images=frames, return_tensors="pt", padding=True))
    expected = torch.nn.functional.normalize(out.image_embeds, dim=-1) @ torch.nn.functional.normalize(
        out.text_embeds, dim=-1)[0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3


def test_missing_folder_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="transformers CLIP folder"):
        load_clip_scorer(tmp_path)


def test_hf_clip_embeddings_are_normalised_projected_features(tmp_path):
    from audiotoken_core.evaluation import load_hf_clip

    model, processor = write_tiny_clip_folder(tmp_path / "clip")
    clip = load_hf_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 40, 48, 3, generator=g)  # ComfyUI IMAGE layout, 0..1
    emb = clip.embed_images(images, batch_size=2)
    assert emb.shape == (3, 16) and clip.embed_dim == 16
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # the same as the processor on the 8-bit images (as if saved to PNG and reopened)
    pil = [Image.fromarray((im * 255).round().to(torch.uint8).numpy()) for im in images]
    assert torch.allclose(clip.embed_images(pil), emb, atol=1e-6)
    texts = ["a photo of dog", "a photo of a church bell ringing"]
    with torch.no_grad():
        out = model(**processor(text=texts, images=pil, return_tensors="pt", padding=True))
    assert torch.allclose(emb, torch.nn.functional.normalize(out.image_embeds, dim=-1), atol=1e-5)
    assert torch.allclose(clip.embed_texts(texts), torch.nn.functional.normalize(out.text_embeds, dim=-1), atol=1e-5)
    assert clip.embed_texts([]).shape == (0, 16)


def test_hf_clip_refuses_folders_without_safetensors(tmp_path):
    import pytest

    from audiotoken_core.evaluation import load_hf_clip

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_clip(tmp_path)
