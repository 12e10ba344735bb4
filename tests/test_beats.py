"""Our BEATs port (audiotoken_core.beats), its checkpoint files (beats_checkpoint, scripts/convert_beats.py)
and the BEATs side of audiotoken_core.encoders.

The golden numbers below were computed with the PUBLIC BEATs code (microsoft/unilm,
beats/BEATs.py + backbone.py + modules.py, with torchaudio stubbed out because the input
is an fbank) from the weights and input defined in this file; the public code is not
needed to run these tests. Our port matched it bitwise on the machine that produced them.

Deterministic weight scheme (`deterministic_beats_state`), for a BEATsConfig and a seed:
    g = torch.Generator().manual_seed(seed)
    for key in sorted(state-dict keys of BEATs(config)):   # the official key set, no predictor
        n = torch.randn(shape, generator=g)
        *layer_norm*.weight, *.grep_a         -> 1 + 0.1 n
        *.bias (LayerNorm and Linear/Conv)    -> 0.1 n
        *.relative_attention_bias.weight      -> 0.5 n, then every layer's copy := layer 0's draw
        encoder.pos_conv.0.weight_g           -> sqrt(C / k) * (1 + 0.1 n)   (C width, k kernel)
        encoder.pos_conv.0.weight_v           -> n
        any other weight                      -> n / sqrt(fan_in), fan_in = prod(shape[1:])
Input (`golden_input`): torch.randn(2, 160, 128, generator=Generator().manual_seed(7)) * 0.5,
an fbank of 160 frames -> 10 x 8 = 80 tokens (so relative distances pass max_distance=64).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audiotoken_core.audio import AudioInputError
from audiotoken_core.beats import BEATs, BEATsConfig
from audiotoken_core.beats_checkpoint import OFFICIAL_CLASS_DEFAULTS, load_beats_state, save_beats_safetensors
from audiotoken_core.encoders import (
    DEFAULT_BEATS_LAYERS,
    AudioEncoder,
    AudioEncoderFileError,
    BEATsAudioEncoder,
    EncoderSpec,
    default_layers,
    load_audio_encoder,
)
from audiotoken_core.fbank import beats_fbank
from audiotoken_core.io import UnsafeFileError

CONVERT = Path(__file__).resolve().parent.parent / "scripts" / "convert_beats.py"

# The released BEATs_iter3+ AS2M cfg (values of the official checkpoints).
AS2M_CFG = {
    "input_patch_size": 16, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12,
    "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "activation_fn": "gelu", "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False,
    "deep_norm": True, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05, "dropout_input": 0.0, "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True,
    "finetuned_model": True, "predictor_dropout": 0.0, "predictor_class": 527,
}
SMALL = dict(
    AS2M_CFG, encoder_layers=3, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
    embed_dim=32, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64, finetuned_model=False,
)
GOLDEN_CONFIGS = {
    "deep_norm_gated": SMALL,
    "pre_ln_relu": dict(SMALL, deep_norm=False, layer_norm_first=True, gru_rel_pos=False, activation_fn="relu"),
}
GOLDEN_INDICES = [(0, 0, 0), (0, 17, 5), (1, 40, 63), (1, 79, 31), (1, 3, 12)]

# Computed with the public BEATs code (see the module docstring); float64 sums of float32 outputs.
GOLDEN = {
    'deep_norm_gated': [  # per layer: (sum, abs-sum, elements at GOLDEN_INDICES)
        (-45.51270209342147, 8102.4693652404585, [-0.6558716893196106, -0.21680930256843567, -1.3884310722351074, 0.43723371624946594, -0.3424260914325714]),
        (-58.38092531192524, 8192.598438451198, [-0.5543361306190491, 0.379059761762619, -1.2619926929473877, -0.1590142548084259, -0.11883740872144699]),
        (-240.14868362231937, 8187.4952816815785, [-1.0368928909301758, 0.3794703185558319, -0.5404325723648071, 0.5548231601715088, -0.09626885503530502]),
    ],
    'pre_ln_relu': [  # per layer: (sum, abs-sum, elements at GOLDEN_INDICES)
        (3475.2854839842767, 11414.27742264606, [-0.5663425326347351, 2.4675896167755127, 0.9453573226928711, 0.9227672219276428, -1.4837990999221802]),
        (3389.305300306529, 13610.35208522901, [-1.2201640605926514, 2.7829744815826416, 1.7658034563064575, 0.5805792212486267, -1.8761990070343018]),
        (4261.592740800232, 15620.83780060336, [-0.24957215785980225, 3.130948543548584, 1.5538228750228882, 0.5782220363616943, -0.28402066230773926]),
    ],
}


def deterministic_beats_state(config: BEATsConfig, seed: int) -> dict[str, torch.Tensor]:
    """The generator-based weights described in the module docstring."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BEATs(config).state_dict(keep_vars=True).items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        n = torch.randn(shape, generator=g)
        if key.endswith("relative_attention_bias.weight"):
            state[key] = 0.5 * n
        elif ("layer_norm" in key and key.endswith(".weight")) or key.endswith(".grep_a"):
            state[key] = 1.0 + 0.1 * n
        elif key.endswith(".bias"):
            state[key] = 0.1 * n
        elif key.endswith("weight_g"):
            state[key] = math.sqrt(config.encoder_embed_dim / config.conv_pos) * (1.0 + 0.1 * n)
        elif key.endswith("weight_v"):
            state[key] = n
        else:
            state[key] = n / math.sqrt(math.prod(shape[1:]))
    first = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    for key in shapes:
        if key.endswith("relative_attention_bias.weight"):
            state[key] = state[first]
    return state


