"""Image models, one frame per timeline frame: per-frame conditioning, coherent noise, sampling.

A music video from an image model (SD1.x, SDXL, Flux...) is a batch of stills. They only
change with the sound, not at random, when every frame starts from the same noise (or noise
that drifts slowly) and differs only in its own conditioning row; img2img chaining (each frame
starts from the previous result) ties consecutive frames closer still.

Noise modes (per-element N(0, 1) in every frame, for any seed):
- "same for every frame": one noise field, the one ComfyUI's KSampler draws for a batch-1
  latent with this seed (comfy.sample.prepare_noise), for all frames.
- "slowly varying": independent keyframe noises every `period` frames (keyframe 0 is the "same"
  noise), frames between keyframes k and k+1 are their spherical interpolation
  cos(u pi/2) n_k + sin(u pi/2) n_k+1, u = (i mod period) / period: slerp at the right angle,
  which independent Gaussian fields have (in high dimension exactly that in the limit). It keeps
  each element N(0, 1) exactly (cos^2 + sin^2 = 1), so no frame is washed out the way a linear
  blend would wash it; neighbouring frames correlate by cos(pi / (2 period)).
"""
from __future__ import annotations

import math

import torch
from comfy_api.v0_0_2 import io

from ..audiotoken_core.timeline import AudioTimeline
from .audiotoken_nodes import (
    CLIP_TOOLTIP,
    TIMELINE,
    AudioTokenConditioning,
    _prompt_inputs,
    schema,
)
from .audiotoken_nodes import VIDEO_CATEGORY as CATEGORY
from .splice import encode_with_vectors

NOISE_MODES = ("same for every frame", "slowly varying")
NOISE_TOOLTIP = ("'same for every frame': one noise field for all frames, so frames differ only by their sound. "
                 "'slowly varying': the noise drifts smoothly from one keyframe noise to the next every "
                 "noise_period_frames frames (each frame still plain Gaussian noise).")
PERIOD_TOOLTIP = "Frames between keyframe noises in 'slowly varying' mode (ignored by 'same for every frame')."
_LATENT_SCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")  # upstream latent extras


class FrameError(ValueError):
    """Inputs the frame nodes cannot use; the message says what to change."""


# -- noise --------------------------------------------------------------------------------

def _check_noise_options(mode: str, period: int) -> None:
    if mode not in NOISE_MODES:
        raise FrameError(f"Unknown noise mode '{mode}': choose one of {list(NOISE_MODES)}.")
    if int(period) < 1:
        raise FrameError(f"noise_period_frames is {period}: set it to 1 or more frames.")


