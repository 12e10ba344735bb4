"""transformers audio encoders (AST, wav2vec2, HuBERT) behind load_audio_encoder.

Tiny random models are built at test time and saved with save_pretrained(safe_serialization=True);
our torch preprocessing is checked against transformers' own feature extractors (AST's runs
its numpy fallback here, as torchaudio is not installed) and our layer features against the
model's `hidden_states`.
"""
from __future__ import annotations

import json

import pytest
import torch

from audiotoken_core.encoders import AudioEncoder, AudioEncoderFileError, EncoderSpec, load_audio_encoder
from audiotoken_core.hf_encoders import AST_DEFAULT_MEAN, AST_DEFAULT_STD, HFAudioEncoder, ast_features, zero_mean_unit_var
from audiotoken_core.io import UnsafeFileError

from transformers import (  # noqa: E402
    ASTConfig,
    ASTFeatureExtractor,
    ASTModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

CONV = dict(conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def _wave(batch=2, seconds=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 330 * t)[None] + 0.05 * torch.randn(batch, t.numel(), generator=g)


def _save(model, folder, feature_extractor=None):
    model.save_pretrained(folder, safe_serialization=True)
    if feature_extractor is not None:
        feature_extractor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ast_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = ASTConfig(num_hidden_layers=3, num_mel_bins=64, max_length=120, frequency_stride=10, time_stride=10, **TINY)
    folder = tmp_path_factory.mktemp("ast")
    return _save(ASTModel(config).eval(), folder, ASTFeatureExtractor(num_mel_bins=64, max_length=120))


@pytest.fixture(scope="module")
def w2v_folder(tmp_path_factory):
    torch.manual_seed(1)
    config = Wav2Vec2Config(num_hidden_layers=6, do_stable_layer_norm=True, **TINY, **CONV)
    folder = tmp_path_factory.mktemp("w2v")
    return _save(Wav2Vec2Model(config).eval(), folder, Wav2Vec2FeatureExtractor(do_normalize=True))


def _reference(model_cls, folder, inputs):
    model = model_cls.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        return model(input_values=inputs, output_hidden_states=True).hidden_states


def _split(features, spec: EncoderSpec):
    return [features[..., j * spec.hidden_size:(j + 1) * spec.hidden_size] for j in range(len(spec.layers))]


def test_ast_features_equal_ast_feature_extractor():
    for num_mel_bins, max_length, seconds in ((128, 1024, 3.0), (64, 120, 2.0), (64, 120, 0.5)):
        extractor = ASTFeatureExtractor(num_mel_bins=num_mel_bins, max_length=max_length)
        wave = _wave(2, seconds)
        expected = extractor([w.numpy() for w in wave], sampling_rate=16000, return_tensors="pt")["input_values"]
        ours = ast_features(wave, num_mel_bins=num_mel_bins, max_length=max_length)
        assert ours.shape == expected.shape == (2, max_length, num_mel_bins)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # The extractor takes the [-1, 1] wave as is (no int16 scaling); padding rows normalise to -mean / (2 std).
    short = ast_features(_wave(1, 0.5), num_mel_bins=64, max_length=120)
    torch.testing.assert_close(short[0, -1], torch.full((64,), -AST_DEFAULT_MEAN / (2 * AST_DEFAULT_STD)))


def test_wav2vec2_normalisation_equals_feature_extractor():
    wave = _wave(2, 1.0) * torch.tensor([[1.0], [0.01]]) + 0.1
    expected = Wav2Vec2FeatureExtractor(do_normalize=True)([w.numpy() for w in wave], sampling_rate=16000,
                                                           return_tensors="pt")["input_values"]
    torch.testing.assert_close(zero_mean_unit_var(wave), expected, rtol=0, atol=1e-5)


def test_ast_encoder_matches_hidden_states(ast_folder):
    encoder = load_audio_encoder(ast_folder)
    assert isinstance(encoder, AudioEncoder) and isinstance(encoder, HFAudioEncoder)
    assert encoder.spec == EncoderSpec(kind="ast", layers=(1, 2, 3), hidden_size=32)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    wave = _wave(2, 1.5)
    features = encoder(wave)
    tokens = 2 + ((64 - 16) // 10 + 1) * ((120 - 16) // 10 + 1)  # cls + distillation + patches
    assert features.shape == (2, tokens, 96)
    inputs = ASTFeatureExtractor(num_mel_bins=64, max_length=120)([w.numpy() for w in wave], sampling_rate=16000,
                                                                    return_tensors="pt")["input_values"]
    hidden = _reference(ASTModel, ast_folder, inputs)
    for part, layer in zip(_split(features, encoder.spec), encoder.spec.layers):
        torch.testing.assert_close(part, hidden[layer], rtol=0, atol=2e-4)


def test_wav2vec2_stop_early_and_layer_choice(w2v_folder):
    wave = _wave(2, 1.0)
    inputs = Wav2Vec2FeatureExtractor(do_normalize=True)([w.numpy() for w in wave], sampling_rate=16000,
                                                         return_tensors="pt")["input_values"]
    hidden = _reference(Wav2Vec2Model, w2v_folder, inputs)
    default = load_audio_encoder(w2v_folder)
    assert default.spec.layers == (2, 4, 6)  # thirds of the depth, like BEATs' (4, 8, 12)
    with torch.no_grad():
        for part, layer in zip(_split(default(wave), default.spec), default.spec.layers):
            torch.testing.assert_close(part, hidden[layer], rtol=0, atol=1e-4)

    encoder = load_audio_encoder(w2v_folder, layers=[3, 1])
    assert encoder.spec.layers == (3, 1) and encoder.spec.feature_dim == 64
    blocks = encoder.model.encoder.layers
    assert len(blocks) == 3  # layers 4..6 are dropped, never computed
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        features = encoder(wave)
    assert calls == [0, 1, 2]
    assert features.shape == (2, hidden[0].shape[1], 64)
    # The stable-layer-norm model's final LayerNorm is not part of a layer's output.
    for part, layer in zip(_split(features, encoder.spec), (3, 1)):
        torch.testing.assert_close(part, hidden[layer], rtol=0, atol=1e-4)
    # Runs under the caller's grad mode.
    x = wave[:1].clone().requires_grad_(True)
    encoder(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hubert_and_do_normalize_false(tmp_path):
    torch.manual_seed(2)
    config = HubertConfig(num_hidden_layers=3, **TINY, **CONV)
    folder = _save(HubertModel(config).eval(), tmp_path / "hubert", Wav2Vec2FeatureExtractor(do_normalize=False))
    encoder = load_audio_encoder(folder, layers=(2,))
    assert encoder.spec == EncoderSpec(kind="hubert", layers=(2,), hidden_size=32)
    wave = _wave(1, 1.0) + 0.2  # an offset the normalisation would remove
    hidden = _reference(HubertModel, folder, wave)
    with torch.no_grad():
        torch.testing.assert_close(encoder(wave), hidden[2], rtol=0, atol=1e-5)
    # Without preprocessor_config.json, do_normalize defaults to True.
    (folder / "preprocessor_config.json").unlink()
    hidden = _reference(HubertModel, folder, zero_mean_unit_var(wave))
    with torch.no_grad():
        torch.testing.assert_close(load_audio_encoder(folder, layers=(2,))(wave), hidden[2], rtol=0, atol=1e-5)


def test_bin_weights_load_weights_only_and_objects_are_refused(tmp_path):
    torch.manual_seed(3)
    model = HubertModel(HubertConfig(num_hidden_layers=2, **TINY, **CONV)).eval()
    folder = tmp_path / "bin"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    encoder = load_audio_encoder(folder, layers=(1, 2))
    wave = _wave(1, 0.5)
    with torch.no_grad():
        hidden = model(input_values=zero_mean_unit_var(wave), output_hidden_states=True).hidden_states
        torch.testing.assert_close(encoder(wave), torch.cat([hidden[1], hidden[2]], -1), rtol=0, atol=1e-5)
    marker = tmp_path / "marker.txt"
    torch.save({**model.state_dict(), "evil": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"pytorch_model.bin was refused because it contains code \(.*_touch") as info:
        load_audio_encoder(folder)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()
    torch.save(torch.zeros(3), folder / "pytorch_model.bin")  # a pickle, but not a state dict
    with pytest.raises(AudioEncoderFileError, match="bin: the weights could not be loaded"):
        load_audio_encoder(folder)


def _touch(path):
    open(path, "w").write("pwned")


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


def test_folder_errors(tmp_path, w2v_folder):
    with pytest.raises(ValueError, match=r"valid layers for this 6-layer encoder are 1\.\.6"):
        load_audio_encoder(w2v_folder, layers=(7,))
    # Not an audio model.
    from transformers import BertConfig

    other = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(other)
    with pytest.raises(AudioEncoderFileError, match="model_type 'bert'.*wav2vec2"):
        load_audio_encoder(other)
    # Config but no weights.
    empty = tmp_path / "empty"
    Wav2Vec2Config(num_hidden_layers=2, **TINY, **CONV).save_pretrained(empty)
    with pytest.raises(AudioEncoderFileError, match="no weights"):
        load_audio_encoder(empty)
    # Weights that do not fit config.json (more layers than the file has).
    torch.manual_seed(4)
    broken = _save(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=2, **TINY, **CONV)), tmp_path / "broken")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AudioEncoderFileError, match="do not fit its config.json"):
        load_audio_encoder(broken)
    # A model for another sample rate.
    rate = _save(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=2, **TINY, **CONV)), tmp_path / "rate",
                 Wav2Vec2FeatureExtractor(sampling_rate=8000))
    with pytest.raises(AudioEncoderFileError, match="sampling_rate=8000"):
        load_audio_encoder(rate)
    (rate / "preprocessor_config.json").write_text("[16000]")
    with pytest.raises(AudioEncoderFileError, match="preprocessor_config.json is not a readable JSON object"):
        load_audio_encoder(rate)


def test_short_audio_and_frozen_mode(w2v_folder):
    encoder = load_audio_encoder(w2v_folder, layers=(1,))
    encoder.train()
    assert not encoder.training and not encoder.model.training
    with pytest.raises(ValueError, match="too short"):
        encoder(torch.zeros(1, 10))