def golden_input() -> torch.Tensor:
    return torch.randn(2, 160, 128, generator=torch.Generator().manual_seed(7)) * 0.5


def tiny_config(**overrides) -> BEATsConfig:
    return BEATsConfig.from_dict(dict(SMALL, **overrides))


def official_pickle(path: Path, config: BEATsConfig, seed: int = 0, *, predictor: bool = True, **extra) -> dict:
    """torch.save a checkpoint laid out like the released ones; returns its state dict."""
    state = deterministic_beats_state(config, seed)
    cfg = config.to_dict()
    if predictor:
        cfg["finetuned_model"] = True
        state["predictor.weight"] = torch.randn(cfg["predictor_class"], config.encoder_embed_dim)
        state["predictor.bias"] = torch.zeros(cfg["predictor_class"])
    torch.save({"cfg": cfg, "model": state, "label_dict": {"0": "/m/09x0r", "1": "/m/05zppz"}, **extra}, path)
    return state


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", list(GOLDEN_CONFIGS))
def test_layer_outputs_equal_public_code_golden(name):
    config = BEATsConfig.from_dict(GOLDEN_CONFIGS[name])
    model = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=1234))
    with torch.no_grad():
        layers = model.forward_fbank(golden_input())
    assert len(layers) == config.encoder_layers == len(GOLDEN[name])
    for index, (h, (total, abs_total, elements)) in enumerate(zip(layers, GOLDEN[name]), start=1):
        assert h.shape == (2, 80, config.encoder_embed_dim)
        h = h.double()
        assert abs(h.abs().sum().item() - abs_total) <= 1e-4 * abs_total, f"layer {index} abs-sum"
        assert abs(h.sum().item() - total) <= 1e-4 * abs_total, f"layer {index} sum"
        got = [h[i].item() for i in GOLDEN_INDICES]
        for i, (a, b) in enumerate(zip(got, elements)):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"layer {index} element {GOLDEN_INDICES[i]}: {a} vs {b}"


def test_batch_items_are_independent_and_wave_path_equals_fbank_path():
    config = tiny_config()
    model = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=3))
    wave = 0.2 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = model(wave)
        first = model(wave[:1])
        via_fbank = model.forward_fbank(beats_fbank(wave))
    for a, b, c in zip(both, first, via_fbank):
        torch.testing.assert_close(a[:1], b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)


def test_state_dict_keys_are_the_official_ones():
    config = tiny_config(encoder_layers=2)
    keys = set(BEATs(config).state_dict())
    per_layer = [
        "self_attn.grep_a", "self_attn.relative_attention_bias.weight",
        "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "self_attn.grep_linear.weight", "self_attn.grep_linear.bias",
        "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias",
        "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias",
    ]
    expected = {
        "post_extract_proj.weight", "post_extract_proj.bias", "patch_embedding.weight",
        "encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
        "encoder.layer_norm.weight", "encoder.layer_norm.bias", "layer_norm.weight", "layer_norm.bias",
    } | {f"encoder.layers.{i}.{k}" for i in range(2) for k in per_layer}
    assert keys == expected
    # The relative-position table is one module shared by all layers, as in the public model.
    model = BEATs(config)
    assert model.encoder.layers[1].self_attn.relative_attention_bias is model.encoder.layers[0].self_attn.relative_attention_bias