def frame_noise(frame_shape, frame_indices, seed: int, mode: str, period: int = 24) -> torch.Tensor:
    """Noise [len(frame_indices), *frame_shape] (float32, CPU) for those frames of a video.

    A frame's noise depends only on (seed, mode, period, its index), never on which other frames
    are drawn with it, so batches of any size give the same frames."""
    _check_noise_options(mode, period)
    indices = [int(i) for i in frame_indices]
    if any(i < 0 for i in indices):
        raise FrameError(f"Frame indices must be 0 or more, got {min(indices)}.")
    shape = [1, *[int(s) for s in frame_shape]]
    generator = torch.Generator().manual_seed(int(seed))
    if mode == NOISE_MODES[0] or not indices:
        field = torch.randn(shape, generator=generator)
        return field.expand(len(indices), *shape[1:]).clone()
    period = int(period)
    positions = [(i // period, (i % period) / period) for i in indices]
    needed = {k for k, u in positions} | {k + 1 for k, u in positions if u > 0}
    keyframes = {}
    for k in range(max(needed) + 1):  # drawn in order, so keyframe k is the same whatever is asked
        draw = torch.randn(shape, generator=generator)
        if k in needed:
            keyframes[k] = draw
    return torch.cat([keyframes[k] if u == 0 else
                      math.cos(u * math.pi / 2) * keyframes[k] + math.sin(u * math.pi / 2) * keyframes[k + 1]
                      for k, u in positions])


class FrameNoise:
    """A NOISE for SamplerCustomAdvanced: frame b of the latent batch (or its `batch_index`) gets
    frame_noise of that index."""

    def __init__(self, seed: int, mode: str, period: int):
        _check_noise_options(mode, period)
        self.seed, self.mode, self.period = int(seed), mode, int(period)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if getattr(samples, "is_nested", False):
            raise FrameError("AudioToken Frame Noise got a nested latent (several latents in one); "
                             "give it a plain latent batch with one frame per row.")
        indices = input_latent.get("batch_index") or range(samples.shape[0])
        noise = frame_noise(samples.shape[1:], indices, self.seed, self.mode, self.period)
        return noise.to(dtype=samples.dtype)


# -- per-frame rows of CONDITIONING and latents ---------------------------------------------

def _batch(value) -> int | None:
    return int(value.shape[0]) if torch.is_tensor(value) and value.ndim > 0 else None


def frame_total(positive: list, negative: list, latent_samples: torch.Tensor) -> int:
    """F: the one batch size > 1 among the conditioning rows and the latent (1 when all are 1)."""
    sizes = {_batch(latent_samples)}
    for entries in (positive, negative):
        for cond, extras in entries:
            sizes.add(_batch(cond))
            sizes.update(_batch(v) for v in extras.values())
    sizes.discard(None)
    sizes.discard(1)
    if len(sizes) > 1:
        raise FrameError(
            f"The conditionings and the latent have different frame counts {sorted(sizes)}: give the positive one row "
            "per frame (AudioToken Frame Conditioning), a negative of 1 row or the same rows, and a latent of batch 1 "
            "(or one latent per frame).")
    return sizes.pop() if sizes else 1


def _rows(value, start: int, stop: int, frames: int):
    """Frames start..stop-1 of a per-frame tensor; batch-1 tensors and non-tensors as they are."""
    if _batch(value) == frames and frames > 1:
        return value[start:stop]
    return value


def conditioning_rows(conditioning: list, start: int, stop: int, frames: int) -> list:
    """Each entry's cond and tensor extras cut to frames start..stop-1 (batch-1 ones broadcast)."""
    return [[_rows(cond, start, stop, frames), {k: _rows(v, start, stop, frames) for k, v in extras.items()}]
            for cond, extras in conditioning]


# -- sampling -------------------------------------------------------------------------------

def _empty_latent_fixed(model, latent: dict) -> torch.Tensor:
    """comfy.sample.fix_empty_latent_channels as KSampler calls it (an empty 4-channel latent
    becomes the model's channel count; upstream also passes the latent's downscale ratios)."""
    import comfy.sample

    ratios = {k: latent[k] for k in _LATENT_SCALE_KEYS if k in latent}  # only upstream's latents have them
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        raise FrameError("AudioToken Sample Frames got a nested latent (several latents in one); "
                         "give it an image latent such as Empty Latent Image.")
    return comfy.sample.fix_empty_latent_channels(model, samples, **ratios)


def sample_frames(model, positive: list, negative: list, latent: dict, *, seed: int, steps: int, cfg: float,
                  sampler_name: str, scheduler: str, noise_mode: str = NOISE_MODES[0], noise_period: int = 24,
                  chain_denoise: float = 1.0, frames_per_batch: int = 8) -> torch.Tensor:
    """Latents [F, ...]: frame i sampled with conditioning row i and frame_noise(i), with ComfyUI's
    own KSampler path (comfy.sample.sample), `frames_per_batch` frames per sampler call.

    chain_denoise < 1: frame 0 from noise at denoise 1; frame k > 0 starts from frame k-1's result
    re-noised to `chain_denoise` (sequential, one frame per call). Deterministic samplers give the
    same frame whatever frames_per_batch is; ancestral / SDE samplers draw fresh step noise per
    batch from `seed` as KSampler does, which differs between frames.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.utils

    _check_noise_options(noise_mode, noise_period)
    if int(frames_per_batch) < 1:
        raise FrameError(f"frames_per_batch is {frames_per_batch}: set it to 1 or more.")
    if not 0.0 < float(chain_denoise) <= 1.0:
        raise FrameError(f"chain_denoise is {chain_denoise}: use a value in (0, 1]; 1 turns chaining off.")
    template = _empty_latent_fixed(model, latent)
    frames = frame_total(positive, negative, template)
    mask = latent.get("noise_mask")
    if mask is not None and _batch(mask) not in (1, frames):
        raise FrameError(f"The latent's noise mask has {_batch(mask)} rows for {frames} frames: give it 1 row or one per frame.")
    chained = float(chain_denoise) < 1.0
    per_call = 1 if chained else int(frames_per_batch)
    progress = comfy.utils.ProgressBar(frames)

    def check_interrupt(*_):
        comfy.model_management.throw_exception_if_processing_interrupted()

    results = []
    for start in range(0, frames, per_call):
        stop = min(start + per_call, frames)
        check_interrupt()
        if chained and start > 0:
            start_latent, denoise = results[-1], float(chain_denoise)
        else:
            start_latent, denoise = _rows(template, start, stop, frames), 1.0
        start_latent = start_latent.expand(stop - start, *start_latent.shape[1:]) if start_latent.shape[0] == 1 \
            else start_latent
        noise = frame_noise(template.shape[1:], range(start, stop), seed, noise_mode, noise_period)
        out = comfy.sample.sample(
            model, noise.to(template.dtype), steps, cfg, sampler_name, scheduler,
            conditioning_rows(positive, start, stop, frames), conditioning_rows(negative, start, stop, frames),
            start_latent, denoise=denoise, noise_mask=None if mask is None else _rows(mask, start, stop, frames),
            callback=check_interrupt, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        results.append(out)
        progress.update(stop - start)
    return torch.cat(results)


# -- nodes ----------------------------------------------------------------------------------

def _timeline(timeline) -> AudioTimeline:
    if not isinstance(timeline, AudioTimeline):
        raise FrameError(f"Expected an audio timeline from 'AudioToken Audio Timeline (frames)', got {type(timeline).__name__}.")
    return timeline


class AudioTokenFrameConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenFrameConditioning",
            display_name="AudioToken Frame Conditioning",
            category=CATEGORY,
            description="One conditioning row per video frame: the prompt with each frame's audio vector in place of "
                        "the placeholder, the audio word's weight scaled by the frame's weight (onsets). Rows share "
                        "batched text-encoder passes and identical rows are encoded once, so hundreds of frames cost "
                        "about one batched pass. Feed it to 'AudioToken Sample Frames'.",
            inputs=[io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                    TIMELINE.Input("timeline", tooltip="From 'AudioToken Audio Timeline (frames)': one audio vector per frame."),
                    *_prompt_inputs()],
            outputs=[io.Conditioning.Output(tooltip="Conditioning with one row per frame, for 'AudioToken Sample Frames'.")],
        )

    @classmethod
    def validate_inputs(cls, placeholder=None):
        return AudioTokenConditioning.validate_inputs(placeholder=placeholder)

    @classmethod
    def execute(cls, clip, timeline, text, placeholder) -> io.NodeOutput:
        timeline = _timeline(timeline)
        what = f"Audio timeline '{timeline.embedding.source}'"
        return io.NodeOutput(encode_with_vectors(clip, text, placeholder, timeline.embedding.vectors, what,
                                                 row_weights=timeline.weights))


def _sampler_inputs() -> list:
    import comfy.samplers

    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the frames' noise (and of the step noise of ancestral samplers)."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps per frame."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, as in KSampler (Flux.1 dev: 1.0 with FluxGuidance)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                       tooltip="Sampler. Deterministic ones (euler, dpmpp_2m, ...) keep frames with equal sound equal; "
                               "ancestral and SDE samplers add fresh noise at every step."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Noise schedule."),
    ]


class AudioTokenSampleFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenSampleFrames",
            display_name="AudioToken Sample Frames",
            category=CATEGORY,
            description="KSampler for a video made of stills: samples one latent per frame with that frame's "
                        "conditioning row and temporally coherent noise (the same for every frame, or slowly "
                        "varying), in batches of frames_per_batch; optionally each frame starts from the previous "
                        "one (img2img chaining). Decode with VAE Decode and write with Create Video.",
            inputs=[io.Model.Input("model", tooltip="The image model (SD1.x, SD2.x, SDXL, Flux.1, ...)."),
                    io.Conditioning.Input("positive", tooltip="One row per frame, from 'AudioToken Frame Conditioning' "
                                                              "(a one-row conditioning is used for every frame)."),
                    io.Conditioning.Input("negative", tooltip="Negative prompt: one row for all frames, or one per frame."),
                    io.Latent.Input("latent_image", tooltip="Frame size (Empty Latent Image, batch 1), or one start latent per frame."),
                    *_sampler_inputs(),
                    io.Combo.Input("noise", options=list(NOISE_MODES), default=NOISE_MODES[0], tooltip=NOISE_TOOLTIP),
                    io.Int.Input("noise_period_frames", default=24, min=1, max=100000, tooltip=PERIOD_TOOLTIP),
                    io.Float.Input("chain_denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                                   tooltip="1 = off. Below 1, every frame after the first starts from the previous "
                                           "frame's result re-noised to this denoise (lower = smoother, more alike); "
                                           "frames are then sampled one by one."),
                    io.Int.Input("frames_per_batch", default=8, min=1, max=4096,
                                 tooltip="Frames per sampler call: more is faster but needs more memory. Does not "
                                         "change the frames (with a deterministic sampler).")],
            outputs=[io.Latent.Output(tooltip="One latent per frame, in frame order.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, noise,
                noise_period_frames, chain_denoise, frames_per_batch) -> io.NodeOutput:
        samples = sample_frames(model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
                                sampler_name=sampler_name, scheduler=scheduler, noise_mode=noise,
                                noise_period=noise_period_frames, chain_denoise=chain_denoise,
                                frames_per_batch=frames_per_batch)
        return io.NodeOutput({"samples": samples})


class AudioTokenFrameNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenFrameNoise",
            display_name="AudioToken Frame Noise",
            category=CATEGORY,
            description="NOISE for SamplerCustomAdvanced with temporally coherent noise over the latent batch "
                        "(one row per frame): the same for every frame, or slowly varying.",
            inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of the noise."),
                    io.Combo.Input("noise", options=list(NOISE_MODES), default=NOISE_MODES[0], tooltip=NOISE_TOOLTIP),
                    io.Int.Input("noise_period_frames", default=24, min=1, max=100000, tooltip=PERIOD_TOOLTIP)],
            outputs=[io.Noise.Output(tooltip="Connect to SamplerCustomAdvanced's noise input.")],
        )

    @classmethod
    def execute(cls, noise_seed, noise, noise_period_frames) -> io.NodeOutput:
        return io.NodeOutput(FrameNoise(noise_seed, noise, noise_period_frames))


NODES = [AudioTokenFrameConditioning, AudioTokenSampleFrames, AudioTokenFrameNoise]
