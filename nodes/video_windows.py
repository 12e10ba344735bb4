"""Wan 2.x sound -> video: each ComfyUI context window gets the audio of its own time span.

ComfyUI samples long Wan videos in overlapping context windows (comfy/context_windows.py). When a
CONDITIONING holds several entries, ComfyUI 0.3.75 evaluates all of them in every window and
averages them: the whole clip would hear the mean sound. Current ComfyUI can instead pick entry
int(window centre / video length * entries) (`split_conds_to_windows`), which assumes equal-length
segments and does not exist in 0.3.75. So this node makes its own positive CONDITIONING, one entry
per time segment of the audio timeline, each tagged with its frame span, and a MODEL whose context
handler (a subclass of core's IndexListContextHandler, installed the way core's context-window
nodes install theirs) gives each window the entries whose span holds the window's centre frame.
Untagged entries (the negative, anything else) go through core's handler unchanged. Works on
ComfyUI 0.3.75 and current ComfyUI.

Frames and latents: Wan's VAE compresses time by 4 with the first frame on its own, so latent 0
shows pixel frame 0 and latent j >= 1 shows frames 4j-3 .. 4j; `length` pixel frames give
(length - 1) // 4 + 1 latents (EmptyHunyuanLatentVideo, WanImageToVideo).

Segments: by default one per context window of the "standard_static" schedule, the frames closest
to that window's centre (so with that schedule every window hears exactly its own segment);
or fixed `segment_frames` from frame 0. A segment's vector is the mean of its frames' timeline
vectors, its word weight the mean of their weights; each segment is encoded once.

Guard: every tagged entry carries a model cond that refuses to run. Only this node's handler
removes it (from the entry it picks for a window). So the positive used with a model that lacks
the handler (a plain model, or core's context windows put on top) stops with a message instead of
averaging the segments.
"""
from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import comfy.conds
import comfy.context_windows as cw
import comfy.latent_formats
import torch
from comfy_api.v0_0_2 import io

from .audiotoken_nodes import (
    CLIP_TOOLTIP,
    TIMELINE,
    VIDEO_CATEGORY,
    AudioTokenConditioning,
    _prompt_inputs,
    schema,
)
from .splice import encode_with_vectors, require_prompt

TIME_COMPRESSION = 4  # Wan 2.x VAE: 4 pixel frames per latent frame after the first
SPAN_KEY = "audiotoken_frames"  # CONDITIONING extras: (first, last) pixel frame of the entry's segment, inclusive
GUARD_KEY = "audiotoken_needs_video_windows"  # model cond that only AudioTokenContextHandler removes
WAN_DIM = 2  # time axis of Wan latents [B, C, T, H, W]
# Schedules whose windows are runs of frames, so a window has a centre in time (the looped one wraps around).
SCHEDULES = [cw.ContextSchedules.STATIC_STANDARD, cw.ContextSchedules.UNIFORM_STANDARD, cw.ContextSchedules.BATCHED]
NODE_NAME = "AudioToken Video Windows (Wan context windows)"


class VideoWindowsError(ValueError):
    """A timeline, model or setting the video windows cannot use; the message says what to change."""


# ---- frames and latents (plain integers, tested with known answers) ----

