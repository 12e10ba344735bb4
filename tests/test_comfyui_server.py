"""End-to-end tests against a REAL ComfyUI server (0.3.75) with this pack in custom_nodes.

Assets are generated here at test time: an SD1.5-shaped checkpoint with random weights,
an official-format BEATs checkpoint (12 narrow layers), random AudioToken files, and audio
(CC0 recordings, sox). Everything is driven over HTTP, as a user's browser would.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audiotoken_core.embedding import load_embedding
from comfy_fixtures import BEATS, CKPT, TOKEN_SD2, TOKEN_SD15, graph
from tools.comfy_server import ComfyServer, execution_error

pytestmark = pytest.mark.comfyui

def _ok(entry: dict) -> dict:
    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    return entry


def _cond(comfy: ComfyServer, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(comfy.base / "output" / f"{name}.safetensors"))


NODE_IDS = ["AudioTokenEncoderLoader", "AudioTokenLoader", "AudioTokenEncode", "AudioTokenEmbedAudio",
            "AudioTokenConditioning", "AudioTokenBlend", "AudioTokenSaveEmbedding", "AudioTokenLoadEmbedding",
            "AudioTokenImportReference"]


def test_object_info_lists_every_node_with_descriptions_and_tooltips(comfy):
    info = comfy.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing; ComfyUI log:\n{comfy.log_tail()}"
        node = info[node_id]
        assert len(node["description"]) > 40, node_id
        assert node["category"] == "audio/AudioToken"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["AudioTokenEncoderLoader"]["input"]["required"]["encoder_name"][1]["options"] == sorted(
        [BEATS, "not_beats.safetensors"]) or BEATS in str(info["AudioTokenEncoderLoader"]["input"]["required"]["encoder_name"])
    assert TOKEN_SD15 in str(info["AudioTokenLoader"]["input"]["required"]["audiotoken_name"])
    assert info["AudioTokenEncode"]["output"] == ["CONDITIONING", "AUDIOTOKEN_EMBEDDING"]


def test_audio_to_image_through_ksampler_writes_an_image(comfy):
    entry = _ok(comfy.run(graph()))
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1
    from PIL import Image

    path = comfy.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(path) as img:
        assert img.size == (64, 64)


def _reference_cond(ckpt: Path, prompt_words: str, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent computation: HF CLIPTextModel on the checkpoint's weights, with the vector
    put in place of the placeholder's input word embedding (after the prompt's own tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tools.comfy_root import find_comfyui_root

    tok = CLIPTokenizer.from_pretrained(str(find_comfyui_root() / "comfy" / "sd1_tokenizer"))
    ids = tok(prompt_words)["input_ids"][:-1]  # BOS + words, no EOS
    position = len(ids)
    ids = ids + [0] + [tok.eos_token_id] * (77 - len(ids) - 1)
    sd = load_file(str(ckpt))
    prefix = "cond_stage_model.transformer.text_model."
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407)
    model = CLIPTextModel(config).eval()
    nested = "text_model." if hasattr(model, "text_model") else ""  # transformers 4 vs 5 layout
    clip_sd = {nested + k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(clip_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)

    def put_vector(_module, _inp, out):
        out = out.clone()
        out[0, position] = vector.to(out.dtype)
        return out

    handle = model.get_input_embeddings().register_forward_hook(put_vector)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]))
    handle.remove()
    eos = ids.index(tok.eos_token_id)
    return out.last_hidden_state[0], out.last_hidden_state[0, eos]


def test_spliced_vector_equals_direct_clip_computation(comfy):
    _ok(comfy.run(graph(save="dog_a")))
    saved = _cond(comfy, "dog_a")
    emb_files = sorted((comfy.base / "output" / "emb").glob("dog_a*.safetensors"))
    emb = load_embedding(emb_files[-1])
    assert emb.widths == {"l": 768} and emb.batch_size == 1
    cond, pooled = saved["0.cond"], saved["0.pooled"]
    assert cond.shape == (1, 77, 768) and pooled.shape == (1, 768)
    ref_cond, ref_pooled = _reference_cond(comfy.base / "models" / "checkpoints" / CKPT, "a photo of", emb.vectors["l"][0])
    assert torch.allclose(cond[0], ref_cond, atol=2e-3, rtol=1e-3), (cond[0] - ref_cond).abs().max()
    assert torch.allclose(pooled[0], ref_pooled, atol=2e-3, rtol=1e-3), (pooled[0] - ref_pooled).abs().max()
    # The placeholder really changes the cond: a zero vector in its place gives something else.
    zero_cond, _ = _reference_cond(comfy.base / "models" / "checkpoints" / CKPT, "a photo of", torch.zeros(768))
    assert (zero_cond[4:] - cond[0, 4:]).abs().max() > 1e-2


def test_same_audio_identical_cond_different_audio_different(comfy):
    _ok(comfy.run(graph(save="dog_b")))
    _ok(comfy.run(graph(audio="cat.mp3", save="cat_b")))
    dog_a, dog_b, cat = (_cond(comfy, n)["0.cond"] for n in ("dog_a", "dog_b", "cat_b"))
    assert torch.equal(dog_a, dog_b)
    diff = (dog_a - cat).abs()
    assert diff[:, :4].max() < 1e-5  # BOS + "a photo of" come before the audio word (causal attention)
    assert diff[:, 4:].max() > 1e-3


def test_requeue_with_unchanged_inputs_is_served_from_cache(comfy):
    g = graph(save="cache_probe")
    _ok(comfy.run(g))
    entry = _ok(comfy.run(g))
    cached = [data for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    assert cached and {"encode", "tok", "enc", "audio"} <= set(cached[0]["nodes"])


def test_several_placeholders_and_prompt_weights(comfy):
    _ok(comfy.run(graph(text="(<audio>:1.3) next to <audio>, oil painting", save="multi")))
    cond = _cond(comfy, "multi")["0.cond"]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()


@pytest.mark.parametrize("audio", ["tone_192k_8ch.wav", "blip_50ms.wav", "silence.wav", "one_hour.wav"])
def test_unusual_audio_still_conditions(comfy, audio):
    entry = _ok(comfy.run(graph(audio=audio, save=f"odd_{audio}", start=1800.0 if audio == "one_hour.wav" else 0.0)))
    assert entry["status"]["status_str"] == "success"
    cond = _cond(comfy, f"odd_{audio}")["0.cond"]
    assert torch.isfinite(cond).all()


def test_prompt_without_placeholder_is_a_validation_error(comfy):
    status, body = comfy.queue(graph(text="a photo of a dog"))
    assert status == 400
    assert "placeholder" in str(body["node_errors"]["encode"]).lower()


@pytest.mark.parametrize("kwargs, expected", [
    (dict(token=TOKEN_SD2), "1024"),
    (dict(audio="nan.wav"), "nan"),
    (dict(encoder="not_beats.safetensors"), "beats"),
    (dict(audio="dog.mp3", start=500.0), "start"),
])
def test_bad_inputs_give_readable_errors(comfy, kwargs, expected):
    entry = comfy.run(graph(save="bad", **kwargs))
    err = execution_error(entry)
    assert err is not None, "expected an execution error"
    assert expected.lower() in err["exception_message"].lower(), err["exception_message"]
    assert comfy.proc.poll() is None  # the server survives
    assert comfy.get("/system_stats")


def test_missing_model_file_is_rejected_before_running(comfy):
    status, body = comfy.queue(graph(token="does_not_exist.safetensors"))
    assert status == 400 and "tok" in body["node_errors"]
