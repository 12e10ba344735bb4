"""Our Wav2CLIP port against the official code (PyPI wav2clip 0.1.0) with random weights."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from audiotoken_core.evaluation import SAMPLE_RATE, Wav2CLIP, Wav2CLIPCheckpointError, Wav2CLIPConfig, load_wav2clip
from audiotoken_core.io import UnsafeFileError

REPO = Path(__file__).resolve().parent.parent


class _NotATensor:
    """A Python object weights-only loading must refuse."""


def _official():
    """wav2clip's ResNetExtractor (installed --no-deps as a test dependency). Its package imports
    librosa (used only for framed embeddings) and torchaudio (its spectrogram front end)."""
    if importlib.util.find_spec("wav2clip") is None:
        pytest.skip("wav2clip==0.1.0 not installed (scripts/setup_env.sh)")
    pytest.importorskip("torchaudio")
    if "librosa" not in sys.modules and importlib.util.find_spec("librosa") is None:
        sys.modules["librosa"] = types.ModuleType("librosa")
    from wav2clip.model.encoder import MLPLayers, ResNetExtractor
    return ResNetExtractor, MLPLayers


def _official_checkpoint(seed: int = 0) -> tuple[dict, torch.nn.Module]:
    """A state dict shaped like the released Wav2CLIP.pt (audio_encoder.* + audio_transform.* +
    the training-time image_transform.*), random weights and BatchNorm statistics."""
    ResNetExtractor, MLPLayers = _official()
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.audio_encoder = ResNetExtractor(scenario="supervise").encoder
    holder.audio_transform = MLPLayers(units=[512, 512, 512], dropout=0.1)
    holder.image_transform = MLPLayers(units=[512, 512, 512], dropout=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for name, buf in holder.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    for name, p in holder.named_parameters():
        if name.endswith("bn1.bias") or name.endswith("bn2.bias"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = holder.state_dict()
    # what wav2clip.get_model(pretrained=True) builds from that checkpoint
    official = ResNetExtractor(checkpoint=state, scenario="frozen", transform=True).eval()
    return state, official


def _audio(b: int, seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = torch.sin(2 * torch.pi * (220 + 200 * torch.rand(b, 1, generator=g)) * t)
    return 0.5 * tone + 0.1 * torch.randn(b, t.numel(), generator=g)


def test_official_checkpoint_loads_and_matches_the_reference(tmp_path):
    state, official = _official_checkpoint()
    assert any(k == "audio_encoder.spectrogram.window" for k in state)
    assert "audio_transform.sequential.3.weight" in state
    path = tmp_path / "Wav2CLIP.pt"
    torch.save(state, path)
    ours = load_wav2clip(path)
    assert not ours.training and ours.config.embed_dim == 512
    waves = _audio(3, 2.0, seed=1)
    with torch.no_grad():
        expected = torch.cat([official(w.unsqueeze(0)) for w in waves])  # one clip at a time
        got = ours(waves)                                                 # per-example statistics
    assert got.shape == (3, 512)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
    batch_model = load_wav2clip(path, normalization="batch")
    with torch.no_grad():
        assert torch.allclose(batch_model(waves), official(waves), atol=1e-5, rtol=1e-4)


def test_other_checkpoint_layouts(tmp_path):
    state, official = _official_checkpoint(seed=3)
    wave = _audio(1, 1.0, seed=2)
    with torch.no_grad():
        expected = official(wave)
    layouts = {
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
        "extractor.pt": {k: v for k, v in official.state_dict().items()},  # encoder.* / transform.*
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        with torch.no_grad():
            assert torch.allclose(load_wav2clip(tmp_path / name)(wave), expected, atol=1e-5, rtol=1e-4), name
    converted = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_wav2clip.py"), str(tmp_path / "lightning.ckpt"),
                                str(tmp_path / "w.safetensors")], capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    with torch.no_grad():
        assert torch.allclose(load_wav2clip(tmp_path / "w.safetensors")(wave), expected, atol=1e-5, rtol=1e-4)


def test_state_dict_names_equal_the_official_file():
    state, _ = _official_checkpoint()
    ours = set(Wav2CLIP().state_dict())
    official = {k for k in state if not k.startswith("image_transform.")}
    assert ours == official


def test_bad_checkpoints_are_clear_errors(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(Wav2CLIPCheckpointError, match="not a Wav2CLIP checkpoint.*fc.weight"):
        load_wav2clip(tmp_path / "other.pt")
    sd = Wav2CLIP().state_dict()
    sd["audio_encoder.conv1.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(Wav2CLIPCheckpointError, match="wrong shapes.*conv1"):
        load_wav2clip(tmp_path / "shape.pt")
    torch.save({"x": _NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(UnsafeFileError, match="pickle.pt was refused because it contains code") as refused:
        load_wav2clip(tmp_path / "pickle.pt")
    assert "weights_only" not in str(refused.value)
    with pytest.raises(FileNotFoundError, match="lyrebird-wav2clip"):
        load_wav2clip(tmp_path / "missing.pt")


def test_batch_independence():
    torch.manual_seed(0)
    model = Wav2CLIP(Wav2CLIPConfig()).eval()
    waves = _audio(2, 1.0, seed=5)
    with torch.no_grad():
        both = model(waves)
        assert torch.allclose(both[0], model(waves[0]), atol=1e-5)  # 1-D input = one clip
        assert torch.allclose(both[1], model(waves[1:]), atol=1e-5)


def test_runtime_code_does_not_import_torchaudio():
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "audiotoken_core" / "evaluation"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(str(n).startswith(("torchaudio", "scipy", "librosa")) for n in names), path
