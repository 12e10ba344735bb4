"""A speaker-embedding audio encoder: the GE2E voice encoder of Resemblyzer, as features for the Embedder.

The paper also draws faces from voices through a speaker embedding (an X-vector). This is the
same idea with the GE2E speaker encoder (Wan et al., 2018) whose trained weights Resemblyzer
0.1.4 (Apache-2.0, PyPI) ships as `resemblyzer/pretrained.pt`:

    encoder = load_audio_encoder("models/audio_encoders/pretrained.pt")   # kind "ge2e", layers (1,)
    features = encoder(wave16)     # [B, T] 16 kHz in [-1, 1] -> [B, N, 256]

One row per partial utterance of the window (Resemblyzer's `embed_utterance(return_partials=True)`):
1.6 s windows (160 mel frames) every 77 frames (its rate 1.3 per second), the last one kept only
if the audio covers at least 75 % of it, zero-padded. A 10 s window gives N = 12 unit vectors,
the sequence the Embedder's attentive pooling reads (Resemblyzer itself averages them).

The file is read with `torch.load(weights_only=True)` (`io.load_torch_weights_only`) and
recognised by its keys (`model_state` with `lstm.*` and `linear.*`); the training-only
`similarity_weight`/`similarity_bias` of GE2E's loss are not used. The package itself is never
imported: the model and its preprocessing are ours, in torch, equal to Resemblyzer's:

- the mel spectrogram of `librosa.feature.melspectrogram` as Resemblyzer calls it: 400-sample
  (25 ms) periodic Hann window, hop 160 (10 ms), centred frames with zero padding (librosa
  >= 0.10's default), power 2, 40 mel bands of librosa's Slaney filterbank (0-8 kHz, Slaney
  area normalisation); not a log-mel;
- an LSTM (40 -> 256, 3 layers), the last layer's final hidden state -> Linear(256, 256) ->
  ReLU -> L2 normalisation;
- volume normalisation as Resemblyzer's `preprocess_wav` does it: a clip quieter than -30 dBFS
  (RMS) is raised to -30 dBFS, a louder one is left alone (a silent one too: Resemblyzer would
  give NaN).

Not done: `preprocess_wav` also shortens silences with webrtcvad's voice activity detection
(30 ms frames; silent stretches longer than about 0.2 s are cut down). Here silences stay in the
window, so partials that are mostly silence give their own (less speaker-specific) vectors;
attentive pooling may learn to weigh them down, and a recording trimmed beforehand gives
Resemblyzer's embeddings.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import TARGET_SAMPLE_RATE
from .encoders import AudioEncoder, AudioEncoderFileError, EncoderSpec
from .io import load_torch_weights_only

__all__ = [
    "GE2E",
    "SpeakerAudioEncoder",
    "read_ge2e_checkpoint",
    "slaney_mel_filterbank",
    "mel_power_spectrogram",
    "normalize_volume",
    "partial_starts",
    "N_FFT",
    "HOP_LENGTH",
    "N_MELS",
    "PARTIAL_FRAMES",
    "PARTIALS_PER_SECOND",
    "MIN_COVERAGE",
    "TARGET_DBFS",
]

# Resemblyzer 0.1.4 hparams.py and voice_encoder.py defaults
N_FFT = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s
PARTIALS_PER_SECOND = 1.3  # embed_utterance(rate=1.3)
MIN_COVERAGE = 0.75  # embed_utterance(min_coverage=0.75)
TARGET_DBFS = -30.0  # audio_norm_target_dBFS, increase only
_TRAINING_ONLY = ("similarity_weight", "similarity_bias")


# --- preprocessing --------------------------------------------------------------------------------------------

def _hz_to_mel_slaney(hz: Tensor) -> Tensor:
    """Slaney's mel scale (librosa `htk=False`): linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz.clamp_min(min_log_hz) / min_log_hz) / logstep,
                       hz / f_sp)


