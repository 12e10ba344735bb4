"""nodes/core_audio_encoder.py: ComfyUI core's AUDIO_ENCODER (wav2vec2, Whisper large v3) as an AudioToken encoder.

Random weights of the real architectures, with the key names core's `load_audio_encoder_from_sd`
detects (wav2vec2 base and large from `encoder.layer_norm.bias`, Whisper from
`model.encoder.embed_positions.weight`), in fp16 as the downloaded files are; loaded with core's
own loader in-process. References: core's own `encode_audio` (`encoded_audio_all_layers`) and
transformers' Wav2Vec2Model on the same weights. One test goes through a real ComfyUI server:
core's Load Audio Encoder on a file in models/audio_encoders -> our node -> Load AudioToken ->
Embed Audio, against the same computation in-process.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from PIL import Image
from safetensors.torch import load_file

from audio_files import write_tone, write_wav
from comfy_fixtures import CKPT, TOKEN_SD15
from tools.comfy_root import import_comfy, import_pack
from tools.comfy_server import execution_error

import_comfy(cpu=True)
import_pack()
import comfy.audio_encoders.audio_encoders as core_ae  # noqa: E402
import comfy.ops  # noqa: E402
from audiotoken.audiotoken_core.audio import AudioInputError, prepare_waveform  # noqa: E402
from audiotoken.audiotoken_core.embedder import Embedder, EmbedderConfig  # noqa: E402
from audiotoken.audiotoken_core.encoders import EncoderSpec  # noqa: E402
from audiotoken.audiotoken_core.hf_encoders import zero_mean_unit_var  # noqa: E402
from audiotoken.audiotoken_core.token_file import AudioToken, load_audiotoken, save_audiotoken  # noqa: E402
from audiotoken.nodes import core_audio_encoder as cae  # noqa: E402
from audiotoken.nodes.runtime import LoadedAudioToken  # noqa: E402
from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model as CoreWav2Vec2  # noqa: E402
from comfy.audio_encoders.whisper import AudioEncoder as CoreWhisperEncoder  # noqa: E402

W2V_FILE = "wav2vec2_base_random_fp16.safetensors"
W2V_TOKEN = "token_wav2vec2_base_4_8_12.safetensors"

WAV2VEC2 = {  # core's two configurations (comfy/audio_encoders/audio_encoders.py), as the files' shapes give them
    "base": dict(embed_dim=768, num_heads=12, num_layers=12, conv_norm=False, conv_bias=False, do_normalize=False,
                 do_stable_layer_norm=False),
    "large": dict(embed_dim=1024, num_heads=16, num_layers=24, conv_norm=True, conv_bias=True, do_normalize=True,
                  do_stable_layer_norm=True),
}


def _random_state(module: torch.nn.Module, seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """fp16 random weights for every tensor of `module` (built on the meta device: only names and shapes)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(("norm.weight", "original0")):  # norm scales, weight-norm magnitudes
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2:  # fan-in scaled, so activations keep their size through the depth
            value = torch.randn(shape, generator=gen) / math.sqrt(t[0].numel())
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        state[prefix + name] = value.to(torch.float16)
    return state


