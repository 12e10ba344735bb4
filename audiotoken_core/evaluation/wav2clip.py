"""Wav2CLIP (Wu et al., ICASSP 2022): an audio encoder distilled into CLIP ViT-B/32's image space.

Our own torch port of the released model (descriptinc/lyrebird-wav2clip, PyPI ``wav2clip``
0.1.0), loading the official checkpoint ``Wav2CLIP.pt`` by its key names. It is the audio side
of the paper's AIS metric; the image side must be CLIP ViT-B/32 (512-d).

Architecture (the released "frozen + transform" model):

- front end: power spectrogram, ``n_fft`` 512, hop 353, periodic Hann window of 512, centered
  with reflect padding -> ``[B, 1, 257, frames]``; ``log(x + 1e-7)``; standardised with the mean
  and (unbiased) standard deviation, ``(x - mean) / (std + 1e-9)``;
- ``audio_encoder``: a ResNet-18 (BasicBlock x [2, 2, 2, 2], widths 64-512, 7x7/2 stem + max pool,
  BatchNorm, global average pool) over the 1-channel log spectrogram -> 512;
- ``audio_transform``: MLP Linear(512, 512) -> ReLU -> (Dropout 0.1) -> Linear(512, 512) into
  CLIP's embedding space. Outputs are not L2-normalised (the metrics take cosines).

Standardisation: the official code uses ONE mean/std over the whole batch tensor, so an
embedding depends on the other clips of its batch. We default to per-example statistics
(``normalization="per_example"``), which equals the official output for a batch of one (how
``wav2clip.embed_audio`` is used on single clips) and makes embeddings batch-independent;
``normalization="batch"`` reproduces the official batch behaviour exactly.

Checkpoint format: the official ``Wav2CLIP.pt`` is a torch pickle of a flat state dict whose
keys start with ``audio_encoder.`` (the ResNet, including the spectrogram's ``window`` buffer
and BatchNorm ``num_batches_tracked``) and ``audio_transform.sequential.{0,3}.`` (the MLP);
training-time extras (``image_transform.*``) are ignored. We also accept a Lightning-style
``{"state_dict": {...}}`` wrapper, ``module.``/``model.`` prefixes, the ``encoder.``/``transform.``
names of the package's ``ResNetExtractor`` and a ``.safetensors`` file with the same keys.
``.pt`` files are read with weights-only loading only (``audiotoken_core.io``);
``python scripts/convert_wav2clip.py IN.pt OUT.safetensors`` converts one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import load_torch_weights_only

SAMPLE_RATE = 16000

__all__ = ["SAMPLE_RATE", "Wav2CLIPConfig", "Wav2CLIP", "Wav2CLIPCheckpointError", "load_wav2clip",
           "wav2clip_state_dict"]


class Wav2CLIPCheckpointError(ValueError):
    """The file is not a Wav2CLIP checkpoint this port can load; the message lists what it found."""


@dataclass
class Wav2CLIPConfig:
    n_fft: int = 512
    hop_length: int = 353
    log_offset: float = 1e-7
    std_eps: float = 1e-9
    normalization: str = "per_example"        # or "batch" (the official code's batch-wide statistics)
    layers: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    transform_units: tuple[int, ...] | None = (512, 512, 512)   # None: no MLP, the encoder output is the embedding
    transform_dropout: float = 0.1
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self):
        self.layers = tuple(self.layers)
        self.widths = tuple(self.widths)
        if self.transform_units is not None:
            self.transform_units = tuple(self.transform_units)

    @property
    def embed_dim(self) -> int:
        return self.transform_units[-1] if self.transform_units else self.widths[-1]

    def to_dict(self) -> dict:
        return asdict(self)


class _Spectrogram(nn.Module):
    """|STFT|^2 with a periodic Hann window (buffer ``window``, as the official state dict has it)."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True))

    def forward(self, wave: Tensor) -> Tensor:  # [B, T] -> [B, 1, F, frames]
        spec = torch.stft(wave, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft, window=self.window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        return spec.abs().pow(2.0).unsqueeze(1)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + identity)