def _mel_to_hz_slaney(mel: Tensor) -> Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filterbank(sample_rate: int = TARGET_SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                          fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """[n_mels, n_fft // 2 + 1] float32: librosa's default `filters.mel` (Slaney scale and area normalisation).

    Triangles between n_mels + 2 points evenly spaced on the mel scale, each scaled by 2 / its width in Hz.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz_slaney(torch.linspace(float(_hz_to_mel_slaney(torch.tensor(fmin, dtype=torch.float64))),
                                             float(_hz_to_mel_slaney(torch.tensor(fmax, dtype=torch.float64))),
                                             n_mels + 2, dtype=torch.float64))
    widths = edges.diff()
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0)
    weights = weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.to(torch.float32)


def mel_power_spectrogram(wave16: Tensor) -> Tensor:
    """[B, T] 16 kHz -> [B, 1 + T // 160, 40] mel power (Resemblyzer's `wav_to_mel_spectrogram`), float32."""
    wave = wave16.to(torch.float32)
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=wave.device)
    spec = torch.stft(wave, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT, window=window, center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [B, n_fft // 2 + 1, frames]
    bank = slaney_mel_filterbank().to(wave.device)
    return torch.matmul(bank, power).transpose(1, 2)


def normalize_volume(wave16: Tensor, target_dbfs: float = TARGET_DBFS) -> Tensor:
    """Raise each clip of [B, T] whose RMS level is below `target_dbfs` to it; louder or silent clips stay as they are."""
    rms = wave16.to(torch.float32).square().mean(dim=-1, keepdim=True).sqrt()
    target = 10.0 ** (target_dbfs / 20)
    gain = torch.where(rms > 0, target / rms.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(rms))
    return wave16 * gain.clamp_min(1.0).to(wave16.dtype)


def partial_starts(num_samples: int, rate: float = PARTIALS_PER_SECOND,
                   min_coverage: float = MIN_COVERAGE) -> list[int]:
    """First mel frame of each 160-frame partial utterance of a `num_samples` clip (Resemblyzer's
    `compute_partial_slices`): every round(16000 / rate / 160) frames while a partial still reaches the
    clip's end, the last dropped if the audio covers less than `min_coverage` of it (unless it is the only one)."""
    n_frames = math.ceil((num_samples + 1) / HOP_LENGTH)
    step = round(TARGET_SAMPLE_RATE / rate / HOP_LENGTH)
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (num_samples - starts[-1] * HOP_LENGTH) / (PARTIAL_FRAMES * HOP_LENGTH)
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()
    return starts


# --- the model ------------------------------------------------------------------------------------------------

class GE2E(nn.Module):
    """Resemblyzer's VoiceEncoder network: mel partials [N, 160, 40] -> unit speaker vectors [N, 256].

    State-dict names are the file's (`lstm.weight_ih_l0`, ..., `linear.weight`).
    """

    def __init__(self, hidden_size: int = 256, num_layers: int = 3, embedding_size: int = 256) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, embedding_size)

    @property
    def embedding_size(self) -> int:
        return self.linear.out_features

    def forward(self, mels: Tensor) -> Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = F.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # all-zero only in degenerate cases


def _model_state(obj: Any) -> Mapping[str, Any] | None:
    """The network's state dict if `obj` is a Resemblyzer checkpoint ({'model_state': ...}) or a bare GE2E state dict."""
    state = obj.get("model_state") if isinstance(obj, Mapping) else None
    state = state if isinstance(state, Mapping) else obj
    if isinstance(state, Mapping) and "lstm.weight_ih_l0" in state and "linear.weight" in state:
        return state
    return None


def read_ge2e_checkpoint(path: str | Path) -> GE2E | None:
    """The GE2E model of a Resemblyzer checkpoint (`pretrained.pt`, or a bare GE2E state dict), read weights-only,
    or None for a torch file of another kind.

    Raises `io.UnsafeFileError` for a pickle that carries code, ValueError for a file torch cannot read and
    AudioEncoderFileError for a GE2E file whose weights do not make the network.
    """
    path = Path(path)
    state = _model_state(load_torch_weights_only(path, "a BEATs or Resemblyzer (GE2E) checkpoint"))
    if state is None:
        return None
    state = {k: v for k, v in state.items() if k not in _TRAINING_ONLY}
    try:
        layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
        n_mels = int(state["lstm.weight_ih_l0"].shape[1])
        model = GE2E(hidden_size=int(state["lstm.weight_hh_l0"].shape[1]), num_layers=layers,
                     embedding_size=int(state["linear.weight"].shape[0]))
        if n_mels != N_MELS:
            raise ValueError(f"its LSTM reads {n_mels} mel bands; this encoder computes {N_MELS}")
        model.load_state_dict(state, strict=True)
    except (KeyError, AttributeError, IndexError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())  # load_state_dict's message spans lines
        raise AudioEncoderFileError(
            f"{path.name} looks like a GE2E speaker encoder (Resemblyzer) but its weights do not make the network: "
            f"{type(exc).__name__}: {detail[:400]}. Use Resemblyzer 0.1.4's resemblyzer/pretrained.pt as released."
        ) from None
    return model.to(torch.float32)


# --- the AudioEncoder -----------------------------------------------------------------------------------------

class SpeakerAudioEncoder(AudioEncoder):
    """GE2E speaker embeddings, one per partial utterance: `forward(wave16 [B, T]) -> [B, N, 256]`.

    Kind "ge2e"; the only layer is 1 (the final, L2-normalised embedding; `layers` None means (1,)).
    """

    min_samples = N_FFT  # one frame; a clip shorter than a partial is zero-padded to it, as Resemblyzer does

    def __init__(self, model: GE2E, layers: Sequence[int] | None = None) -> None:
        if layers is not None and tuple(layers) != (1,):
            raise ValueError(
                f"layers {list(layers)} are not available for the GE2E speaker encoder: it gives one feature, its "
                "speaker embedding, as layer 1; set layers to 1 or auto"
            )
        super().__init__(EncoderSpec(kind="ge2e", layers=(1,), hidden_size=model.embedding_size))
        self.model = model

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        batch, samples = wave16.shape
        starts = partial_starts(samples)
        wave = normalize_volume(wave16.to(torch.float32))
        wave = F.pad(wave, (0, max(0, (starts[-1] + PARTIAL_FRAMES) * HOP_LENGTH - samples)))
        mel = mel_power_spectrogram(wave)  # [B, frames, 40]
        partials = torch.stack([mel[:, s:s + PARTIAL_FRAMES] for s in starts], dim=1)  # [B, N, 160, 40]
        vectors = self.model(partials.flatten(0, 1).to(self.dtype))
        return {1: vectors.view(batch, len(starts), -1)}