def wav2vec2_state(size: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = CoreWav2Vec2(**WAV2VEC2[size], operations=comfy.ops.manual_cast, dtype=torch.float16)
    return _random_state(model, seed)


@pytest.fixture(scope="session")
def w2v_base_state():
    return wav2vec2_state("base", seed=1)


def _core(state):
    """Core's own loader, as its Load Audio Encoder node calls it (on a copy: it renames keys in place)."""
    return core_ae.load_audio_encoder_from_sd(dict(state))


def _wave(seconds: float = 1.0, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * (1 + torch.arange(batch))[:, None] * t)
    return tone + 0.05 * torch.randn(batch, t.numel(), generator=gen)


def _core_layers(core, wave: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Core's encoded_audio_all_layers of ONE clip ([1, T] 16 kHz), as its Audio Encoder Encode node makes it."""
    assert wave.shape[0] == 1  # core normalises over the whole batch; one clip is core's usual case
    with torch.no_grad():
        return core.encode_audio(wave[:, None, :], 16000)["encoded_audio_all_layers"]


def _split(features: torch.Tensor, spec: EncoderSpec) -> list[torch.Tensor]:
    return list(features.split(spec.hidden_size, dim=-1))


# -- wav2vec2 ------------------------------------------------------------------------------------

def test_wav2vec2_base_layers_equal_core_all_layers(w2v_base_state):
    core = _core(w2v_base_state)
    assert type(core.model).__name__ == "Wav2Vec2Model" and not core.model.do_normalize  # core's base setting
    encoder = cae.CoreAudioEncoder(core, None)
    assert encoder.spec == EncoderSpec(kind="wav2vec2", layers=(4, 8, 12), hidden_size=768)
    wave = _wave(0.5)
    with torch.no_grad():
        features = encoder(wave)
    reference = _core_layers(core, wave)
    assert len(reference) == 13 and features.shape == (1, 24, 3 * 768)  # 0.5 s -> 24 frames of 20 ms
    for part, layer in zip(_split(features, encoder.spec), encoder.spec.layers):
        torch.testing.assert_close(part, reference[layer].float(), rtol=0, atol=1e-4)
    # Other layers, in the order given; clips of a batch are independent of each other.
    encoder = cae.CoreAudioEncoder(core, (2, 1))
    two = _wave(0.5, batch=2, seed=3)
    with torch.no_grad():
        features = encoder(two)
    for b in range(2):
        reference = _core_layers(core, two[b:b + 1])
        torch.testing.assert_close(features[b:b + 1], torch.cat([reference[2], reference[1]], -1).float(),
                                   rtol=0, atol=1e-4)


def test_wav2vec2_stops_after_the_highest_layer(w2v_base_state):
    core = _core(w2v_base_state)
    encoder = cae.CoreAudioEncoder(core, (3,))
    calls = []
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, block in enumerate(core.model.encoder.layers)]
    try:
        with torch.no_grad():
            encoder(_wave(0.5))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1, 2]  # blocks 4..12 never ran
    assert not core.model.encoder.layers[0]._forward_hooks  # our own hooks are gone again


def _transformers_wav2vec2(state: dict[str, torch.Tensor], size: str):
    """transformers' Wav2Vec2Model with the same weights (core's key names are transformers' names)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = WAV2VEC2[size]
    config = Wav2Vec2Config(
        hidden_size=cfg["embed_dim"], num_attention_heads=cfg["num_heads"], num_hidden_layers=cfg["num_layers"],
        intermediate_size=4 * cfg["embed_dim"], feat_extract_norm="layer" if cfg["conv_norm"] else "group",
        conv_bias=cfg["conv_bias"], do_stable_layer_norm=cfg["do_stable_layer_norm"])
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    names = set(model.state_dict())
    # transformers 4.x names the weight-norm tensors weight_g / weight_v; newer ones use parametrizations
    rename = {} if any("original0" in n for n in names) else {".parametrizations.weight.original0": ".weight_g",
                                                               ".parametrizations.weight.original1": ".weight_v"}
    mapped = {}
    for key, value in state.items():
        for old, new in rename.items():
            key = key.replace(old, new)
        mapped[key] = value.float()
    assert set(mapped) == names
    model.load_state_dict(mapped, assign=True)
    return model.eval()


@pytest.mark.parametrize("size", ["base", "large"])
def test_core_wav2vec2_equals_transformers(size, w2v_base_state):
    """The same weights give the same features in core and transformers: kind 'wav2vec2' is shared."""
    state = w2v_base_state if size == "base" else wav2vec2_state("large", seed=2)
    core = _core(state)
    num_layers = WAV2VEC2[size]["num_layers"]
    encoder = cae.CoreAudioEncoder(core, (1, num_layers // 2, num_layers))
    reference = _transformers_wav2vec2(state, size)
    wave = _wave(0.5, batch=2, seed=4) * torch.tensor([[1.0], [0.1]]) + 0.05
    inputs = zero_mean_unit_var(wave) if WAV2VEC2[size]["do_normalize"] else wave  # Wav2Vec2FeatureExtractor's rule
    with torch.no_grad():
        features = encoder(wave)
        hidden = reference(input_values=inputs, output_hidden_states=True).hidden_states
    for part, layer in zip(_split(features, encoder.spec), encoder.spec.layers):
        torch.testing.assert_close(part, hidden[layer], rtol=0, atol=2e-4)
    if size == "large":  # core's last entry of the pre-LN model adds the final LayerNorm; our layer 24 does not
        assert core.model.do_normalize and encoder.spec.hidden_size == 1024
        reference_core = _core_layers(core, wave[:1])
        ours = _split(encoder(wave[:1]), encoder.spec)
        torch.testing.assert_close(ours[1], reference_core[num_layers // 2].float(), rtol=0, atol=2e-4)
        torch.testing.assert_close(core.model.encoder.layer_norm(ours[2]), reference_core[num_layers].float(),
                                   rtol=0, atol=2e-4)
        assert not torch.allclose(ours[2], reference_core[num_layers].float(), atol=1e-2)


# -- Whisper -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper_core():
    """Whisper large v3's encoder (32 blocks of 1280, 637M parameters) with random fp16 weights, loaded by core."""
    with torch.device("meta"):
        shapes = CoreWhisperEncoder(operations=comfy.ops.manual_cast, dtype=torch.float16)
    core = _core(_random_state(shapes, seed=5, prefix="model.encoder."))
    assert type(core.model).__name__ == "WhisperLargeV3"
    return core