def test_full_size_parameter_count_and_shapes():
    with torch.device("meta"):
        model = BEATs(BEATsConfig())
    # 90,717,055 in the public model with its 527-class head (405,263) -> 90,311,792.
    assert sum(p.numel() for p in model.parameters()) == 90_311_792
    sd = model.state_dict()
    assert tuple(sd["patch_embedding.weight"].shape) == (512, 1, 16, 16)
    assert tuple(sd["encoder.pos_conv.0.weight_v"].shape) == (768, 48, 128)
    assert tuple(sd["encoder.pos_conv.0.weight_g"].shape) == (1, 1, 128)
    assert tuple(sd["encoder.layers.11.self_attn.relative_attention_bias.weight"].shape) == (320, 12)
    assert tuple(sd["encoder.layers.0.self_attn.grep_linear.weight"].shape) == (8, 64)


def test_token_counts_for_the_real_patch_layout():
    # Real patch layout (16x16 patches of a 128-bin fbank), 12 layers, small width for speed.
    config = BEATsConfig.from_dict(dict(SMALL, encoder_layers=12, encoder_embed_dim=32, encoder_ffn_embed_dim=32,
                                        encoder_attention_heads=2, embed_dim=16, conv_pos_groups=2))
    model = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=5))
    for seconds, tokens in ((5.0, 248), (10.0, 496)):
        wave = 0.1 * torch.randn(1, int(seconds * 16000), generator=torch.Generator().manual_seed(1))
        assert beats_fbank(wave).shape[1] == (498 if seconds == 5.0 else 998)
        with torch.no_grad():
            layers = model(wave)
        assert len(layers) == 12
        assert all(h.shape == (1, tokens, 32) for h in layers)
        assert model.num_tokens(wave.shape[1]) == tokens


def test_tokens_are_time_major():
    config = tiny_config()
    model = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=2))
    fbank = torch.zeros(1, 64, 128)  # 4 time x 8 frequency patches
    fbank[0, 2 * 16:3 * 16, 3 * 16:4 * 16] = 1.0  # time patch 2, frequency patch 3
    with torch.no_grad():
        tokens = model.embed_patches(fbank)[0]
    assert tokens.shape[0] == 32
    changed = (tokens - tokens[0]).abs().amax(dim=-1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [2 * 8 + 3]


def test_stops_after_the_requested_layer():
    config = tiny_config(encoder_layers=6)
    model = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=4))
    calls = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        out = model.forward_fbank(golden_input()[:1], num_layers=2)
    assert len(out) == 2 and calls == [0, 1]


def test_too_short_input_is_a_clear_error():
    # One 16x16 patch needs 16 frames: 400 + 15 * 160 = 2800 samples.
    encoder = BEATsAudioEncoder(BEATs.from_state_dict(tiny_config(), deterministic_beats_state(tiny_config(), 0)))
    assert encoder(torch.zeros(1, 2800)).shape == (1, 8, 3 * 64)
    with pytest.raises(AudioInputError, match="at least 2800 samples"):
        encoder(torch.zeros(1, 2799))


# --------------------------------------------------------------------------- config


def test_config_defaults_are_the_as2m_values_and_unknown_keys_are_ignored():
    assert BEATsConfig().to_dict() == AS2M_CFG
    config = BEATsConfig.from_dict({"encoder_layers": "4", "deep_norm": 0, "something_new": [1, 2], "_name": "x"})
    assert config.encoder_layers == 4 and config.deep_norm is False
    assert config.max_distance == 800  # untouched keys keep the AS2M defaults
    assert BEATsConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        BEATsConfig.from_dict({"encoder_embed_dim": 100, "encoder_attention_heads": 12})
    with pytest.raises(ValueError, match="encoder_layers"):
        BEATsConfig.from_dict({"encoder_layers": "many"})
    with pytest.raises(ValueError, match="must be a dict"):
        BEATsConfig.from_dict([("encoder_layers", 4)])


def test_official_cfg_missing_keys_take_the_public_class_defaults(tmp_path):
    config = tiny_config(deep_norm=False, gru_rel_pos=False, relative_position_embedding=False)
    state = deterministic_beats_state(config, seed=0)
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("deep_norm", "gru_rel_pos", "relative_position_embedding")}
    torch.save({"cfg": cfg, "model": state}, tmp_path / "old.pt")
    loaded, _ = load_beats_state(tmp_path / "old.pt")
    assert loaded.deep_norm is OFFICIAL_CLASS_DEFAULTS["deep_norm"] is False
    assert loaded.relative_position_embedding is False and loaded.gru_rel_pos is False


