"""End-to-end tests against a REAL ComfyUI server (0.3.75) with this pack in custom_nodes.

Assets are generated here at test time: an SD1.5-shaped checkpoint with random weights,
an official-format BEATs checkpoint (12 narrow layers), random AudioToken files, and audio
(CC0 recordings, sox). Everything is driven over HTTP, as a user's browser would.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audiotoken_core.embedder import Embedder, EmbedderConfig
from audiotoken_core.embedding import load_embedding
from audiotoken_core.token_file import AudioToken, save_audiotoken
from tools.comfy_server import ComfyServer, execution_error
from tools.placeholder_beats import write_placeholder_beats
from tools.placeholder_sd import write_placeholder_sd15

pytestmark = pytest.mark.comfyui

CKPT = "sd15_tiny.safetensors"
BEATS = "beats_small.pt"
BEATS_SMALL = dict(encoder_layers=12, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                   embed_dim=64)
TOKEN_SD15 = "token_sd15.safetensors"
TOKEN_SD2 = "token_sd2_width1024.safetensors"
LAYERS = [4, 8, 12]


def _token(widths: dict[str, int], seed: int) -> AudioToken:
    torch.manual_seed(seed)
    feature_dim = BEATS_SMALL["encoder_embed_dim"] * len(LAYERS)
    embedders = {k: Embedder(EmbedderConfig(input_dim=feature_dim, output_dim=w)) for k, w in widths.items()}
    encoder = {"kind": "beats", "layers": LAYERS, "hidden_size": BEATS_SMALL["encoder_embed_dim"], "sample_rate": 16000}
    return AudioToken(embedders=embedders, encoder=encoder, description="random test token")


def _sox(*args: str) -> None:
    if shutil.which("sox") is None:
        pytest.fail("sox is not installed: run scripts/setup_env.sh (apt-get install sox)")
    subprocess.run(["sox", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, cc0_recordings):
    base = tmp_path_factory.mktemp("comfy")
    server = ComfyServer(base)  # creates the folder layout and starts loading ComfyUI
    try:
        models = base / "models"
        write_placeholder_sd15(models / "checkpoints" / CKPT)
        write_placeholder_beats(models / "audio_encoders" / BEATS, seed=1, **BEATS_SMALL)
        save_audiotoken(models / "audiotoken" / TOKEN_SD15, _token({"l": 768}, seed=2))
        save_audiotoken(models / "audiotoken" / TOKEN_SD2, _token({"h": 1024}, seed=3))
        (models / "audio_encoders" / "not_beats.safetensors").write_bytes(
            (models / "audiotoken" / TOKEN_SD15).read_bytes())
        inp = base / "input"
        for name in ("dog.mp3", "cat.mp3"):
            shutil.copy(next(p for p in cc0_recordings if p.name == name), inp / name)
        _sox("-n", "-r", "192000", "-c", "8", str(inp / "tone_192k_8ch.wav"), "synth", "1.5", "sine", "440")
        _sox("-n", "-r", "22050", "-c", "1", str(inp / "blip_50ms.wav"), "synth", "0.05", "sine", "1000")
        _sox("-n", "-r", "16000", "-c", "1", str(inp / "silence.wav"), "trim", "0", "3")
        _sox("-n", "-r", "8000", "-c", "1", str(inp / "one_hour.wav"), "synth", "3600", "brownnoise", "vol", "0.1")
        _write_nan_wav(inp / "nan.wav")
        (inp / "corrupt.mp3").write_bytes(next(p for p in cc0_recordings if p.name == "dog.mp3").read_bytes()[:300])
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _write_nan_wav(path: Path) -> None:
    """A float32 WAV whose samples are NaN (possible in the format; some tools write them)."""
    import av
    import numpy as np

    samples = np.full((1, 16000), np.nan, dtype=np.float32)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def graph(audio="dog.mp3", text="a photo of <audio>", token=TOKEN_SD15, encoder=BEATS, save="image",
          start=0.0, window=10.0, channels="mix"):
    """API-format graph: LoadAudio -> loaders -> AudioTokenEncode -> KSampler -> VAEDecode -> SaveImage."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "audio": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": encoder, "layers": "auto"}},
        "tok": {"class_type": "AudioTokenLoader",
                "inputs": {"audiotoken_name": token, "audio_encoder": ["enc", 0], "pooling": "deterministic"}},
        "encode": {"class_type": "AudioTokenEncode",
                   "inputs": {"clip": ["ckpt", 1], "audio": ["audio", 0], "audiotoken": ["tok", 0], "text": text,
                              "placeholder": "<audio>", "start_seconds": start, "window_seconds": window,
                              "channels": channels, "loop_short_audio": True}},
    }
    if save == "image":
        g.update({
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "sample": {"class_type": "KSampler",
                       "inputs": {"model": ["ckpt", 0], "positive": ["encode", 0], "negative": ["neg", 0],
                                  "latent_image": ["latent", 0], "seed": 1, "steps": 2, "cfg": 7.5,
                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "audiotoken_test"}},
        })
    else:
        g["savecond"] = {"class_type": "AudioTokenTest_SaveConditioning",
                         "inputs": {"conditioning": ["encode", 0], "filename": save}}
        g["saveemb"] = {"class_type": "AudioTokenSaveEmbedding",
                        "inputs": {"audio_embedding": ["encode", 1], "filename_prefix": f"emb/{save}"}}
    return g


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