def test_whisper_layers_equal_core_all_layers(whisper_core):
    core = whisper_core
    full = cae.CoreAudioEncoder(core, None)
    assert full.spec == EncoderSpec(kind="whisper", layers=(11, 21, 32), hidden_size=1280)
    with pytest.raises(ValueError, match=r"valid layers for this 32-layer encoder are 1\.\.32"):
        cae.CoreAudioEncoder(core, (33,))
    # Core's forward computes all 32 blocks on 1500 tokens (minutes on a CPU): for the comparison, both run on
    # core's model cut to its first 2 blocks (the real blocks of the real width).
    blocks = core.model.encoder.layers
    core.model.encoder.layers = torch.nn.ModuleList(list(blocks)[:2])
    try:
        encoder = cae.CoreAudioEncoder(core, (1, 2))
        wave = _wave(2.0)
        with torch.no_grad():
            features = encoder(wave)
        reference = _core_layers(core, wave)
        assert reference[1].shape == (1, 1500, 1280)  # core pads every clip to 30 s
        assert features.shape == (1, 100, 2 * 1280)  # we keep the 50 tokens per second that cover the 2 s
        ours = _split(features, encoder.spec)
        torch.testing.assert_close(ours[0], reference[1][:, :100].float(), rtol=0, atol=5e-4)
        torch.testing.assert_close(core.model.encoder.layer_norm(ours[1]), reference[2][:, :100].float(),
                                   rtol=0, atol=5e-4)
        # Per clip: a quiet clip next to a loud one gets its own log-mel floor (core's floor is per batch).
        pair = torch.cat([wave, 0.01 * _wave(2.0, seed=7)])
        with torch.no_grad():
            both = encoder(pair)
            alone = encoder(pair[1:])
        torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)
        with pytest.raises(AudioInputError, match="at most 30 s.*window_seconds to 30 or less"):
            encoder(_wave(31.0))
    finally:
        core.model.encoder.layers = blocks


# -- errors and the node ---------------------------------------------------------------------------

def test_not_an_audio_encoder_and_bad_layers(w2v_base_state):
    with pytest.raises(ValueError, match="holds a dict, not a wav2vec2 or Whisper model.*Load Audio Encoder"):
        cae.AudioTokenFromAudioEncoder.execute({"not": "an encoder"}, "auto")

    class Other:  # e.g. upstream's SheetSage2 audio encoder
        model = torch.nn.Linear(2, 2)
        patcher = None
        model_sample_rate = 24000

    with pytest.raises(ValueError, match="holds a Linear, not a wav2vec2 or Whisper model"):
        cae.CoreAudioEncoder(Other(), None)
    core = _core(w2v_base_state)
    with pytest.raises(ValueError, match=r"valid layers for this 12-layer encoder are 1\.\.12"):
        cae.AudioTokenFromAudioEncoder.execute(core, "4,13")
    with pytest.raises(ValueError, match="not a comma-separated list"):
        cae.AudioTokenFromAudioEncoder.execute(core, "4;8")