def latent_frames(pixel_frames: int) -> int:
    """Latent frames of a Wan video of `pixel_frames` frames (the 4n + 1 rule: 81 -> 21)."""
    return max((int(pixel_frames) - 1) // TIME_COMPRESSION + 1, 1)


def latent_overlap(pixel_frames: int) -> int:
    """A context overlap given in pixel frames, in latent frames (current ComfyUI's Wan rule: 30 -> 7;
    0.3.75's Wan node rounded up: 30 -> 8)."""
    return max(int(pixel_frames) // TIME_COMPRESSION, 0)


def pixel_span(latent_index: int) -> tuple[int, int]:
    """First and last pixel frame that latent frame `latent_index` shows."""
    if latent_index <= 0:
        return 0, 0
    return TIME_COMPRESSION * latent_index - (TIME_COMPRESSION - 1), TIME_COMPRESSION * latent_index


def window_centre_frame(index_list) -> int:
    """The pixel frame in the middle of a context window (a list of latent frame indices)."""
    first, last = pixel_span(min(index_list))[0], pixel_span(max(index_list))[1]
    return (first + last) // 2


def static_windows(latent_count: int, context_length: int, context_overlap: int) -> list[list[int]]:
    """The windows of core's "standard_static" schedule (latent indices), from core's own function."""
    settings = SimpleNamespace(context_length=context_length, context_overlap=context_overlap)
    return cw.create_windows_static_standard(latent_count, settings, {})


def segment_spans(frame_count: int, segment_frames: int = 0, centres: list[int] | None = None) -> list[tuple[int, int]]:
    """Inclusive pixel-frame spans that cover frames 0 .. frame_count - 1 in order.

    segment_frames > 0: fixed lengths from frame 0 (the last one shorter). Otherwise one segment
    per centre frame (ascending): the frames nearer to it than to its neighbours' (a tie goes to
    the earlier segment).
    """
    if segment_frames > 0:
        return [(s, min(s + segment_frames, frame_count) - 1) for s in range(0, frame_count, segment_frames)]
    starts = [0] + [(a + b) // 2 + 1 for a, b in pairwise(centres)]
    ends = [s - 1 for s in starts[1:]] + [frame_count - 1]
    return list(zip(starts, ends))


def segment_of_frame(spans: list[tuple[int, int]], frame: int) -> int:
    """Index of the span holding `frame`."""
    for index, (first, last) in enumerate(spans):
        if first <= frame <= last:
            return index
    raise VideoWindowsError(
        f"Video frame {frame} lies in no audio segment (they cover frames {spans[0][0]} to {spans[-1][1]}): the video "
        "is longer than the audio timeline. Set the video length to the timeline's frame_count.")


def window_segments(windows: list[list[int]], spans: list[tuple[int, int]]) -> list[int]:
    """For each context window (latent indices), the segment that holds its centre frame."""
    return [segment_of_frame(spans, window_centre_frame(w)) for w in windows]


def segment_vectors(vectors: dict[str, torch.Tensor], weights: torch.Tensor, spans) -> tuple[dict, torch.Tensor]:
    """Mean vector ({key: [K, D]}) and mean word weight ([K]) of each span's frames."""
    means = {key: torch.stack([rows[a:b + 1].mean(dim=0) for a, b in spans]) for key, rows in vectors.items()}
    return means, torch.stack([weights[a:b + 1].float().mean() for a, b in spans])


# ---- the conditioning ----

class NeedsVideoWindows(comfy.conds.CONDConstant):
    """Model cond on every tagged entry: reaching the model means no AudioTokenContextHandler chose
    between the segments, so ComfyUI would average them over the whole clip."""

    def process_cond(self, batch_size, **kwargs):
        raise VideoWindowsError(
            f"This positive conditioning from '{NODE_NAME}' holds one entry per time segment of the audio; only "
            "that node's MODEL output knows which segment each context window hears. Connect that MODEL output "
            "to the sampler (and put no other context-windows node after it); otherwise every segment would be "
            "averaged over the whole video.")


def tag_segments(conditioning: list, spans) -> list:
    """One CONDITIONING entry per segment (row k of the batched encode), tagged and guarded."""
    count = len(spans)
    tagged = []
    for k, (first, last) in enumerate(spans):
        for cond, extras in conditioning:
            row = {name: value[k:k + 1] if torch.is_tensor(value) and value.shape[:1] == (count,) else value
                   for name, value in extras.items()}
            row[SPAN_KEY] = (int(first), int(last))
            row["model_conds"] = {**row.get("model_conds", {}), GUARD_KEY: NeedsVideoWindows(True)}
            tagged.append([cond[k:k + 1], row])
    return tagged


def _tagged_spans(conds) -> list[tuple[int, int]]:
    return sorted({c[SPAN_KEY] for entries in conds if entries for c in entries if SPAN_KEY in c})


def _unguarded(entry: dict) -> dict:
    entry = dict(entry)
    entry["model_conds"] = {k: v for k, v in entry["model_conds"].items() if k != GUARD_KEY}
    return entry


class AudioTokenContextHandler(cw.IndexListContextHandler):
    """Core's context handler, except that tagged entries are chosen per window by time."""

    def should_use_context(self, model, conds, x_in, timestep, model_options) -> bool:
        spans = _tagged_spans(conds)
        if not spans:
            return super().should_use_context(model, conds, x_in, timestep, model_options)
        frame_count = spans[-1][1] + 1
        have, want = int(x_in.size(self.dim)), latent_frames(frame_count)
        if have != want:
            raise VideoWindowsError(
                f"The video latent has {have} frames ({(have - 1) * TIME_COMPRESSION + 1} video frames) but the audio "
                f"timeline has {frame_count} frames ({want} latent frames). Set the video length (e.g. "
                f"EmptyHunyuanLatentVideo's length) to the timeline's frame_count, {frame_count}.")
        if len(spans) > 1 and have <= self.context_length:
            raise VideoWindowsError(
                f"The whole video ({have} latent frames) fits in one context window of {self.context_length}, so its "
                f"{len(spans)} audio segments cannot each get a window. Lower context_length on '{NODE_NAME}'.")
        return True

    def get_resized_cond(self, cond_in, x_in, window, device=None):
        if cond_in is not None and any(SPAN_KEY in c for c in cond_in):
            cond_in = self.entries_for_window(cond_in, window.index_list)
        return super().get_resized_cond(cond_in, x_in, window, device)

    @staticmethod
    def entries_for_window(cond_in: list[dict], index_list) -> list[dict]:
        """The untagged entries, and the tagged ones whose segment holds the window's centre frame."""
        centre = window_centre_frame(index_list)
        chosen = [c for c in cond_in if SPAN_KEY in c and c[SPAN_KEY][0] <= centre <= c[SPAN_KEY][1]]
        spans = {c[SPAN_KEY] for c in chosen}
        if len(spans) != 1:
            raise VideoWindowsError(
                f"The context window of latent frames {min(index_list)}-{max(index_list)} (centre: video frame {centre}) "
                f"lies in {len(spans)} audio segments {sorted(spans)} of the positive conditioning. Use the positive of "
                f"ONE '{NODE_NAME}' node, not several combined.")
        return [c for c in cond_in if SPAN_KEY not in c] + [_unguarded(c) for c in chosen]


def windows_model(model, context_length: int, context_overlap: int, context_schedule: str, context_stride: int,
                  fuse_method: str):
    """A clone of `model` whose sampling uses AudioTokenContextHandler (latent-frame settings)."""
    model = model.clone()
    model.model_options["context_handler"] = AudioTokenContextHandler(
        context_schedule=cw.get_matching_context_schedule(context_schedule),
        fuse_method=cw.get_matching_fuse_method(fuse_method),
        context_length=context_length, context_overlap=context_overlap, context_stride=context_stride,
        closed_loop=False, dim=WAN_DIM)
    cw.create_prepare_sampling_wrapper(model)  # memory estimate for one window, as core's node does
    return model


def _require_wan(model) -> None:
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    if not isinstance(latent_format, comfy.latent_formats.Wan21):
        raise VideoWindowsError(
            f"'{NODE_NAME}' is for Wan 2.x video models, but this model's latents are "
            f"{type(latent_format).__name__}. Load a Wan 2.x model (Load Diffusion Model) and its umT5 CLIP.")


def video_windows(model, clip, timeline, text: str, placeholder: str, context_length: int, context_overlap: int,
                  context_schedule: str = SCHEDULES[0], context_stride: int = 1, fuse_method: str = "pyramid",
                  segment_frames: int = 0):
    """(MODEL with the handler, positive CONDITIONING with one tagged entry per segment)."""
    require_prompt(text, placeholder)
    _require_wan(model)
    if context_schedule not in SCHEDULES:
        raise VideoWindowsError(f"context_schedule '{context_schedule}' has no single time per window: use one of {SCHEDULES}.")
    length, overlap = latent_frames(context_length), latent_overlap(context_overlap)
    if overlap >= length:
        raise VideoWindowsError(
            f"context_overlap {context_overlap} ({overlap} latent frames) must be shorter than context_length "
            f"{context_length} ({length} latent frames): lower the overlap.")
    frame_count = timeline.frame_count
    latents = latent_frames(frame_count)
    if latents <= length:
        raise VideoWindowsError(
            f"The audio timeline has {frame_count} frames ({latents} latent frames), no longer than one context window "
            f"of {context_length} frames ({length} latent frames): there is nothing to split. Lower context_length, "
            "lengthen the timeline, or give a clip this short one conditioning ('AudioToken Encode' over its audio).")
    centres = [window_centre_frame(w) for w in static_windows(latents, length, overlap)]
    spans = segment_spans(frame_count, segment_frames, centres)
    vectors, weights = segment_vectors(timeline.embedding.vectors, timeline.weights, spans)
    what = f"Audio timeline '{timeline.embedding.source}'" if timeline.embedding.source else "The audio timeline"
    conditioning = encode_with_vectors(clip, text, placeholder, vectors, what, row_weights=weights)
    return (windows_model(model, length, overlap, context_schedule, context_stride, fuse_method),
            tag_segments(conditioning, spans))


class AudioTokenVideoWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenVideoWindows",
            display_name=NODE_NAME,
            category=VIDEO_CATEGORY,
            description="Wan 2.x sound -> video: samples the video in context windows (as 'WAN Context Windows') and "
                        "gives each window the prompt with the audio of its own time span, so each part of the clip "
                        "hears its own part of the sound. Use BOTH outputs: the MODEL and the positive belong together.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.x video model."),
                io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                TIMELINE.Input("timeline", tooltip="From 'AudioToken Audio Timeline (frames)': one audio vector per "
                                                   "video frame. Set the video length to its frame_count."),
                *_prompt_inputs(),
                io.Int.Input("context_length", default=81, min=5, max=4097, step=4,
                             tooltip="Frames per context window (Wan: 4n + 1; 81 = 21 latent frames)."),
                io.Int.Input("context_overlap", default=30, min=0, max=4096,
                             tooltip="Frames shared by neighbouring windows (divided by 4 for the latents)."),
                io.Combo.Input("context_schedule", options=SCHEDULES, default=SCHEDULES[0],
                               tooltip="How windows are laid out. standard_static: the same windows every step, each "
                                       "hears exactly its own segment; standard_uniform shifts them per step; batched: "
                                       "no overlap."),
                io.Int.Input("context_stride", default=1, min=1, max=16,
                             tooltip="Stride of the context windows; only used by standard_uniform."),
                io.Combo.Input("fuse_method", options=cw.ContextFuseMethods.LIST_STATIC,
                               default=cw.ContextFuseMethods.PYRAMID,
                               tooltip="How overlapping windows are blended."),
                io.Int.Input("segment_frames", default=0, min=0, max=100000,
                             tooltip="Frames per audio segment. 0 = one segment per window of the standard_static "
                                     "layout (the frames nearest its centre). Each window hears the segment that "
                                     "holds its centre frame."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with audio-aware context windows: connect "
                                                              "it to the sampler together with this node's positive."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="One entry per audio segment, tagged with its frame span. Only works "
                                               "with this node's model (refuses to run otherwise)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, placeholder=None):
        return AudioTokenConditioning.validate_inputs(placeholder=placeholder)

    @classmethod
    def execute(cls, model, clip, timeline, text, placeholder, context_length, context_overlap, context_schedule,
                context_stride, fuse_method, segment_frames) -> io.NodeOutput:
        return io.NodeOutput(*video_windows(model, clip, timeline, text, placeholder, context_length, context_overlap,
                                            context_schedule, context_stride, fuse_method, segment_frames))


NODES = [AudioTokenVideoWindows]
