"""ComfyUI core's AUDIO_ENCODER (its *Load Audio Encoder*: wav2vec2 base/large, Whisper large v3)
as an AudioToken encoder.

Users of Wan S2V and HuMo already have these files in models/audio_encoders; this node runs the
model core loaded, through core's own ModelPatcher (one owner for the weights, shared VRAM
management), and returns the chosen 1-indexed layers like every AudioToken encoder.

- Layer i is the output of the i-th transformer block: core's `encoded_audio_all_layers[i]`,
  except that core's last entry of the pre-LN models (wav2vec2 large, Whisper) has the final
  LayerNorm applied, ours does not (as our transformers encoders). Blocks above max(layers) are
  not computed: core's own forward runs and is stopped after that block.
- Kinds: core's wav2vec2 computes what transformers' Wav2Vec2Model computes on the same
  weights (tests/test_core_audio_encoder.py), so its kind is "wav2vec2", the same as a
  transformers wav2vec2 folder of the Load Audio Encoder node: a token trained through either
  reads the other. Whisper has kind "whisper".
- Preprocessing is the model's own, per clip: wav2vec2 large normalises each clip to zero mean
  and unit variance (core normalises over the whole batch, which would make a window's features
  depend on its batch-mates; on an already normalised batch core's step is then an identity up
  to 1e-6), base models take the raw wave (core's setting). Whisper's log-mel (core's own
  extractor) is computed clip by clip for the same reason (its floor is 8 below the maximum);
  it pads every clip to 30 s, and we keep the 50-per-second tokens that cover the window
  (a 10 s window gives 500), so silence padding does not outweigh the sound.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from comfy_api.v0_0_2 import io
from torch import Tensor

from ..audiotoken_core.audio import TARGET_SAMPLE_RATE, AudioInputError
from ..audiotoken_core.encoders import AudioEncoder, EncoderSpec, resolve_layers
from ..audiotoken_core.hf_encoders import zero_mean_unit_var
from .audiotoken_nodes import CATEGORY, ENCODER, _parse_layers, schema
from .runtime import LoadedEncoder

CORE_AUDIO_ENCODER = io.Custom("AUDIO_ENCODER")  # the type of core's AudioEncoderLoader output
# core model class -> our kind
CORE_KINDS = {"Wav2Vec2Model": "wav2vec2", "WhisperLargeV3": "whisper"}
WHISPER_SECONDS = 30  # Whisper hears 30 s: core pads or cuts every clip to it
WHISPER_TOKEN_SAMPLES = 320  # 16 kHz samples per encoder token (hop 160, then a stride-2 conv)


class _Stop(Exception):
    """Raised by the hook of the highest wanted block: the rest of core's forward is not computed."""


class CoreAudioEncoder(AudioEncoder):
    """An AudioEncoder over the model of a core AUDIO_ENCODER (`comfy.audio_encoders.AudioEncoderModel`)."""

    def __init__(self, core_encoder, layers: Sequence[int] | None = None) -> None:
        model = getattr(core_encoder, "model", None)
        kind = CORE_KINDS.get(type(model).__name__)
        if kind is None or not hasattr(core_encoder, "patcher"):
            what = type(model).__name__ if model is not None else type(core_encoder).__name__
            raise ValueError(
                f"the audio_encoder input holds a {what}, not a wav2vec2 or Whisper model of ComfyUI's Load Audio Encoder; "
                "connect a Load Audio Encoder loaded with a wav2vec2 or whisper_large_v3 file"
            )
        rate = int(getattr(core_encoder, "model_sample_rate", TARGET_SAMPLE_RATE))
        if rate != TARGET_SAMPLE_RATE:
            raise ValueError(f"this {kind} audio encoder runs at {rate} Hz; AudioToken feeds 16 kHz audio, so only "
                             "16 kHz encoders are supported")
        blocks = model.encoder.layers
        layers = resolve_layers(layers, len(blocks))
        super().__init__(EncoderSpec(kind=kind, layers=layers,
                                     hidden_size=int(model.encoder.layer_norm.normalized_shape[0])))
        self.core = core_encoder  # plain attribute: its patcher, not ours, moves the model
        self.add_module("model", model)  # so fingerprints and parameters see the weights
        self.min_samples = 400

    @property
    def device(self) -> torch.device:
        """Where core runs the model (its patcher's load device), not where the weights happen to sit."""
        return torch.device(self.core.load_device)

    def _stop_after(self, wanted: Sequence[int]) -> tuple[dict[int, Tensor], list]:
        blocks = self.model.encoder.layers
        captured: dict[int, Tensor] = {}
        last = max(wanted)

        def hook_for(index: int):
            def hook(module, args, output):
                captured[index] = output
                if index == last:
                    raise _Stop
            return hook

        return captured, [blocks[i - 1].register_forward_hook(hook_for(i)) for i in sorted(set(wanted))]

    def layer_outputs(self, wave16: Tensor) -> Mapping[int, Tensor]:
        wave = wave16.float()
        if self.spec.kind == "whisper":
            if wave.shape[-1] > WHISPER_SECONDS * TARGET_SAMPLE_RATE:
                raise AudioInputError(
                    f"Whisper hears at most {WHISPER_SECONDS} s per window, got {wave.shape[-1] / TARGET_SAMPLE_RATE:.1f} s; "
                    f"set window_seconds to {WHISPER_SECONDS} or less"
                )
            mel = torch.cat([self.model.feature_extractor(clip[None, None]) for clip in wave])
            run, inputs = self.model.encoder, mel
            tokens = math.ceil(wave.shape[-1] / WHISPER_TOKEN_SAMPLES)
        else:
            run, inputs = self.model, (zero_mean_unit_var(wave) if self.model.do_normalize else wave)[:, None]
            tokens = None
        captured, handles = self._stop_after(self.spec.layers)
        try:
            run(inputs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {i: t[:, :tokens] for i, t in captured.items()}


class AudioTokenFromAudioEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenFromAudioEncoder",
            display_name="AudioToken Encoder from Audio Encoder",
            category=CATEGORY,
            description="Uses an audio encoder loaded by ComfyUI's own Load Audio Encoder (the wav2vec2 or Whisper large v3 "
                        "files of Wan S2V and HuMo) as the AudioToken audio encoder, for Load AudioToken and Train AudioToken. "
                        "A token trained on a wav2vec2 here also works with the same wav2vec2 as a transformers folder, and back.",
            inputs=[
                CORE_AUDIO_ENCODER.Input("audio_encoder", tooltip="From ComfyUI's Load Audio Encoder (models/audio_encoders): "
                                                                  "wav2vec2 base or large, or Whisper large v3."),
                io.String.Input("layers", default="auto",
                                tooltip="Transformer layers whose outputs are concatenated (1-indexed). 'auto' = a third, two "
                                        "thirds and all of the depth (4,8,12 of wav2vec2 base's 12). Must match what the "
                                        "AudioToken was trained with."),
            ],
            outputs=[ENCODER.Output(display_name="audiotoken_encoder",
                                    tooltip="The frozen audio encoder, for Load AudioToken or Train AudioToken.")],
        )

    @classmethod
    def execute(cls, audio_encoder, layers: str) -> io.NodeOutput:
        encoder = CoreAudioEncoder(audio_encoder, _parse_layers(layers))
        name = f"ComfyUI audio encoder ({encoder.spec.kind}, {encoder.spec.hidden_size} wide)"
        return io.NodeOutput(LoadedEncoder(encoder=encoder, name=name, patcher=audio_encoder.patcher))


NODES = [AudioTokenFromAudioEncoder]
