"""The one audio-encoder interface the rest of AudioToken uses.

    encoder = load_audio_encoder(path, layers=None)   # frozen, eval()
    features = encoder(wave16)                        # [B, T] 16 kHz in [-1, 1] -> [B, N, spec.feature_dim]
    encoder.spec                                      # EncoderSpec(kind, layers, hidden_size, sample_rate)
    encoder.spec.check_token(token.encoder, "AudioToken 'dog'")   # can the token read these features?

`path` is either a BEATs checkpoint file (.pt / .pth / .ckpt official pickle, read
weights-only, or .safetensors written by `beats_checkpoint.save_beats_safetensors`), Resemblyzer's
GE2E speaker encoder `pretrained.pt` (kind "ge2e", `speaker.py`; told apart from BEATs by its keys),
or a local transformers folder (config.json + *.safetensors) holding an AST, wav2vec2, HuBERT or CLAP model.

Layers are 1-indexed transformer layers; their outputs are concatenated on the feature
axis in the order given. The default is the reference's BEATs (4, 8, 12), i.e. the same
thirds of the depth for any model (n/3, 2n/3, n). Layers above max(layers) are never
computed. The forward runs under the caller's grad mode (the parameters themselves are
frozen with requires_grad False), and the encoder stays in eval mode even when a parent
module is put in training mode.

Checks live at the edges: `load_audio_encoder` (files, layers) and `AudioEncoder.forward`
(audio long enough for the model; the audio itself comes from `audio.prepare_waveform`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .audio import AudioInputError, TARGET_SAMPLE_RATE
from .beats import BEATs

__all__ = [
    "EncoderSpec",
    "AudioEncoder",
    "AudioEncoderFileError",
    "BEATsAudioEncoder",
    "load_audio_encoder",
    "default_layers",
    "resolve_layers",
    "DEFAULT_BEATS_LAYERS",
    "BEATS_FILE_SUFFIXES",
]

DEFAULT_BEATS_LAYERS = (4, 8, 12)
BEATS_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


class AudioEncoderFileError(ValueError):
    """A path that does not hold a usable audio encoder; the message says why."""


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder produces: `feature_dim = hidden_size * len(layers)` features per token."""

    kind: str  # "beats" | "ast" | "wav2vec2" | "hubert" | "clap" | "whisper" | "ge2e"
    layers: tuple[int, ...]  # 1-indexed transformer layers, concatenated on the feature axis
    hidden_size: int
    sample_rate: int = TARGET_SAMPLE_RATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

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

    def check_token(self, token_encoder: Mapping[str, Any], what: str) -> None:
        """Raise ValueError unless a token made for `token_encoder` (its file's encoder spec) reads these features.

        Compares the kind, the layers and the hidden size the token names (a spec may give only
        its feature width) and the feature width; `what` names the token in the message.
        """
        ours = self.to_dict()
        wanted = {k: list(v) if k == "layers" else v for k, v in token_encoder.items()
                  if k in ("kind", "layers", "hidden_size", "feature_dim")}
        if all(ours[k] == v for k, v in wanted.items()):
            return
        layers = ",".join(map(str, wanted.get("layers", [])))
        raise ValueError(
            f"{what} was trained on {wanted.get('kind')} layers {wanted.get('layers', '?')} (hidden size "
            f"{wanted.get('hidden_size', '?')}, {wanted.get('feature_dim', '?')} features) but the audio encoder is "
            f"{self.kind} layers {list(self.layers)} (hidden size {self.hidden_size}, {self.feature_dim} features). "
            f"Load the encoder the token was trained with" + (f" and set its layers to {layers}" if layers else "")
            + ", or retrain the token on this encoder."
        )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference choice (4, 8, 12 of 12) as thirds of any depth: (n/3, 2n/3, n), rounded, distinct."""
    picks = [max(1, (k * num_layers + 1) // 3) for k in (1, 2)] + [num_layers]
    return tuple(dict.fromkeys(picks))


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Check the user's 1-indexed `layers` for a model with `num_layers` layers (None -> default_layers)."""
    if layers is None:
        return default_layers(num_layers)
    result = tuple(layers)
    if not result or len(set(result)) != len(result) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= num_layers for i in result):
        raise ValueError(
            f"layers {list(result)} must be distinct layer numbers, at least one: valid layers for this "
            f"{num_layers}-layer encoder are 1..{num_layers}"
        )
    return result