# --------------------------------------------------------------------------- files


def test_official_format_pickle_loads_weights_only(tmp_path):
    config = tiny_config()
    path = tmp_path / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
    state = official_pickle(path, config, seed=11)
    loaded_config, loaded = load_beats_state(path)
    assert loaded_config.encoder_layers == 3 and loaded_config.finetuned_model is True
    assert not any(k.startswith("predictor.") for k in loaded)  # the AudioSet head is dropped
    assert set(loaded) == set(state) - {"predictor.weight", "predictor.bias"}
    model = BEATs(loaded_config)
    model.load_state_dict(loaded, strict=True)  # the official keys load strictly
    reference = BEATs.from_state_dict(config, deterministic_beats_state(config, seed=11))
    x = golden_input()[:1]
    with torch.no_grad():
        for a, b in zip(model.eval().forward_fbank(x), reference.forward_fbank(x)):
            assert torch.equal(a, b)


def test_safetensors_round_trip(tmp_path):
    config = tiny_config()
    official_pickle(tmp_path / "b.pt", config, seed=12)
    cfg, state = load_beats_state(tmp_path / "b.pt")
    out = save_beats_safetensors(tmp_path / "b.safetensors", cfg, state)
    cfg2, state2 = load_beats_state(out)
    assert cfg2 == cfg
    assert set(state2) == set(state) and all(torch.equal(state[k], state2[k]) for k in state)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == "beats" and "beats_config" in f.metadata()
    # A file keeping the shared relative-position table only under layer 0 is accepted too.
    trimmed = {k: v for k, v in state.items() if "relative_attention_bias" not in k or ".layers.0." in k}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trimmed.items()}, str(tmp_path / "t.safetensors"),
              metadata={"beats_config": json.dumps(cfg.to_dict())})
    _, state3 = load_beats_state(tmp_path / "t.safetensors")
    assert set(state3) == set(state)
    # A config that is not JSON is named as such.
    save_file({k: v.contiguous() for k, v in trimmed.items()}, str(tmp_path / "j.safetensors"),
              metadata={"beats_config": "{not json"})
    with pytest.raises(AudioEncoderFileError, match="j.safetensors: its BEATs config is not usable"):
        load_beats_state(tmp_path / "j.safetensors")


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *args], capture_output=True, text=True, timeout=120)


