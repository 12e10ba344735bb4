"""Session-wide real ComfyUI server for the tests, with generated models and audio.

Assets are generated at test time: an SD1.5-shaped checkpoint with random weights, an
official-format BEATs checkpoint (12 narrow layers), random AudioToken files, and audio
(CC0 recordings, sox, a NaN WAV, a truncated MP3).
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from audio_files import write_wav
from audiotoken_core.embedder import Embedder, EmbedderConfig
from audiotoken_core.token_file import AudioToken, save_audiotoken
from tools.comfy_server import ComfyServer
from tools.placeholder_beats import write_placeholder_beats
from tools.placeholder_sd import write_placeholder_sd15, write_placeholder_sdxl

CKPT = "sd15_tiny.safetensors"
BEATS = "beats_small.pt"
BEATS_SMALL = dict(encoder_layers=12, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                   embed_dim=64)
TOKEN_SD15 = "token_sd15.safetensors"
TOKEN_SD2 = "token_sd2_width1024.safetensors"
LAYERS = [4, 8, 12]
REFERENCE_BIN = "embedder_learned_embeds.bin"  # the authors' release format (SD1.4, BEATs base layers 4, 8, 12)
CKPT_SDXL = "sdxl_koala_tiny.safetensors"
TOKEN_SDXL = "token_sdxl.safetensors"
BEATS_BASE = "beats_base_full_size.pt"  # BEATs base shapes (768 wide): what the reference release reads


def _token(widths: dict[str, int], seed: int) -> AudioToken:
    torch.manual_seed(seed)
    feature_dim = BEATS_SMALL["encoder_embed_dim"] * len(LAYERS)
    embedders = {k: Embedder(EmbedderConfig(input_dim=feature_dim, output_dim=w)) for k, w in widths.items()}
    encoder = {"kind": "beats", "layers": LAYERS, "hidden_size": BEATS_SMALL["encoder_embed_dim"], "sample_rate": 16000}
    return AudioToken(embedders=embedders, encoder=encoder, description="random test token")


def write_reference_bin(path) -> torch.nn.Module:
    """A random Embedder saved exactly as the authors released theirs: torch.save(state_dict), 2304 -> 768."""
    torch.manual_seed(5)
    reference = Embedder(EmbedderConfig(input_dim=2304, output_dim=768))
    torch.save(reference.state_dict(), path)
    return reference


def write_eval_set(root, items, seed: int = 0) -> None:
    """An evaluation set as input/audiotoken_eval/<set>/ holds it: for each (label, audio file) the audio copied to
    root/<label>/ and a random 80x48 reference frame of the same name (.png) next to it."""
    rng = np.random.default_rng(seed)
    for label, audio in items:
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(audio, root / label / audio.name)
        frame = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
        Image.fromarray(frame).save(root / label / f"{audio.stem}.png")


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
        write_reference_bin(models / "audiotoken" / REFERENCE_BIN)
        (models / "audio_encoders" / "not_beats.safetensors").write_bytes(
            (models / "audiotoken" / TOKEN_SD15).read_bytes())
        inp = base / "input"
        for name in ("dog.mp3", "cat.mp3"):
            shutil.copy(next(p for p in cc0_recordings if p.name == name), inp / name)
        _sox("-n", "-r", "192000", "-c", "8", str(inp / "tone_192k_8ch.wav"), "synth", "1.5", "sine", "440")
        _sox("-n", "-r", "22050", "-c", "1", str(inp / "blip_50ms.wav"), "synth", "0.05", "sine", "1000")
        _sox("-n", "-r", "16000", "-c", "1", str(inp / "silence.wav"), "trim", "0", "3")
        _sox("-n", "-r", "8000", "-c", "1", str(inp / "one_hour.wav"), "synth", "3600", "brownnoise", "vol", "0.1")
        write_wav(inp / "nan.wav", np.full(16000, np.nan), codec="pcm_f32le")  # float WAVs can hold NaN
        (inp / "corrupt.mp3").write_bytes(next(p for p in cc0_recordings if p.name == "dog.mp3").read_bytes()[:300])
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sdxl_and_base_models(comfy):
    """Written only when a test asks: an SDXL-family checkpoint (1.9 GB, about 12 s), an SDXL AudioToken
    (Embedders 'g' 1280 and 'l' 768 on the small BEATs) and a BEATs with the real base shapes (363 MB)."""
    models = comfy.base / "models"
    write_placeholder_sdxl(models / "checkpoints" / CKPT_SDXL)
    save_audiotoken(models / "audiotoken" / TOKEN_SDXL, _token({"g": 1280, "l": 768}, seed=6))
    write_placeholder_beats(models / "audio_encoders" / BEATS_BASE, seed=4)
    yield CKPT_SDXL, TOKEN_SDXL, BEATS_BASE
    for big in (models / "checkpoints" / CKPT_SDXL, models / "audio_encoders" / BEATS_BASE):
        big.unlink(missing_ok=True)  # pytest keeps the last three sessions' folders: do not keep 2.3 GB each time


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


