"""CLAP's audio tower (HTSAT) behind load_audio_encoder.

Small random CLAP models are built at test time (save_pretrained, safetensors); our torch
preprocessing is checked against transformers' ClapFeatureExtractor and the features of the
last stage's blocks against transformers' own forward (`hidden_states[-1]` is the output of
the last block; a copy with fewer blocks in its last stage gives the earlier blocks).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from audiotoken_core.audio import AudioInputError, resample
from audiotoken_core.encoders import AudioEncoderFileError, EncoderSpec, load_audio_encoder
from audiotoken_core.hf_encoders import ClapAudioEncoder, ClapPreprocessing, clap_features

from transformers import ClapAudioConfig, ClapAudioModel, ClapConfig, ClapFeatureExtractor, ClapModel  # noqa: E402

AUDIO = dict(spec_size=64, num_mel_bins=16, window_size=4, depths=[1, 1, 3], num_attention_heads=[2, 2, 4],
             patch_embeds_hidden_size=16, hidden_size=64, projection_dim=16)
TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100)
# 16 mel bins, 2 s at 48 kHz, hop 960 -> 101 frames: within the tiny model's 256 x 16 spectrogram image
PRE = dict(feature_size=16, sampling_rate=48000, hop_length=960, max_length_s=2, fft_window_size=1024,
           frequency_min=50, frequency_max=14000)


def _wave(batch=2, seconds=1.5, rate=16000, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    return 0.3 * torch.sin(2 * torch.pi * 440 * t)[None] + 0.05 * torch.randn(batch, t.numel(), generator=g)


def _init(model: nn.Module) -> nn.Module:
    """Random weights with a non-trivial BatchNorm, so the test sees its running statistics."""
    bn = model.audio_encoder.batch_norm
    bn.running_mean.uniform_(-60, -20)
    bn.running_var.uniform_(50, 200)
    return model.eval()


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    """A full ClapModel folder (text tower too), as users download it; truncation 'fusion' (laion fused)."""
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(audio_config=dict(AUDIO, enable_fusion=True, fusion_type="aff_2d"), text_config=TEXT))
    _init(model.audio_model)
    folder = tmp_path_factory.mktemp("clap")
    model.save_pretrained(folder, safe_serialization=True)
    ClapFeatureExtractor(**PRE, truncation="fusion").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    """A bare ClapAudioModel folder (model_type clap_audio_model), truncation 'rand_trunc' (laion unfused)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("clap_audio")
    _init(ClapAudioModel(ClapAudioConfig(**AUDIO))).save_pretrained(folder, safe_serialization=True)
    ClapFeatureExtractor(**PRE, truncation="rand_trunc").save_pretrained(folder)
    return folder


def _extractor(truncation, padding="repeatpad", **over):
    return ClapFeatureExtractor(**dict(PRE, **over), truncation=truncation, padding=padding)


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
def test_clap_features_equal_feature_extractor(truncation, padding):
    extractor = _extractor(truncation, padding)
    pre = ClapPreprocessing.from_dict(extractor.to_dict())
    for seconds in (0.7, 2.0):  # shorter than max_length_s (padded) and exactly it
        wave = _wave(2, seconds, rate=48000)
        expected = extractor([w.numpy() for w in wave], sampling_rate=48000, return_tensors="pt")["input_features"]
        ours = clap_features(wave, pre)
        assert ours.shape == expected.shape == (2, 4 if truncation == "fusion" else 1, 101, 16)
        torch.testing.assert_close(ours, expected.float(), rtol=0, atol=2e-3)
    # The default extractor: 64 mel bins, 10 s at 48 kHz, hop 480.
    extractor = ClapFeatureExtractor(truncation=truncation)
    wave = _wave(1, 4.0, rate=48000)
    expected = extractor([wave[0].numpy()], sampling_rate=48000, return_tensors="pt")["input_features"]
    ours = clap_features(wave, ClapPreprocessing(truncation=truncation))
    assert ours.shape == expected.shape and ours.shape[-2:] == (1001, 64)
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=2e-3)


def test_clap_features_refuse_long_audio_and_bad_settings():
    with pytest.raises(AudioInputError, match="at most 2 s.*window_seconds to 2 or less"):
        clap_features(_wave(1, 2.5, rate=48000), ClapPreprocessing.from_dict(PRE))
    with pytest.raises(AudioEncoderFileError, match="truncation 'fusion' or 'rand_trunc'"):
        ClapPreprocessing.from_dict({"truncation": "crop"})


