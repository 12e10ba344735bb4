"""transformers audio encoders (AST, wav2vec2, HuBERT, CLAP's audio tower) behind the AudioEncoder interface.

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

CLAP (`model_type` "clap": the audio tower of a ClapModel folder, its text tower and
projections are not loaded; or "clap_audio_model"): an HTSAT, i.e. a Swin transformer whose
stages halve the token grid and double the width. Features must share one width and one
token grid, so layer i is the output of the i-th Swin block of the LAST stage (HTSAT-base:
depths 2,2,6,2, so layers 1..2, 768 wide, 8 x 8 = 64 tokens, row-major over the model's
spectrogram image); earlier stages always run, blocks of the last stage above max(layers) do
not. The pack hears 16 kHz windows: they are resampled to the model's rate (48 kHz) with
`audio.resample`, then `clap_features` reproduces `ClapFeatureExtractor` for audio up to its
`max_length_s` (10 s): the `padding` mode ("repeatpad" by default), power STFT (Hann, centred,
reflect padding), mel filters (HTK unnormalised for truncation "fusion", Slaney otherwise),
10 log10. Longer windows are refused, since the extractor would crop them at random. A fused
model is told `is_longer` False, so it reads the global spectrogram only (the extractor marks
one random clip of a batch "longer" when none is; we do not copy that randomness).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import TARGET_SAMPLE_RATE, AudioInputError, resample
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
    "CLAP_MODEL_TYPES",
    "ClapPreprocessing",
    "ClapAudioEncoder",
    "clap_features",
    "mel_filter_bank",
]

# config.json model_type -> our encoder kind
HF_MODEL_TYPES = {"audio-spectrogram-transformer": "ast", "wav2vec2": "wav2vec2", "hubert": "hubert"}
CLAP_MODEL_TYPES = ("clap", "clap_audio_model")  # kind "clap"
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


def _weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files: its *.safetensors, else its pytorch_model*.bin (read weights-only)."""
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(p for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    if not safetensors and not bins:
        raise AudioEncoderFileError(
            f"{folder.name} has no weights: expected model.safetensors (or model-0000x-of-0000y.safetensors) "
            "next to config.json"
        )
    return safetensors or bins


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
    def from_folder(cls, folder: str | Path, layers: Sequence[int] | None = None) -> AudioEncoder:
        """The model of a folder holding config.json (checked by `load_audio_encoder`); CLAP folders
        give a `ClapAudioEncoder`."""
        folder = Path(folder)
        raw = _read_json(folder / "config.json")
        model_type = raw.get("model_type")
        if model_type in CLAP_MODEL_TYPES:
            return ClapAudioEncoder.from_folder(folder, layers)
        if model_type not in HF_MODEL_TYPES:
            raise AudioEncoderFileError(
                f"{folder.name}: config.json has model_type {model_type!r}; supported audio encoders are "
                + ", ".join(f"{k!r} ({v})" for k, v in HF_MODEL_TYPES.items())
                + ", " + ", ".join(f"{k!r} (clap)" for k in CLAP_MODEL_TYPES)
            )
        kind = HF_MODEL_TYPES[model_type]
        config_cls, model_cls = _model_classes(kind)
        try:
            config = config_cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise AudioEncoderFileError(f"{folder.name}: config.json could not be read by transformers ({exc})") from exc
        num_layers = int(config.num_hidden_layers)
        resolve_layers(layers, num_layers)  # fail on bad layers before loading weights

        files = _weight_files(folder)
        safetensors = files[0].suffix == ".safetensors"
        parts = [] if safetensors else [load_torch_weights_only(file, "a transformers state dict") for file in files]
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
        return block_outputs(_blocks(self.model), self.spec.layers, lambda: self.model(input_values=inputs))


def block_outputs(blocks: nn.ModuleList, layers: Sequence[int], forward) -> dict[int, Tensor]:
    """{layer: output of blocks[layer - 1]} (a block's tuple output: its first element) while `forward()` runs."""
    captured: dict[int, Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [blocks[i - 1].register_forward_hook(hook_for(i)) for i in layers]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------------------------- CLAP


def _hz_to_mel(freq: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above
    log_region = freq >= 1000.0
    return torch.where(log_region, 15.0 + torch.log(freq.clamp_min(1000.0) / 1000.0) * (27.0 / math.log(6.4)),
                       3.0 * freq / 200.0)


def _mel_to_hz(mel: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_region = mel >= 15.0
    return torch.where(log_region, 1000.0 * torch.exp((mel - 15.0) * (math.log(6.4) / 27.0)), 200.0 * mel / 3.0)


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float,
                    sampling_rate: int, slaney: bool) -> Tensor:
    """Triangular mel filters [num_frequency_bins, num_mel_filters] (float64), as transformers'
    `audio_utils.mel_filter_bank` with mel_scale "htk" and no norm, or "slaney" scale and norm."""
    scale = "slaney" if slaney else "htk"
    edges = torch.tensor([float(min_frequency), float(max_frequency)], dtype=torch.float64)
    mel_lo, mel_hi = _hz_to_mel(edges, scale)
    filter_freqs = _mel_to_hz(torch.linspace(float(mel_lo), float(mel_hi), num_mel_filters + 2, dtype=torch.float64), scale)
    fft_freqs = torch.linspace(0, sampling_rate // 2, num_frequency_bins, dtype=torch.float64)
    diff = filter_freqs[1:] - filter_freqs[:-1]
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    if slaney:
        filters = filters * (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    return filters


@dataclass(frozen=True)
class ClapPreprocessing:
    """The ClapFeatureExtractor settings we reproduce (its defaults; a folder's preprocessor_config.json overrides)."""

    feature_size: int = 64
    sampling_rate: int = 48_000
    hop_length: int = 480
    max_length_s: int = 10
    fft_window_size: int = 1024
    frequency_min: float = 0.0
    frequency_max: float = 14_000.0
    truncation: str = "fusion"
    padding: str = "repeatpad"

    @classmethod
    def from_dict(cls, pre: Mapping[str, Any]) -> "ClapPreprocessing":
        known = {f.name for f in fields(cls)}
        made = cls(**{k: v for k, v in pre.items() if k in known})
        if made.truncation not in ("fusion", "rand_trunc") or made.padding not in ("repeatpad", "repeat", "pad"):
            raise AudioEncoderFileError(
                f"preprocessor_config.json has truncation {made.truncation!r} / padding {made.padding!r}; CLAP's "
                "feature extractor knows truncation 'fusion' or 'rand_trunc' and padding 'repeatpad', 'repeat' or 'pad'"
            )
        return made

    @property
    def max_samples(self) -> int:
        return int(self.max_length_s * self.sampling_rate)


def clap_features(wave: Tensor, pre: ClapPreprocessing) -> Tensor:
    """ClapFeatureExtractor in torch for audio of at most `pre.max_length_s`: [B, T] at `pre.sampling_rate`
    -> `input_features` [B, C, frames, feature_size] float32 (C = 4 identical copies for truncation
    "fusion", 1 for "rand_trunc")."""
    x = wave.float()
    length, target = x.shape[-1], pre.max_samples
    if length > target:
        raise AudioInputError(
            f"the CLAP encoder hears at most {pre.max_length_s} s per window, got {length / pre.sampling_rate:.2f} s; "
            f"set window_seconds to {pre.max_length_s} or less"
        )
    if length < target and pre.padding != "pad":
        repeats = target // length
        x = x.repeat(1, repeats + 1 if pre.padding == "repeat" else repeats)[:, :target]
    x = F.pad(x, (0, target - x.shape[-1]))
    window = torch.hann_window(pre.fft_window_size, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, n_fft=pre.fft_window_size, hop_length=pre.hop_length, window=window, center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)  # [B, freq, frames]
    fusion = pre.truncation == "fusion"
    filters = mel_filter_bank(pre.fft_window_size // 2 + 1, pre.feature_size, pre.frequency_min, pre.frequency_max,
                              pre.sampling_rate, slaney=not fusion).to(device=x.device, dtype=x.dtype)
    mel = torch.einsum("bft,fm->btm", spec, filters).clamp_min(1e-10)
    log_mel = 10.0 * torch.log10(mel)[:, None]
    return log_mel.expand(-1, 4, -1, -1).contiguous() if fusion else log_mel


def _state_dict_files(folder: Path) -> dict[str, Tensor]:
    """All tensors of a folder's *.safetensors (or weights-only pytorch_model*.bin) files."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in _weight_files(folder):
        state.update(load_file(str(file)) if file.suffix == ".safetensors"
                     else load_torch_weights_only(file, "a transformers state dict"))
    return state


class ClapAudioEncoder(AudioEncoder):
    """CLAP's HTSAT audio tower (transformers `ClapAudioModel`), frozen; layers = blocks of its last stage."""

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None,
                 preprocessing: ClapPreprocessing = ClapPreprocessing()) -> None:
        stage = model.audio_encoder.layers[-1]
        layers = resolve_layers(layers, len(stage.blocks))
        super().__init__(EncoderSpec(kind="clap", layers=layers, hidden_size=int(stage.dim)))
        if max(layers) < len(stage.blocks):  # never compute the blocks above max(layers)
            stage.blocks = nn.ModuleList(list(stage.blocks)[:max(layers)])
        self.model = model
        self.preprocessing = preprocessing
        self.fused = bool(model.config.enable_fusion)

    @classmethod
    def from_folder(cls, folder: str | Path, layers: Sequence[int] | None = None) -> "ClapAudioEncoder":
        """The audio tower of a local CLAP folder (config.json model_type "clap" or "clap_audio_model")."""
        from transformers import ClapAudioConfig, ClapAudioModel, ClapConfig

        folder = Path(folder)
        model_type = _read_json(folder / "config.json").get("model_type")
        try:
            if model_type == "clap":
                config = ClapConfig.from_pretrained(str(folder), local_files_only=True).audio_config
            else:
                config = ClapAudioConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise AudioEncoderFileError(f"{folder.name}: config.json could not be read by transformers ({exc})") from exc
        resolve_layers(layers, int(config.depths[-1]))  # fail on bad layers before loading weights
        pre = ClapPreprocessing.from_dict(
            _read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {})
        # A ClapModel (or ClapAudioModelWithProjection) file names the tower "audio_model."; a ClapAudioModel file does not.
        state = {k.removeprefix("audio_model."): v for k, v in _state_dict_files(folder).items()}
        state = {k: v for k, v in state.items() if k.startswith("audio_encoder.")}
        model = ClapAudioModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected or not state:
            shown = ", ".join((list(missing) + list(unexpected))[:6])
            raise AudioEncoderFileError(
                f"{folder.name}: the weights do not fit its config.json's CLAP audio tower ({len(missing)} missing, "
                f"{len(unexpected)} unexpected: {shown}); the folder is incomplete or mixed up"
            )
        return cls(model.to(torch.float32).eval(), layers, pre)

    def preprocess(self, wave16: Tensor) -> Tensor:
        """[B, T] 16 kHz audio in [-1, 1] -> `input_features` (resampled to the model's rate first)."""
        return clap_features(resample(wave16.float(), TARGET_SAMPLE_RATE, self.preprocessing.sampling_rate),
                             self.preprocessing)

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        features = self.preprocess(wave16).to(device=self.device, dtype=self.dtype)
        kwargs = {"is_longer": torch.zeros(features.shape[0], 1, dtype=torch.bool, device=features.device)} if self.fused else {}
        return block_outputs(self.model.audio_encoder.layers[-1].blocks, self.spec.layers,
                             lambda: self.model(input_features=features, **kwargs))