class AudioEncoder(nn.Module):
    """Base class: `forward(wave16 [B, T]) -> [B, N, spec.feature_dim]`.

    Subclasses implement `layer_outputs(wave) -> {layer: [B, N, hidden]}` for the layers of
    `spec` (computing nothing above max(layers)); the base checks the audio's length, moves
    it to the encoder's device and concatenates.
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
        return next(self.parameters(), torch.empty(0)).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.empty(0)).dtype

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, wave16: Tensor) -> Tensor:
        if wave16.shape[-1] < self.min_samples:
            raise AudioInputError(
                f"audio of shape {tuple(wave16.shape)} is too short for the {self.spec.kind} encoder: it needs at "
                f"least {self.min_samples} samples ({self.min_samples / self.spec.sample_rate:.3f} s at "
                f"{self.spec.sample_rate} Hz); use a longer window"
            )
        outputs = self.layer_outputs(wave16.to(self.device))
        return torch.cat([outputs[i] for i in self.spec.layers], dim=-1)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class BEATsAudioEncoder(AudioEncoder):
    """Our BEATs port behind the AudioEncoder interface."""

    def __init__(self, model: BEATs, layers: Sequence[int] | None = None) -> None:
        layers = resolve_layers(layers, model.num_layers)
        super().__init__(EncoderSpec(kind="beats", layers=layers, hidden_size=model.hidden_size))
        self.model = model
        self.min_samples = 400 + (model.config.input_patch_size - 1) * 160  # one patch of frames

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        hidden = self.model(wave16, num_layers=max(self.spec.layers))
        return {i: hidden[i - 1] for i in self.spec.layers}


def _ge2e_model(path: Path):
    """The GE2E network if `path` is a Resemblyzer speaker-encoder checkpoint (recognised by its keys after
    weights-only loading), else None. A BEATs file is then read again by its own loader."""
    from .io import is_safetensors
    from .speaker import read_ge2e_checkpoint

    return None if is_safetensors(path) else read_ge2e_checkpoint(path)


def load_audio_encoder(path: str | Path, layers: Sequence[int] | None = None) -> AudioEncoder:
    """Load a frozen audio encoder from a BEATs or Resemblyzer (GE2E) checkpoint file or a transformers folder.

    Raises AudioEncoderFileError for paths that do not hold a usable encoder (`io.UnsafeFileError`
    for a pickle that carries code) and ValueError (naming the valid range) for layers the
    model does not have.
    """
    path = Path(path)
    if not path.exists():
        raise AudioEncoderFileError(f"audio encoder not found: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AudioEncoderFileError(
                f"{path} is a folder without config.json; an audio-encoder folder is a transformers model folder "
                "(config.json + *.safetensors) of an AST, wav2vec2, HuBERT or CLAP model"
            )
        from .hf_encoders import HFAudioEncoder

        encoder: AudioEncoder = HFAudioEncoder.from_folder(path, layers=layers)
    elif path.suffix.lower() not in BEATS_FILE_SUFFIXES:
        raise AudioEncoderFileError(
            f"{path.name}: unsupported audio-encoder file type {path.suffix or '(none)'!r}; expected a BEATs or "
            f"Resemblyzer (GE2E speaker encoder) checkpoint "
            f"({', '.join(BEATS_FILE_SUFFIXES)}) or a transformers model folder"
        )
    elif (speaker := _ge2e_model(path)) is not None:
        from .speaker import SpeakerAudioEncoder

        encoder = SpeakerAudioEncoder(speaker, layers)
    else:
        from .beats_checkpoint import load_beats_state

        config, state = load_beats_state(path)
        resolve_layers(layers, config.encoder_layers)  # before materialising the weights
        encoder = BEATsAudioEncoder(BEATs.from_state_dict(config, state), layers)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
