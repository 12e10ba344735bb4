"""load_clip_scorer: frames rated by a local transformers CLIP against the label."""
from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from audiotoken_core.data import load_clip_scorer
from tools.comfy_root import find_comfyui_root


def _tiny_clip_folder(path):
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(find_comfyui_root() / "comfy" / "sd1_tokenizer"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return model, processor


def test_scores_are_cosines_of_the_projected_features(tmp_path):
    model, processor = _tiny_clip_folder(tmp_path / "clip")
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