def test_convert_script(tmp_path):
    config = tiny_config()
    state = official_pickle(tmp_path / "b.pt", config, seed=12)
    out = tmp_path / "cli.safetensors"
    done = _convert(str(tmp_path / "b.pt"), str(out))
    assert done.returncode == 0, done.stderr
    assert "3 layers x 64" in done.stdout
    loaded_config, loaded = load_beats_state(out)
    assert loaded_config == load_beats_state(tmp_path / "b.pt")[0]
    assert set(loaded) == set(state) - {"predictor.weight", "predictor.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    # An existing target is kept unless --force; a bad source is one clear line, no traceback.
    before = out.read_bytes()
    refused = _convert(str(tmp_path / "b.pt"), str(out))
    assert refused.returncode == 2 and "use --force" in refused.stderr and out.read_bytes() == before
    assert _convert(str(tmp_path / "b.pt"), str(out), "--force").returncode == 0
    (tmp_path / "junk.pt").write_bytes(b"junk" * 10)
    bad = _convert(str(tmp_path / "junk.pt"), str(tmp_path / "x.safetensors"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: junk.pt is not a readable torch file")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.safetensors").exists()


def test_wrong_kind_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_beats_state(tmp_path / "nope.pt")
    # The reference Embedder's released weights: a bare state dict, not BEATs.
    torch.save({"fc1.weight": torch.zeros(4, 4), "fc1.bias": torch.zeros(4)}, tmp_path / "embedder.bin")
    with pytest.raises(AudioEncoderFileError, match=r"expected top-level keys 'cfg' and 'model'.*fc1\.bias, fc1\.weight"):
        load_beats_state(tmp_path / "embedder.bin")
    # cfg + model, but the model is something else.
    torch.save({"cfg": {}, "model": {"fc1.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(AudioEncoderFileError, match=r"not a BEATs checkpoint: found keys fc1\.weight; expected"):
        load_beats_state(tmp_path / "other.pt")
    # BEATs weights that do not fit the cfg (a 3-layer model saved with a 4-layer / wider cfg).
    state = deterministic_beats_state(tiny_config(), 0)
    torch.save({"cfg": dict(SMALL, encoder_layers=4), "model": state}, tmp_path / "layers.pt")
    with pytest.raises(AudioEncoderFileError, match=r"missing keys: encoder\.layers\.3\."):
        load_beats_state(tmp_path / "layers.pt")
    torch.save({"cfg": dict(SMALL, encoder_ffn_embed_dim=96), "model": state}, tmp_path / "shape.pt")
    with pytest.raises(AudioEncoderFileError, match=r"wrong shapes: encoder\.layers\.0\.fc1\.bias: file \(128,\) vs config \(96,\)"):
        load_beats_state(tmp_path / "shape.pt")
    # A safetensors file of another kind (an AudioToken), and random bytes.
    from safetensors.torch import save_file

    save_file({"embedders.l.fc1.weight": torch.zeros(2, 2)}, str(tmp_path / "token.safetensors"), metadata={"format": "audiotoken"})
    with pytest.raises(AudioEncoderFileError, match="format='audiotoken'"):
        load_beats_state(tmp_path / "token.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="junk.pt is not a readable torch file"):
        load_beats_state(tmp_path / "junk.pt")
    # Through the encoder loader each is a ValueError naming the file.
    for name in ("nope.pt", "embedder.bin", "other.pt", "token.safetensors", "junk.pt"):
        with pytest.raises(ValueError, match=name):
            load_audio_encoder(tmp_path / name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(AudioEncoderFileError, match="without config.json"):
        load_audio_encoder(tmp_path / "folder")


def _side_effect(path):  # what unpickling a malicious object would run
    Path(path).write_text("pwned")
    return "done"


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (str(self.path),))


class _Plain:
    def __init__(self):
        self.x = 1


def test_pickle_with_arbitrary_objects_is_rejected(tmp_path):
    config = tiny_config()
    state = deterministic_beats_state(config, 0)
    marker = tmp_path / "marker.txt"
    torch.save({"cfg": config.to_dict(), "model": state, "args": _Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"cfg": config.to_dict(), "model": state, "args": _Plain()}, tmp_path / "obj.pt")
    # Also a legacy (non-zip) pickle.
    torch.save({"cfg": config.to_dict(), "model": state, "args": _Payload(marker)}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    for name, code in (("evil.pt", "_side_effect"), ("obj.pt", "_Plain"), ("legacy.pt", "_side_effect")):
        for load in (load_beats_state, load_audio_encoder):
            with pytest.raises(UnsafeFileError, match=rf"{name} was refused because it contains code \(.*{code}") as info:
                load(tmp_path / name)
            assert "weights_only=False" not in str(info.value) and ".safetensors" in str(info.value)
    assert not marker.exists()  # nothing was executed


# --------------------------------------------------------------------------- encoders


def test_encoder_spec_and_default_layers():
    spec = EncoderSpec(kind="beats", layers=[4, 8, 12], hidden_size=768)
    assert spec.layers == (4, 8, 12) and spec.feature_dim == 2304 and spec.sample_rate == 16000
    d = spec.to_dict()
    assert d == {"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768, "sample_rate": 16000, "feature_dim": 2304}
    assert DEFAULT_BEATS_LAYERS == default_layers(12) == (4, 8, 12)
    assert default_layers(24) == (8, 16, 24) and default_layers(3) == (1, 2, 3) and default_layers(1) == (1,)


def test_check_token_compares_kind_layers_hidden_size_and_width():
    spec = EncoderSpec(kind="beats", layers=(4, 8, 12), hidden_size=768)
    spec.check_token(spec.to_dict(), "AudioToken 'dog'")  # the token's own spec
    spec.check_token({"kind": "beats", "layers": (4, 8, 12), "hidden_size": 768}, "AudioToken 'dog'")
    spec.check_token({"kind": "beats", "feature_dim": 2304}, "AudioToken 'dog'")  # a spec that gives only the width
    for other in ({"kind": "hubert"}, {"layers": [3, 6, 9]}, {"layers": [12, 8, 4]}, {"hidden_size": 1024},
                  {"feature_dim": 1536}):
        with pytest.raises(ValueError) as info:
            spec.check_token(dict(spec.to_dict(), **other), "AudioToken 'dog'")
        message = str(info.value)
        assert message.startswith("AudioToken 'dog' was trained on ") and "beats layers [4, 8, 12]" in message
        assert "Load the encoder the token was trained with" in message and "or retrain the token" in message
    # Same width, other layers: refused (the features would be read in the wrong order or from other depths).
    with pytest.raises(ValueError, match=r"set its layers to 1,2,3"):
        spec.check_token({"kind": "beats", "layers": [1, 2, 3], "hidden_size": 768, "feature_dim": 2304}, "AudioToken 'x'")


def test_load_audio_encoder_beats(tmp_path):
    from tools.placeholder_beats import write_placeholder_beats

    small = dict(encoder_layers=12, encoder_embed_dim=32, encoder_ffn_embed_dim=32, encoder_attention_heads=2,
                 embed_dim=16, conv_pos=16, conv_pos_groups=2, predictor_class=5)
    path = write_placeholder_beats(tmp_path / "beats.pt", seed=1, **small)
    raw = torch.load(path, weights_only=True)  # official layout, weights-only loadable
    assert set(raw) == {"cfg", "model"} and "predictor.weight" in raw["model"]
    encoder = load_audio_encoder(path)
    assert isinstance(encoder, AudioEncoder) and isinstance(encoder, BEATsAudioEncoder)
    assert encoder.spec == EncoderSpec(kind="beats", layers=(4, 8, 12), hidden_size=32)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a parent's .train() must not switch the frozen encoder to training mode
    assert not encoder.training and not encoder.model.training
    wave = 0.1 * torch.randn(2, 80000, generator=torch.Generator().manual_seed(0))
    features = encoder(wave)
    assert features.shape == (2, 248, 96)
    # Same as concatenating the model's layer outputs; layers above 12 never exist, above max(layers) never run.
    with torch.no_grad():
        hidden = encoder.model(wave)
    torch.testing.assert_close(features, torch.cat([hidden[3], hidden[7], hidden[11]], dim=-1), rtol=0, atol=0)
    # Runs under the caller's grad mode: gradients reach the input through the frozen encoder.
    fb = beats_fbank(wave[:1]).requires_grad_(True)
    out = encoder.model.forward_fbank(fb, num_layers=2)[-1]
    out.sum().backward()
    assert fb.grad is not None and fb.grad.abs().sum() > 0
    with torch.no_grad():
        assert not encoder(wave[:1]).requires_grad

    early = load_audio_encoder(path, layers=[2, 1])
    assert early.spec.layers == (2, 1) and early.spec.feature_dim == 64
    calls = []
    for i, layer in enumerate(early.model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        f = early(wave[:1])
    assert calls == [0, 1]
    torch.testing.assert_close(f, torch.cat([hidden[1][:1], hidden[0][:1]], dim=-1), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=r"valid layers for this 12-layer encoder are 1\.\.12"):
        load_audio_encoder(path, layers=(4, 13))
    with pytest.raises(ValueError, match="1..12"):
        load_audio_encoder(path, layers=(0,))
    # The safetensors conversion loads through the same entry point.
    cfg, state = load_beats_state(path)
    st = save_beats_safetensors(tmp_path / "beats.safetensors", cfg, state)
    with torch.no_grad():
        torch.testing.assert_close(load_audio_encoder(st)(wave), features, rtol=0, atol=0)
    with pytest.raises(AudioEncoderFileError, match="unsupported audio-encoder file type"):
        (tmp_path / "beats.onnx").write_bytes(b"x")
        load_audio_encoder(tmp_path / "beats.onnx")
    with pytest.raises(ValueError, match="too short"):
        encoder(torch.zeros(1, 1000))


def test_placeholder_default_is_the_real_size():
    from tools.placeholder_beats import placeholder_beats_state

    config = BEATsConfig()
    with torch.device("meta"):
        n = sum(p.numel() for p in BEATs(config).parameters())
    assert n == 90_311_792
    # (Writing the 346 MiB default file is left to benchmarks; the generator scheme is shared.)
    small = BEATsConfig.from_dict(dict(SMALL, finetuned_model=True, predictor_class=3))
    state = placeholder_beats_state(small, seed=0)
    assert state["encoder.layers.0.final_layer_norm.weight"].eq(1).all()
    assert state["encoder.layers.0.self_attn.grep_a"].eq(1).all()
    assert state["encoder.layers.2.self_attn.relative_attention_bias.weight"] is state[
        "encoder.layers.0.self_attn.relative_attention_bias.weight"]
    assert state["predictor.weight"].shape == (3, 64)
    weight = torch._weight_norm(state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"], 2)
    torch.testing.assert_close(weight, state["encoder.pos_conv.0.weight_v"])
