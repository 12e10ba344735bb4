"""The one audio-encoder interface the rest of AudioToken uses.

    encoder = load_audio_encoder(path, layers=None)   # frozen, eval()
    features = encoder(wave16)                        # [B, T] 16 kHz in [-1, 1] -> [B, N, spec.feature_dim]
    encoder.spec                                      # EncoderSpec(kind, layers, hidden_size, sample_rate)

`path` is either a BEATs checkpoint file (.pt / .pth / .ckpt official pickle, read
weights-only, or .safetensors written by `beats.save_beats_safetensors`) or a local
transformers folder (config.json + *.safetensors) holding an AST, wav2vec2 or HuBERT model.

Layers are 1-indexed transformer layers; their outputs are concatenated on the feature
axis in the order given. The default is the reference's BEATs (4, 8, 12), i.e. the same
thirds of the depth for any model (n/3, 2n/3, n). Layers above max(layers) are never
computed. The forward runs under the caller's grad mode (the parameters themselves are
frozen with requires_grad False), and the encoder stays in eval mode even when a parent
module is put in training mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .audio import AudioInputError, TARGET_SAMPLE_RATE
from .beats import BEATs, BEATsCheckpointError, load_beats_state

__all__ = [
    "EncoderSpec",
    "AudioEncoder",
    "AudioEncoderFileError",
    "BEATsAudioEncoder",
    "load_audio_encoder",
    "default_layers",
    "resolve_layers",
    "DEFAULT_BEATS_LAYERS",
    "ENCODER_KINDS",
    "BEATS_FILE_SUFFIXES",
]

DEFAULT_BEATS_LAYERS = (4, 8, 12)
ENCODER_KINDS = ("beats", "ast", "wav2vec2", "hubert")
BEATS_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


class AudioEncoderFileError(ValueError):
    """A path that does not hold a usable audio encoder; the message says why."""


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder produces: `feature_dim = hidden_size * len(layers)` features per token."""

    kind: str  # "beats" | "ast" | "wav2vec2" | "hubert"
    layers: tuple[int, ...]  # 1-indexed transformer layers, concatenated on the feature axis
    hidden_size: int
    sample_rate: int = TARGET_SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {self.kind!r}; expected one of {', '.join(ENCODER_KINDS)}")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if (
            not isinstance(layers, tuple)
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in layers)
        ):
            raise ValueError(f"layers must be a non-empty sequence of 1-indexed layer numbers, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        for name in ("hidden_size", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "sample_rate": self.sample_rate,
            "feature_dim": self.feature_dim,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderSpec":
        """Inverse of `to_dict`; `feature_dim`, when present, must agree."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an encoder spec must be a dict, got {type(d).__name__}")
        missing = [k for k in ("kind", "layers", "hidden_size") if k not in d]
        if missing:
            raise ValueError(f"encoder spec {dict(d)!r} lacks {', '.join(missing)}")
        layers = d["layers"]
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"encoder spec 'layers' must be a list, got {layers!r}")
        spec = cls(
            kind=d["kind"],
            layers=tuple(layers),
            hidden_size=d["hidden_size"],
            sample_rate=d.get("sample_rate", TARGET_SAMPLE_RATE),
        )
        if "feature_dim" in d and d["feature_dim"] != spec.feature_dim:
            raise ValueError(
                f"encoder spec feature_dim={d['feature_dim']!r} disagrees with hidden_size x len(layers) = "
                f"{spec.hidden_size} x {len(spec.layers)} = {spec.feature_dim}"
            )
        return spec


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference choice (4, 8, 12 of 12) as thirds of any depth: (n/3, 2n/3, n), rounded, distinct."""
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {num_layers}")
    picks = [max(1, (k * num_layers + 1) // 3) for k in (1, 2)] + [num_layers]
    return tuple(dict.fromkeys(picks))


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Validate 1-indexed `layers` for a model with `num_layers` layers (None -> default_layers)."""
    if layers is None:
        return default_layers(num_layers)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of layer numbers 1..{num_layers}, got {layers!r}")
    result = tuple(layers)
    if not result:
        raise ValueError(f"layers is empty; pick layer numbers in 1..{num_layers}")
    bad = [i for i in result if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= num_layers]
    if bad:
        raise ValueError(
            f"layers {list(result)} include {bad}: valid layers for this {num_layers}-layer encoder are 1..{num_layers}"
        )
    if len(set(result)) != len(result):
        raise ValueError(f"layers {list(result)} repeat a layer; list each layer once")
    return result


class AudioEncoder(nn.Module):
    """Base class: `forward(wave16 [B, T]) -> [B, N, spec.feature_dim]`.

    Subclasses implement `layer_outputs(wave) -> {layer: [B, N, hidden]}` for the layers of
    `spec` (computing nothing above max(layers)); the base validates the audio, moves it
    to the encoder's device and concatenates.
    """

    spec: EncoderSpec
    #: the shortest input (samples) the encoder accepts
    min_samples: int = 400

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec

    # Frozen encoders never switch to training mode (no dropout/layer drop), even when a
    # parent module's .train() is called.
    def train(self, mode: bool = True) -> "AudioEncoder":
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def _check_wave(self, wave16: Tensor) -> Tensor:
        if not isinstance(wave16, Tensor):
            raise AudioInputError(f"the encoder expects a torch.Tensor [batch, samples], got {type(wave16).__name__}")
        if wave16.ndim == 1:
            wave16 = wave16[None]
        if wave16.ndim != 2:
            raise AudioInputError(
                f"the encoder expects 16 kHz mono audio shaped [batch, samples], got {tuple(wave16.shape)}; "
                "use audio.prepare_waveform first"
            )
        if not wave16.is_floating_point():
            raise AudioInputError(f"the encoder expects float audio in [-1, 1], got {wave16.dtype}")
        if wave16.shape[0] == 0 or wave16.shape[1] < self.min_samples:
            raise AudioInputError(
                f"audio of shape {tuple(wave16.shape)} is too short for the {self.spec.kind} encoder: it needs at "
                f"least {self.min_samples} samples ({self.min_samples / self.spec.sample_rate:.3f} s at "
                f"{self.spec.sample_rate} Hz)"
            )
        return wave16.to(self.device)

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, wave16: Tensor) -> Tensor:
        outputs = self.layer_outputs(self._check_wave(wave16))
        return torch.cat([outputs[i] for i in self.spec.layers], dim=-1)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class BEATsAudioEncoder(AudioEncoder):
    """Our BEATs port behind the AudioEncoder interface."""

    def __init__(self, model: BEATs, layers: Sequence[int] | None = None) -> None:
        layers = resolve_layers(layers, model.num_layers)
        super().__init__(EncoderSpec(kind="beats", layers=layers, hidden_size=model.hidden_size))
        self.model = model
        patch = model.config.input_patch_size
        self.min_samples = 400 + (patch - 1) * 160  # one patch of frames

    def num_tokens(self, num_samples: int) -> int:
        return self.model.num_tokens(num_samples)

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        hidden = self.model(wave16, num_layers=max(self.spec.layers))
        return {i: hidden[i - 1] for i in self.spec.layers}


def _freeze(encoder: AudioEncoder) -> AudioEncoder:
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def load_audio_encoder(path: str | Path, layers: Sequence[int] | None = None) -> AudioEncoder:
    """Load a frozen audio encoder from a BEATs checkpoint file or a transformers folder.

    Raises AudioEncoderFileError for paths that do not hold a usable encoder and
    ValueError (naming the valid range) for layers the model does not have.
    """
    path = Path(path)
    if not path.exists():
        raise AudioEncoderFileError(f"audio encoder not found: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AudioEncoderFileError(
                f"{path} is a folder without config.json; an audio-encoder folder is a transformers model folder "
                "(config.json + *.safetensors) of an AST, wav2vec2 or HuBERT model"
            )
        from .hf_encoders import HFAudioEncoder, HFEncoderFileError

        try:
            encoder: AudioEncoder = HFAudioEncoder.from_folder(path, layers=layers)
        except HFEncoderFileError as exc:
            raise AudioEncoderFileError(str(exc)) from exc
        return _freeze(encoder)
    if path.suffix.lower() not in BEATS_FILE_SUFFIXES:
        raise AudioEncoderFileError(
            f"{path.name}: unsupported audio-encoder file type {path.suffix or '(none)'!r}; expected a BEATs checkpoint "
            f"({', '.join(BEATS_FILE_SUFFIXES)}) or a transformers model folder"
        )
    try:
        config, state = load_beats_state(path)
    except (BEATsCheckpointError, FileNotFoundError) as exc:
        raise AudioEncoderFileError(str(exc)) from exc
    # Validate the layers before materialising the weights.
    resolve_layers(layers, config.encoder_layers)
    model = BEATs.from_state_dict(config, state)
    return _freeze(BEATsAudioEncoder(model, layers))