def _reference_last_block_outputs(model: ClapAudioModel, features: torch.Tensor, blocks: int, **kwargs):
    """transformers' own forward of a copy whose last stage keeps `blocks` blocks: hidden_states[-1], [B, N, C]."""
    copy_ = copy.deepcopy(model)
    stage = copy_.audio_encoder.layers[-1]
    stage.blocks = nn.ModuleList(list(stage.blocks)[:blocks])
    with torch.no_grad():
        hidden = copy_(input_features=features, output_hidden_states=True, **kwargs).hidden_states[-1]
    return hidden.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("which", ["clap", "clap_audio_model"])
def test_clap_encoder_matches_transformers(which, clap_folder, audio_folder):
    folder = clap_folder if which == "clap" else audio_folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == which
    encoder = load_audio_encoder(folder)
    assert isinstance(encoder, ClapAudioEncoder)
    assert encoder.spec == EncoderSpec(kind="clap", layers=(1, 2, 3), hidden_size=64)  # last stage: 3 blocks, 16*2^2
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    wave16 = _wave(2, 1.5)
    with torch.no_grad():
        features = encoder(wave16)
    assert features.shape == (2, (64 // 4 // 4) ** 2, 3 * 64)  # 4 x 4 tokens of the last stage

    # Preprocessing: our resampler to 48 kHz, then exactly ClapFeatureExtractor.
    truncation = "fusion" if which == "clap" else "rand_trunc"
    wave48 = resample(wave16, 16000, 48000)
    expected_input = _extractor(truncation)([w.numpy() for w in wave48], sampling_rate=48000,
                                            return_tensors="pt")["input_features"].float()
    torch.testing.assert_close(encoder.preprocess(wave16), expected_input, rtol=0, atol=2e-3)

    # Features: transformers' forward of the saved model on the same input.
    if which == "clap":
        reference = ClapModel.from_pretrained(str(folder), local_files_only=True).audio_model.eval()
        kwargs = {"is_longer": torch.zeros(2, 1, dtype=torch.bool)}
    else:
        reference = ClapAudioModel.from_pretrained(str(folder), local_files_only=True).eval()
        kwargs = {}
    inputs = encoder.preprocess(wave16)
    for j, layer in enumerate((1, 2, 3)):
        expected = _reference_last_block_outputs(reference, inputs, layer, **kwargs)
        torch.testing.assert_close(features[..., j * 64:(j + 1) * 64], expected, rtol=0, atol=1e-4)


def test_clap_layer_choice_stops_early(clap_folder):
    encoder = load_audio_encoder(clap_folder, layers=[2, 1])
    assert encoder.spec.layers == (2, 1) and encoder.spec.feature_dim == 128
    assert len(encoder.model.audio_encoder.layers[-1].blocks) == 2  # block 3 is dropped, never computed
    full = load_audio_encoder(clap_folder)
    wave16 = _wave(1, 2.0)
    with torch.no_grad():
        part, whole = encoder(wave16), full(wave16)
    torch.testing.assert_close(part, torch.cat([whole[..., 64:128], whole[..., :64]], dim=-1), rtol=0, atol=1e-5)
    # Runs under the caller's grad mode (trainable like BEATs: the features carry gradients to the input).
    x = wave16.clone().requires_grad_(True)
    encoder(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # A window longer than CLAP's max_length_s (here 2 s) is refused with the fix.
    with pytest.raises(AudioInputError, match="window_seconds to 2 or less"):
        encoder(_wave(1, 2.5))


@pytest.mark.parametrize("layers", [[0], [4], [1, 1], []])
def test_clap_bad_layers_name_the_valid_range(clap_folder, layers):
    with pytest.raises(ValueError, match=r"valid layers for this 3-layer encoder are 1\.\.3"):
        load_audio_encoder(clap_folder, layers=layers)


def test_clap_folder_with_wrong_weights(tmp_path, clap_folder):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "config.json").write_text((clap_folder / "config.json").read_text())
    torch.manual_seed(3)
    ClapAudioModel(ClapAudioConfig(**dict(AUDIO, depths=[1, 1, 2]))).save_pretrained(tmp_path / "other")
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(AudioEncoderFileError, match="do not fit its config.json's CLAP audio tower"):
        load_audio_encoder(folder)
