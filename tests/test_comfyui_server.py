"""End-to-end tests against a REAL ComfyUI server (0.3.75) with this pack in custom_nodes.

Assets are generated here at test time: an SD1.5-shaped checkpoint with random weights,
an official-format BEATs checkpoint (12 narrow layers), random AudioToken files, and audio
(CC0 recordings, sox). Everything is driven over HTTP, as a user's browser would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audiotoken_core.embedding import load_embedding
from comfy_fixtures import BEATS, CKPT, TOKEN_SD2, TOKEN_SD15, graph, write_reference_bin
from tools.comfy_server import ComfyServer, execution_error

pytestmark = pytest.mark.comfyui

def _ok(entry: dict) -> dict:
    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    return entry


def _cond(comfy: ComfyServer, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(comfy.base / "output" / f"{name}.safetensors"))


NODE_IDS = ["AudioTokenEncoderLoader", "AudioTokenLoader", "AudioTokenEncode", "AudioTokenEmbedAudio", "AudioTokenEmbedWindows",
            "AudioTokenConditioning", "AudioTokenBlend", "AudioTokenSaveEmbedding", "AudioTokenLoadEmbedding",
            "AudioTokenImportReference", "AudioTokenDataset", "AudioTokenTrain", "AudioTokenEvaluate"]


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


def _encode_messages(comfy, g: dict) -> list[str]:
    """What the user is shown about the encode node: its validation errors, else its execution error."""
    status, body = comfy.queue(g)
    if status == 400:
        return [f"{e['message']}: {e['details']}" for e in body["node_errors"]["encode"]["errors"]]
    err = execution_error(comfy.wait(body["prompt_id"]))
    assert err is not None and err["node_id"] == "encode", err
    return [err["exception_message"]]


@pytest.mark.parametrize("text, placeholder, message", [
    ("a photo of a dog", "<audio>", "does not contain the placeholder '<audio>'"),
    ("a photo of <my audio>", "<my audio>", "contains spaces"),
])
def test_prompt_problem_is_reported_once(comfy, text, placeholder, message):
    """ComfyUI repeats a failed validate_inputs for every input it reads: the message is shown once."""
    g = graph(text=text, save="no_placeholder")
    g["encode"]["inputs"]["placeholder"] = placeholder
    messages = _encode_messages(comfy, g)
    assert sum(m.count(message) for m in messages) == 1, messages


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


def test_out_of_range_widget_values_are_rejected_before_running(comfy):
    g = graph()
    g["encode"]["inputs"]["window_seconds"] = 0.01
    status, body = comfy.queue(g)
    assert status == 400 and set(body["node_errors"]) == {"encode"}, body


def test_a_pooling_mode_that_does_not_exist_is_a_clear_error(comfy):
    g = graph(save="bogus_pooling")
    g["tok"]["inputs"]["pooling"] = "bogus"
    status, body = comfy.queue(g)
    if status == 400:  # current ComfyUI checks V3 combo options itself, at queue time
        errors = body["node_errors"]["tok"]["errors"]
        assert [e["extra_info"]["input_name"] for e in errors] == ["pooling"], errors
        return
    err = execution_error(comfy.wait(body["prompt_id"]))  # ComfyUI 0.3.75 leaves it to the node
    assert err is not None and err["node_id"] == "tok", err
    assert "pooling 'bogus' is not one of" in err["exception_message"], err


@pytest.mark.parametrize("node, inputs, message", [
    ("AudioTokenLoader", {"audiotoken_name": "absent.safetensors", "pooling": "deterministic"}, "'absent.safetensors' is not among"),
    ("AudioTokenImportReference", {"reference_file": "absent.bin", "output_name": "..", "overwrite": False}, "is not a plain file name"),
])
def test_a_refused_input_is_listed_once(comfy, node, inputs, message):
    """ComfyUI lists a failed validate_inputs once for every input the check reads: each check reads one."""
    g = {"enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
         "n": {"class_type": node, "inputs": dict(inputs)}}
    if node == "AudioTokenLoader":
        g["n"]["inputs"]["audio_encoder"] = ["enc", 0]
        g["out"] = {"class_type": "AudioTokenEmbedAudio",
                    "inputs": {"audio": ["a", 0], "audiotoken": ["n", 0], "start_seconds": 0.0, "window_seconds": 10.0,
                               "channels": "mix", "loop_short_audio": True}}
        g["a"] = {"class_type": "LoadAudio", "inputs": {"audio": "dog.mp3"}}
        g["s"] = {"class_type": "AudioTokenSaveEmbedding", "inputs": {"audio_embedding": ["out", 0], "filename_prefix": "emb/once"}}
    status, body = comfy.queue(g)
    assert status == 400 and "n" in body["node_errors"], body
    details = [e["details"] for e in body["node_errors"]["n"]["errors"]]
    assert sum(d.count(message) for d in details) == 1, details


def test_missing_model_file_is_rejected_before_running(comfy):
    status, body = comfy.queue(graph(token="does_not_exist.safetensors"))
    assert status == 400 and "tok" in body["node_errors"]


def test_corrupt_audio_file_is_an_error_not_a_crash(comfy):
    entry = comfy.run(graph(audio="corrupt.mp3", save="corrupt"))
    assert execution_error(entry) is not None
    assert comfy.proc.poll() is None and comfy.get("/system_stats")


def _embedding_graph(audio: str, prefix: str) -> dict:
    g = graph(audio=audio, save="unused")
    del g["encode"], g["savecond"], g["saveemb"]
    g["embed"] = {"class_type": "AudioTokenEmbedAudio",
                  "inputs": {"audio": ["audio", 0], "audiotoken": ["tok", 0], "start_seconds": 0.0,
                             "window_seconds": 10.0, "channels": "mix", "loop_short_audio": True}}
    g["saveemb"] = {"class_type": "AudioTokenSaveEmbedding",
                    "inputs": {"audio_embedding": ["embed", 0], "filename_prefix": f"emb/{prefix}"}}
    return g


def _latest_embedding(comfy, prefix: str):
    return load_embedding(sorted((comfy.base / "output" / "emb").glob(f"{prefix}_*.safetensors"))[-1])


def test_embed_blend_save_load_and_conditioning_nodes(comfy):
    g = _embedding_graph("dog.mp3", "dog_only")
    g["audio2"] = {"class_type": "LoadAudio", "inputs": {"audio": "cat.mp3"}}
    g["embed2"] = dict(g["embed"], inputs=dict(g["embed"]["inputs"], audio=["audio2", 0]))
    g["blend"] = {"class_type": "AudioTokenBlend",
                  "inputs": {"embedding_1": ["embed", 0], "weight_1": 3.0, "embedding_2": ["embed2", 0],
                             "weight_2": 1.0, "normalize": True}}
    g["saveblend"] = {"class_type": "AudioTokenSaveEmbedding",
                      "inputs": {"audio_embedding": ["blend", 0], "filename_prefix": "emb/blend"}}
    g["savecat"] = {"class_type": "AudioTokenSaveEmbedding",
                    "inputs": {"audio_embedding": ["embed2", 0], "filename_prefix": "emb/cat_only"}}
    g["cond"] = {"class_type": "AudioTokenConditioning",
                 "inputs": {"clip": ["ckpt", 1], "audio_embedding": ["embed", 0], "text": "a photo of <audio>",
                            "placeholder": "<audio>"}}
    g["savecond"] = {"class_type": "AudioTokenTest_SaveConditioning",
                     "inputs": {"conditioning": ["cond", 0], "filename": "two_step"}}
    _ok(comfy.run(g))
    dog, cat, blend = (_latest_embedding(comfy, p).vectors["l"] for p in ("dog_only", "cat_only", "blend"))
    assert torch.allclose(blend, 0.75 * dog + 0.25 * cat, atol=1e-6)
    # Embed + Conditioning gives exactly what the all-in-one Encode node gives.
    _ok(comfy.run(graph(save="one_step")))
    assert torch.equal(_cond(comfy, "two_step")["0.cond"], _cond(comfy, "one_step")["0.cond"])

    # A saved embedding, copied to input/, loads back and conditions identically.
    saved = sorted((comfy.base / "output" / "emb").glob("dog_only_*.safetensors"))[-1]
    (comfy.base / "input" / "audiotoken_embeddings").mkdir(exist_ok=True)
    (comfy.base / "input" / "audiotoken_embeddings" / "dog.safetensors").write_bytes(saved.read_bytes())
    loaded = {
        "ckpt": g["ckpt"],
        "load": {"class_type": "AudioTokenLoadEmbedding", "inputs": {"embedding_name": "dog.safetensors"}},
        "cond": dict(g["cond"], inputs=dict(g["cond"]["inputs"], audio_embedding=["load", 0])),
        "savecond": {"class_type": "AudioTokenTest_SaveConditioning",
                     "inputs": {"conditioning": ["cond", 0], "filename": "from_file"}},
    }
    _ok(comfy.run(loaded))
    assert torch.equal(_cond(comfy, "from_file")["0.cond"], _cond(comfy, "one_step")["0.cond"])
    status, body = comfy.queue(dict(loaded, load={"class_type": "AudioTokenLoadEmbedding",
                                                  "inputs": {"embedding_name": "../../secret.safetensors"}}))
    assert status == 400 and "load" in body["node_errors"]


def test_import_reference_node_converts_the_released_format(comfy):
    from audiotoken_core.token_file import load_audiotoken

    reference = write_reference_bin(comfy.base / "models" / "audiotoken" / "embedder_learned_embeds.bin")
    entry = _ok(comfy.run({"imp": {"class_type": "AudioTokenImportReference",
                                   "inputs": {"reference_file": "embedder_learned_embeds.bin",
                                              "output_name": "imported_reference"}}}))
    shown = json.loads(entry["outputs"]["imp"]["text"][0])
    from audiotoken_core.io import git_blob_id
    assert shown["git_blob_id"] == git_blob_id(comfy.base / "models" / "audiotoken" / "embedder_learned_embeds.bin")
    assert shown["authors_release"] is False  # a random stand-in, not the authors' file
    token = load_audiotoken(comfy.base / "models" / "audiotoken" / "imported_reference.safetensors")
    assert token.widths == {"l": 768} and token.encoder["layers"] == [4, 8, 12]
    features = torch.randn(1, 20, 2304)
    with torch.no_grad():
        assert torch.allclose(token.embedders["l"](features), reference.eval()(features), atol=1e-6)
    info = comfy.get("/object_info/AudioTokenLoader")
    assert "imported_reference.safetensors" in str(info)


def test_long_recording_becomes_one_image_per_window(comfy):
    g = graph(audio="one_hour.wav")
    del g["encode"]
    g["win"] = {"class_type": "AudioTokenEmbedWindows",
                "inputs": {"audio": ["audio", 0], "audiotoken": ["tok", 0], "window_seconds": 10.0, "hop_seconds": 900.0,
                           "max_windows": 8, "channels": "mix"}}
    g["cond"] = {"class_type": "AudioTokenConditioning",
                 "inputs": {"clip": ["ckpt", 1], "audio_embedding": ["win", 0], "text": "a photo of <audio>",
                            "placeholder": "<audio>"}}
    g["sample"]["inputs"]["positive"] = ["cond", 0]
    g["latent"]["inputs"]["batch_size"] = ["win", 1]
    g["savecond"] = {"class_type": "AudioTokenTest_SaveConditioning",
                     "inputs": {"conditioning": ["cond", 0], "filename": "windows"}}
    entry = _ok(comfy.run(g))
    assert len(entry["outputs"]["save"]["images"]) == 4  # starts 0, 900, 1800, 2700 s
    cond = _cond(comfy, "windows")["0.cond"]
    assert cond.shape == (4, 77, 768)
    assert (cond[0] - cond[1]).abs().max() > 1e-4  # different stretches of the recording, different words
    g["win"]["inputs"]["hop_seconds"] = 10.0  # 360 windows > max_windows
    err = execution_error(comfy.run(g))
    assert err is not None and "max_windows" in err["exception_message"]