class _AudioEncoder(nn.Module):
    def __init__(self, config: Wav2CLIPConfig):
        super().__init__()
        self.config = config
        self.spectrogram = _Spectrogram(config.n_fft, config.hop_length)
        w0 = config.widths[0]
        self.conv1 = nn.Conv2d(1, w0, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = w0
        for k, (n, width) in enumerate(zip(config.layers, config.widths)):
            stride = 1 if k == 0 else 2
            blocks = [_BasicBlock(cin, width, stride)] + [_BasicBlock(width, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def log_spectrogram(self, wave: Tensor) -> Tensor:
        x = torch.log(self.spectrogram(wave) + self.config.log_offset)
        if self.config.normalization == "batch":
            mean, std = x.mean(), x.std()
        else:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + self.config.std_eps)

    def forward(self, wave: Tensor) -> Tensor:
        x = self.log_spectrogram(wave)
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for k in range(len(self.config.layers)):
            x = getattr(self, f"layer{k + 1}")(x)
        return self.avgpool(x).flatten(1)


class _Transform(nn.Module):
    def __init__(self, units: tuple[int, ...], dropout: float):
        super().__init__()
        mods: list[nn.Module] = []
        for u0, u1 in zip(units[:-1], units[1:]):
            mods += [nn.Linear(u0, u1), nn.ReLU(), nn.Dropout(dropout)]
        self.sequential = nn.Sequential(*mods[:-2])  # no activation/dropout after the last Linear

    def forward(self, x: Tensor) -> Tensor:
        return self.sequential(x)


class Wav2CLIP(nn.Module):
    """``forward(waveform [B, T] mono 16 kHz float in [-1, 1]) -> [B, 512]`` CLIP-space embeddings."""

    def __init__(self, config: Wav2CLIPConfig | None = None):
        super().__init__()
        self.config = config or Wav2CLIPConfig()
        self.audio_encoder = _AudioEncoder(self.config)
        self.audio_transform = (_Transform(self.config.transform_units, self.config.transform_dropout)
                                if self.config.transform_units else None)

    def forward(self, waveform: Tensor) -> Tensor:
        """Callers pass prepare_waveform's output (finite, mono, 16 kHz, long enough)."""
        if waveform.ndim == 1:
            waveform = waveform.unsqueeze(0)
        p = next(self.parameters())
        x = self.audio_encoder(waveform.to(device=p.device, dtype=p.dtype))
        return self.audio_transform(x) if self.audio_transform is not None else x


# --------------------------------------------------------------------------------------------
# checkpoint loading

_PREFIX_MAP = (("audio_encoder.", "audio_encoder."), ("audio_transform.", "audio_transform."),
               ("encoder.", "audio_encoder."), ("transform.", "audio_transform."))


def _read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return load_torch_weights_only(path, "the official Wav2CLIP.pt")


def wav2clip_state_dict(obj) -> dict[str, Tensor]:
    """Our key names (``audio_encoder.*``, ``audio_transform.*``) from an official checkpoint object."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise Wav2CLIPCheckpointError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}.")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        k = key
        for strip in ("module.", "model."):
            if k.startswith(strip):
                k = k[len(strip):]
        for src, dst in _PREFIX_MAP:
            if k.startswith(src):
                out[dst + k[len(src):]] = value
                break
    if not any(k.startswith("audio_encoder.") for k in out):
        sample = sorted(k for k in obj if isinstance(k, str))[:8]
        raise Wav2CLIPCheckpointError(
            f"not a Wav2CLIP checkpoint: no 'audio_encoder.*' (or 'encoder.*') tensors; keys found: {sample}"
            f"{' ...' if len(obj) > 8 else ''}. Use the official Wav2CLIP.pt (lyrebird-wav2clip release v0.1.0-alpha).")
    return out


def load_wav2clip(path: str | Path, device: str | torch.device = "cpu",
                  normalization: str = "per_example") -> Wav2CLIP:
    """Load the official ``Wav2CLIP.pt`` (or a safetensors copy) into our port, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Wav2CLIP checkpoint {path} does not exist: download Wav2CLIP.pt from the "
                                f"descriptinc/lyrebird-wav2clip GitHub release v0.1.0-alpha and give its path.")
    state = wav2clip_state_dict(_read_file(path))
    has_transform = any(k.startswith("audio_transform.") for k in state)
    config = Wav2CLIPConfig(normalization=normalization, transform_units=(512, 512, 512) if has_transform else None)
    if has_transform:
        w = state.get("audio_transform.sequential.0.weight")
        if w is not None and w.ndim == 2:
            last = state.get("audio_transform.sequential.3.weight", w)
            config.transform_units = (int(w.shape[1]), int(w.shape[0]), int(last.shape[0]))
    model = Wav2CLIP(config)
    reference = model.state_dict()
    # not learned: fill when a converted file left them out
    for key, value in reference.items():
        if key not in state and (key.endswith("num_batches_tracked") or key.endswith("spectrogram.window")):
            state[key] = value
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    bad_shape = sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
    if missing or unexpected or bad_shape:
        raise Wav2CLIPCheckpointError(
            f"{path} does not match the Wav2CLIP architecture (ResNet-18 + 512-512-512 MLP): "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}, wrong shapes {bad_shape[:6]}. Use the official Wav2CLIP.pt.")
    model.load_state_dict({k: v.to(reference[k].dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.eval().requires_grad_(False)
    return model.to(device)