def test_node_shares_cores_patcher_and_tokens_check_the_spec(w2v_base_state):
    core = _core(w2v_base_state)
    loaded = cae.AudioTokenFromAudioEncoder.execute(core, "4,8,12").args[0]
    assert loaded.patcher is core.patcher  # one owner for the weights: core's ModelPatcher
    assert loaded.encoder.spec.to_dict() == {"kind": "wav2vec2", "layers": [4, 8, 12], "hidden_size": 768,
                                             "sample_rate": 16000, "feature_dim": 2304}
    # A token trained on a transformers wav2vec2 base with layers 4,8,12 reads these features; a BEATs token does not.
    loaded.encoder.spec.check_token({"kind": "wav2vec2", "layers": [4, 8, 12], "hidden_size": 768}, "t")
    with pytest.raises(ValueError, match="trained on beats layers"):
        loaded.encoder.spec.check_token({"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768}, "t")
    # Embedding through the runtime: core's patcher loads the model, the token reads the features.
    token = _token(seed=8)
    bound = LoadedAudioToken(token=token, encoder=loaded, name="t")
    wave = _wave(0.5, batch=2)
    vectors = bound.embed_wave16(wave)
    with torch.no_grad():
        expected = token.embed(loaded.encoder(wave)).vectors["l"]
    torch.testing.assert_close(vectors["l"], expected, rtol=0, atol=1e-5)


def _token(seed: int) -> AudioToken:
    torch.manual_seed(seed)
    encoder = {"kind": "wav2vec2", "layers": [4, 8, 12], "hidden_size": 768, "sample_rate": 16000}
    return AudioToken(embedders={"l": Embedder(EmbedderConfig(input_dim=3 * 768, output_dim=768))}, encoder=encoder,
                      description="random wav2vec2 test token").eval()


# -- the user's path on a real server ------------------------------------------------------------------

@pytest.mark.comfyui
def test_server_core_loader_to_audiotoken(comfy, w2v_base_state, tmp_path):
    models = comfy.base / "models"
    save_file(w2v_base_state, str(models / "audio_encoders" / W2V_FILE))
    token = _token(seed=9)
    save_audiotoken(models / "audiotoken" / W2V_TOKEN, token)
    rng = np.random.default_rng(0)
    samples = (0.3 * np.sin(2 * np.pi * 330 * np.arange(24000) / 16000) + 0.05 * rng.standard_normal(24000))
    write_wav(comfy.base / "input" / "w2v_tone.wav", samples.astype(np.float32), codec="pcm_f32le")

    def graph(token_name: str, prefix: str) -> dict:
        return {
            "load": {"class_type": "AudioEncoderLoader", "inputs": {"audio_encoder_name": W2V_FILE}},
            "enc": {"class_type": "AudioTokenFromAudioEncoder", "inputs": {"audio_encoder": ["load", 0], "layers": "4,8,12"}},
            "tok": {"class_type": "AudioTokenLoader",
                    "inputs": {"audiotoken_name": token_name, "audio_encoder": ["enc", 0], "pooling": "deterministic"}},
            "audio": {"class_type": "LoadAudio", "inputs": {"audio": "w2v_tone.wav"}},
            "embed": {"class_type": "AudioTokenEmbedAudio",
                      "inputs": {"audio": ["audio", 0], "audiotoken": ["tok", 0], "start_seconds": 0.0,
                                 "window_seconds": 1.5, "channels": "mix", "loop_short_audio": True}},
            "save": {"class_type": "AudioTokenSaveEmbedding",
                     "inputs": {"audio_embedding": ["embed", 0], "filename_prefix": prefix}},
        }

    entry = comfy.run(graph(W2V_TOKEN, "emb/w2v_core"))
    err = execution_error(entry)
    assert err is None, f"{err['exception_type']}: {err['exception_message']}\n{err.get('traceback')}"
    saved = sorted((comfy.base / "output" / "emb").glob("w2v_core*.safetensors"))
    assert len(saved) == 1
    got = load_file(str(saved[0]))
    # The same computation in-process: core's loader, our adapter, the token file as saved.
    encoder = cae.CoreAudioEncoder(_core(w2v_base_state), (4, 8, 12))
    wave16 = prepare_waveform(torch.from_numpy(samples.astype(np.float32))[None, None], 16000, channel_policy="mix",
                              start_seconds=0.0, window_seconds=1.5, loop=True)
    with torch.no_grad():
        expected = load_audiotoken(models / "audiotoken" / W2V_TOKEN).embed(encoder(wave16)).vectors["l"]
    vectors = [v for k, v in got.items() if k == "vectors.l"]
    assert len(vectors) == 1, list(got)
    torch.testing.assert_close(vectors[0].reshape(expected.shape).float(), expected, rtol=1e-3, atol=1e-4)

    # Trainable like BEATs: Train AudioToken on this encoder writes a token that records its spec, and the
    # token reads the encoder's features right away.
    root = comfy.base / "input" / "audiotoken_datasets" / "w2v_tones"
    for label, freq, colour in (("low", 300, (200, 30, 30)), ("high", 3000, (30, 30, 200))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            write_tone(root / label / f"{label}{i}.wav", freq * (1 + 0.1 * i), seconds=1.0)
            Image.new("RGB", (32, 32), colour).save(root / label / f"{label}{i}.png")
    train = graph(W2V_TOKEN, "emb/w2v_trained")
    del train["tok"]
    train["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}
    train["data"] = {"class_type": "AudioTokenDataset",
                     "inputs": {"folder": "w2v_tones", "kind": "audio + image pairs", "csv_name": "", "frame": "middle",
                                "image_width": 64, "image_height": 64, "check_files": True, "clip_scorer": "none"}}
    train["train"] = {"class_type": "AudioTokenTrain",
                      "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "audio_encoder": ["enc", 0],
                                 "dataset": ["data", 0], "name": "w2v_core_trained", "steps": 2, "learning_rate": 1e-4,
                                 "batch_size": 2, "grad_accum": 1, "seed": 0, "lambda_l1": 0.01, "lambda_cl": 0.0,
                                 "save_every": 2, "resume": False, "precision": "fp32", "gradient_checkpointing": False,
                                 "cache_features": False, "objective": "text_match"}}
    train["embed"]["inputs"]["audiotoken"] = ["train", 0]
    entry = comfy.run(train, timeout=600)
    err = execution_error(entry)
    assert err is None, f"{err['exception_type']}: {err['exception_message']}\n{err.get('traceback')}"
    trained = load_audiotoken(models / "audiotoken" / "w2v_core_trained.safetensors")
    assert trained.training_info["step"] == 2 and trained.training_info["completed"]
    assert {k: trained.encoder[k] for k in ("kind", "layers", "hidden_size", "feature_dim")} == {
        "kind": "wav2vec2", "layers": [4, 8, 12], "hidden_size": 768, "feature_dim": 2304}
    saved = sorted((comfy.base / "output" / "emb").glob("w2v_trained*.safetensors"))
    with torch.no_grad():
        expected = trained.eval().embed(encoder(wave16)).vectors["l"]
    torch.testing.assert_close(load_file(str(saved[0]))["vectors.l"].reshape(expected.shape).float(), expected,
                               rtol=1e-3, atol=1e-4)

    # A BEATs token on this encoder: the spec check names both sides.
    entry = comfy.run(graph(TOKEN_SD15, "emb/w2v_wrong"))
    err = execution_error(entry)
    assert err is not None and "was trained on beats layers [4, 8, 12]" in err["exception_message"]
    assert "the audio encoder is wav2vec2 layers [4, 8, 12] (hidden size 768" in err["exception_message"]
