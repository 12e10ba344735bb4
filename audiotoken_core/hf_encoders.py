"""transformers audio encoders (AST, wav2vec2, HuBERT) behind the AudioEncoder interface.

A model is read from a LOCAL folder (config.json + *.safetensors, `local_files_only=True`;
nothing is ever downloaded). Folders that only have `pytorch_model*.bin` pickles are read
weights-only by us (`io.load_torch_weights_only`), so a pickle that carries code is refused.

Preprocessing is torch code equal to the transformers feature extractors:
- AST (`ASTFeatureExtractor`): Kaldi fbank of the [-1, 1] waveform as given (the
  extractor does NOT rescale to the int16 range), hanning window, `num_mel_bins` of the
  model, dither 0; zero-padded / cut to the model's `max_length` frames; then
  (x - mean) / (2 * std) with the AudioSet mean -4.2677393 / std 4.5689974 unless the
  folder's preprocessor_config.json says otherwise.
- wav2vec2 / HuBERT (`Wav2Vec2FeatureExtractor`): per-clip zero-mean unit-variance
  normalisation (x - mean) / sqrt(var + 1e-7) when preprocessor_config.json says
  `do_normalize` (default True), the raw wave otherwise.

Layer i (1-indexed) is the output of the i-th transformer block, i.e. `hidden_states[i]`
of the model (before any final LayerNorm). Blocks above max(layers) are removed from the
loaded model, so they are never computed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import TARGET_SAMPLE_RATE
from .encoders import AudioEncoder, AudioEncoderFileError, EncoderSpec, resolve_layers
from .fbank import kaldi_fbank
from .io import load_torch_weights_only

__all__ = [
    "HFAudioEncoder",
    "HF_MODEL_TYPES",
    "AST_DEFAULT_MEAN",
    "AST_DEFAULT_STD",
    "ast_features",
    "zero_mean_unit_var",
]

# config.json model_type -> our encoder kind
HF_MODEL_TYPES = {"audio-spectrogram-transformer": "ast", "wav2vec2": "wav2vec2", "hubert": "hubert"}
AST_DEFAULT_MEAN = -4.2677393
AST_DEFAULT_STD = 4.5689974
_W2V_NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm

# Keys a base model may lack in a checkpoint without changing inference (training-only).
_OPTIONAL_KEYS = ("masked_spec_embed",)


def ast_features(
    wave16: Tensor,
    *,
    num_mel_bins: int,
    max_length: int,
    mean: float = AST_DEFAULT_MEAN,
    std: float = AST_DEFAULT_STD,
    do_normalize: bool = True,
) -> Tensor:
    """ASTFeatureExtractor in torch: [B, T] 16 kHz in [-1, 1] -> [B, max_length, num_mel_bins] float32."""
    fbank = kaldi_fbank(wave16, sample_rate=TARGET_SAMPLE_RATE, num_mel_bins=num_mel_bins, window_type="hanning")
    frames = fbank.shape[1]
    if frames < max_length:
        fbank = F.pad(fbank, (0, 0, 0, max_length - frames))  # zeros, padded before normalising
    else:
        fbank = fbank[:, :max_length]
    if do_normalize:
        fbank = (fbank - mean) / (std * 2)
    return fbank


def zero_mean_unit_var(wave16: Tensor) -> Tensor:
    """Wav2Vec2FeatureExtractor normalisation per clip: (x - mean) / sqrt(var + 1e-7)."""
    x = wave16.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + _W2V_NORM_EPS)


def _model_classes(kind: str):
    from transformers import ASTConfig, ASTModel, HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    return {
        "ast": (ASTConfig, ASTModel),
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "hubert": (HubertConfig, HubertModel),
    }[kind]


# Where the transformer blocks live differs between models and transformers versions
# (e.g. AST: `encoder.layer` in 4.x, `layers` in 5.x).
_BLOCK_PATHS = ("encoder.layers", "encoder.layer", "layers", "layer")


def _block_owner(model: nn.Module) -> tuple[nn.Module, str]:
    for path in _BLOCK_PATHS:
        *parents, attr = path.split(".")
        owner = model
        for name in parents:
            owner = getattr(owner, name, None)
            if owner is None:
                break
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise AudioEncoderFileError(
        f"cannot find the transformer blocks of {type(model).__name__} (looked at {', '.join(_BLOCK_PATHS)}); "
        "this transformers version lays the model out differently: install one the pack supports (requirements.txt)"
    )


def _blocks(model: nn.Module) -> nn.ModuleList:
    owner, attr = _block_owner(model)
    return getattr(owner, attr)


def _set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    owner, attr = _block_owner(model)
    setattr(owner, attr, blocks)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        raise AudioEncoderFileError(f"{path} is not a readable JSON object ({data!r:.200}); re-download it")
    return data


def _conv_min_samples(config) -> int:
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need


class HFAudioEncoder(AudioEncoder):
    """AST / wav2vec2 / HuBERT from transformers, frozen, features of selected layers."""

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        layers: Sequence[int] | None = None,
        *,
        do_normalize: bool = True,
        mean: float = AST_DEFAULT_MEAN,
        std: float = AST_DEFAULT_STD,
    ) -> None:
        blocks = _blocks(model)
        layers = resolve_layers(layers, len(blocks))
        super().__init__(EncoderSpec(kind=kind, layers=layers, hidden_size=int(model.config.hidden_size)))
        keep = max(layers)
        if keep < len(blocks):  # never compute (or even keep) the layers above max(layers)
            _set_blocks(model, nn.ModuleList(list(blocks)[:keep]))
            model.config.num_hidden_layers = keep
        self.model = model
        self.kind = kind
        self.do_normalize = bool(do_normalize)
        self.mean = float(mean)
        self.std = float(std)
        if kind == "ast":
            self.num_mel_bins = int(model.config.num_mel_bins)
            self.max_length = int(model.config.max_length)
            self.min_samples = 400  # one 25 ms frame
        else:
            self.min_samples = _conv_min_samples(model.config)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, layers: Sequence[int] | None = None) -> "HFAudioEncoder":
        """The model of a folder holding config.json (checked by `load_audio_encoder`)."""
        folder = Path(folder)
        raw = _read_json(folder / "config.json")
        model_type = raw.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise AudioEncoderFileError(
                f"{folder.name}: config.json has model_type {model_type!r}; supported audio encoders are "
                + ", ".join(f"{k!r} ({v})" for k, v in HF_MODEL_TYPES.items())
            )
        kind = HF_MODEL_TYPES[model_type]
        config_cls, model_cls = _model_classes(kind)
        try:
            config = config_cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise AudioEncoderFileError(f"{folder.name}: config.json could not be read by transformers ({exc})") from exc
        num_layers = int(config.num_hidden_layers)
        resolve_layers(layers, num_layers)  # fail on bad layers before loading weights

        safetensors = sorted(folder.glob("*.safetensors"))
        bins = sorted(p for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
        if not safetensors and not bins:
            raise AudioEncoderFileError(
                f"{folder.name} has no weights: expected model.safetensors (or model-0000x-of-0000y.safetensors) "
                "next to config.json"
            )
        parts = [] if safetensors else [load_torch_weights_only(file, "a transformers state dict") for file in bins]
        try:
            kwargs: dict[str, Any] = {"config": config, "local_files_only": True, "output_loading_info": True}
            if safetensors:
                kwargs["use_safetensors"] = True
            else:  # our own weights-only state dict: transformers must not look at the folder's files
                kwargs["state_dict"] = {k: v for part in parts for k, v in part.items()}
            model, info = model_cls.from_pretrained(None if parts else str(folder), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise AudioEncoderFileError(f"{folder.name}: the weights could not be loaded ({type(exc).__name__}: {exc})") from exc
        missing = [k for k in info.get("missing_keys", []) if not any(k.endswith(o) for o in _OPTIONAL_KEYS)]
        mismatched = list(info.get("mismatched_keys", []))
        if missing or mismatched:
            shown = ", ".join(map(str, (missing + mismatched)[:6]))
            raise AudioEncoderFileError(
                f"{folder.name}: the weights do not fit its config.json ({len(missing)} missing, "
                f"{len(mismatched)} of the wrong shape: {shown}); the folder is incomplete or mixed up"
            )
        model = model.to(torch.float32).eval()

        pre: dict[str, Any] = {}
        if (folder / "preprocessor_config.json").is_file():
            pre = _read_json(folder / "preprocessor_config.json")
        rate = pre.get("sampling_rate", TARGET_SAMPLE_RATE)
        if rate != TARGET_SAMPLE_RATE:
            raise AudioEncoderFileError(
                f"{folder.name}: preprocessor_config.json says sampling_rate={rate}; only 16 kHz encoders are supported"
            )
        return cls(
            model,
            kind,
            layers,
            do_normalize=pre.get("do_normalize", True),
            mean=pre.get("mean", AST_DEFAULT_MEAN),
            std=pre.get("std", AST_DEFAULT_STD),
        )

    # -- forward ------------------------------------------------------------------------
    def preprocess(self, wave16: Tensor) -> Tensor:
        """[B, T] 16 kHz audio in [-1, 1] -> the model's `input_values` (float32)."""
        if self.kind == "ast":
            return ast_features(
                wave16, num_mel_bins=self.num_mel_bins, max_length=self.max_length,
                mean=self.mean, std=self.std, do_normalize=self.do_normalize,
            )
        return zero_mean_unit_var(wave16) if self.do_normalize else wave16.float()

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        inputs = self.preprocess(wave16).to(device=self.device, dtype=self.dtype)
        blocks = _blocks(self.model)
        captured: dict[int, Tensor] = {}

        def hook_for(index: int):
            def hook(module, args, output):
                captured[index] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [blocks[i - 1].register_forward_hook(hook_for(i)) for i in self.spec.layers]
        try:
            self.model(input_values=inputs)
        finally:
            for handle in handles:
                handle.remove()
        return captured
