"""Loaded models as they travel between nodes, managed by ComfyUI's ModelPatcher.

ComfyUI decides where models live (GPU, CPU, offloaded) through `ModelPatcher` and
`model_management.load_models_gpu`; wrapping our modules the same way lets them share
VRAM politely with the UNet and CLIP instead of being moved by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..audiotoken_core.audio import prepare_waveform, window_count
from ..audiotoken_core.embedding import AudioEmbedding
from ..audiotoken_core.encoders import AudioEncoder
from ..audiotoken_core.token_file import AudioToken

# Clips encoded at once: bounds activation memory when a long recording becomes many windows.
ENCODE_BATCH = 8


class _Holder(torch.nn.Module):
    """ModelPatcher writes attributes (device, memory counters) onto its model: keep ours clean."""

    def __init__(self, **modules: torch.nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def _patcher(**modules: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    holder = _Holder(**modules).eval()
    size = sum(t.numel() * t.element_size() for t in holder.state_dict().values())
    return comfy.model_patcher.ModelPatcher(
        holder, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(), size=size
    )


@dataclass
class LoadedEncoder:
    """What flows on an AUDIOTOKEN_ENCODER socket."""

    encoder: AudioEncoder
    name: str
    #: manages the encoder's weights. None makes one; an encoder running a model ComfyUI already manages (core's
    #: AUDIO_ENCODER, nodes/core_audio_encoder.py) passes that model's own patcher, so the weights have one owner.
    patcher: comfy.model_patcher.ModelPatcher | None = None

    def __post_init__(self):
        if self.patcher is None:
            self.patcher = _patcher(encoder=self.encoder)


@dataclass
class LoadedAudioToken:
    """What flows on an AUDIOTOKEN socket: the trained Embedders bound to their audio encoder."""

    token: AudioToken
    encoder: LoadedEncoder
    name: str

    def __post_init__(self):
        self.patcher = _patcher(**{f"embedder_{k}": m for k, m in self.token.embedders.items()})

    def embed_audio(self, audio: dict, *, start_seconds: float, window_seconds: float,
                    channel_policy: str, loop: bool) -> tuple[AudioEmbedding, torch.Tensor]:
        """ComfyUI AUDIO -> (one AudioEmbedding row per clip of the batch, the 16 kHz windows heard [B, T])."""
        wave16 = prepare_waveform(audio["waveform"], audio["sample_rate"], channel_policy=channel_policy,
                                  start_seconds=start_seconds, window_seconds=window_seconds, loop=loop)
        return self._embed(wave16, f"{self.name} @ {start_seconds:g}s+{window_seconds:g}s"), wave16

    def embed_windows(self, audio: dict, *, window_seconds: float, hop_seconds: float, max_windows: int,
                      channel_policy: str) -> tuple[AudioEmbedding, list[float]]:
        """One row per window (clip-major for a batch of clips) and the window start times
        (audio.window_count: the windows that fit; one looped window for a short recording)."""
        rate = int(audio["sample_rate"])
        seconds = audio["waveform"].shape[-1] / rate
        count = window_count(seconds, window_seconds, hop_seconds)
        if count > max_windows:
            raise ValueError(f"The recording ({seconds:.1f} s) has {count} windows of {window_seconds:g} s every "
                             f"{hop_seconds:g} s, more than max_windows={max_windows}. Raise max_windows or the hop.")
        starts = [i * hop_seconds for i in range(count)]
        waves = [prepare_waveform(audio["waveform"], rate, channel_policy=channel_policy, start_seconds=s,
                                  window_seconds=window_seconds, loop=True) for s in starts]
        wave16 = torch.stack(waves, dim=1).flatten(0, 1)  # [B * count, T], clip-major
        return self._embed(wave16, f"{self.name} windows {window_seconds:g}s/{hop_seconds:g}s x{count}"), starts

    def embed_wave16(self, wave16: torch.Tensor) -> dict[str, torch.Tensor]:
        """[N, T16] 16 kHz mono windows -> {text-encoder key: [N, D]} CPU float32, ENCODE_BATCH at a time.

        The embed_fn of `timeline.build_timeline`."""
        mm.load_models_gpu([self.encoder.patcher, self.patcher])
        device = self.patcher.load_device
        parts = []
        with torch.no_grad():
            for chunk in wave16.split(ENCODE_BATCH):
                features = self.encoder.encoder(chunk.to(device))  # on the encoder's own load device
                parts.append(self.token.embed(features.to(device)))
        return {k: torch.cat([p.vectors[k] for p in parts]).float().cpu() for k in parts[0].vectors}

    def _embed(self, wave16: torch.Tensor, source: str) -> AudioEmbedding:
        return AudioEmbedding(vectors=self.embed_wave16(wave16), source=source)
