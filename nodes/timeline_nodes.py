"""The audio timeline node: a recording -> one AudioToken vector per video frame (+ the audio the frames show)."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..audiotoken_core.timeline import (
    INTERPOLATIONS,
    WINDOW_MODES,
    AudioTimeline,
    build_timeline,
)
from .audiotoken_nodes import (
    AUDIOTOKEN,
    CHANNEL_POLICIES,
    TIMELINE,
    VIDEO_CATEGORY,
    schema,
)
from .runtime import LoadedAudioToken

UI_WINDOW_STARTS = 512  # the frontend draws at most this many windows ...
UI_ONSETS = 2048  # ... and onsets (and beats)


def span_audio(audio: dict, start_seconds: float, seconds: float) -> dict:
    """The part of a ComfyUI AUDIO the frames show, at its own rate and channels: samples
    [round(start * rate), + round(seconds * rate)); a sample missing at the end (rounding) is silence."""
    waveform, rate = audio["waveform"], int(audio["sample_rate"])
    first, count = round(start_seconds * rate), round(seconds * rate)
    part = waveform[..., first:first + count]
    if part.shape[-1] < count:
        part = torch.nn.functional.pad(part, (0, count - part.shape[-1]))
    return {"waveform": part.contiguous().clone(), "sample_rate": rate}


def timeline_ui(timeline: AudioTimeline, windows: str) -> dict:
    """UI payload for web/js (the waveform's frame/window/onset timeline). `beats` and `tempo_bpm` are the
    beat mode's (empty and 0 in the other modes): the frontend draws the change boundaries of the mode in use."""
    return {"audiotoken_timeline": [{
        "fps": timeline.fps, "start_seconds": timeline.start_seconds, "frame_count": timeline.frame_count,
        "window_seconds": timeline.window_seconds, "windows": windows, "duration_seconds": timeline.duration_seconds,
        "window_starts": [float(s) for s in timeline.window_starts[:UI_WINDOW_STARTS]],
        "onsets": [float(o) for o in timeline.onsets[:UI_ONSETS]],
        "beats": [float(b) for b in timeline.beats[:UI_ONSETS]], "tempo_bpm": float(timeline.tempo_bpm),
    }]}


class AudioTokenTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenTimeline",
            display_name="AudioToken Audio Timeline (frames)",
            category=VIDEO_CATEGORY,
            description="Turns a recording into one AudioToken vector per video frame: each frame hears a window of the "
                        "sound around its time (or the vectors of windows every hop, blended between them, or a window "
                        "from each onset or each tracked beat, held until the next). Only the windows the frames need "
                        "are embedded, so a long file costs what its frames cost. Also gives the audio the frames show, "
                        "for CreateVideo.",
            inputs=[
                io.Audio.Input("audio", tooltip="One recording (any rate 8-192 kHz, any channels); a batch of several is refused."),
                AUDIOTOKEN.Input("audiotoken", tooltip="From 'Load AudioToken'."),
                io.Float.Input("fps", default=12.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frames per second of the video: one vector per frame."),
                io.Float.Input("window_seconds", default=4.0, min=0.5, max=60.0, step=0.5,
                               tooltip="How much sound each vector hears. Short windows follow the music closely; long ones change slowly."),
                io.Combo.Input("windows", options=list(WINDOW_MODES), default=WINDOW_MODES[0],
                               tooltip="'centred on each frame': a window around every frame's time. 'every hop': windows every "
                                       "hop_seconds, frames in between blend the two nearest (cheaper, smoother). 'from each onset': "
                                       "a window starting at each detected onset, held until the next (changes on every attack). "
                                       "'from each beat': the same from each tracked beat (tempo + beat tracker), so the "
                                       "picture changes on the beat, not on every attack."),
                io.Float.Input("hop_seconds", default=1.0, min=0.05, max=60.0, step=0.05,
                               tooltip="Distance between window starts for 'every hop' (ignored by the other modes)."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="linear",
                               tooltip="How 'every hop' blends two windows' vectors: linear, or slerp (turns the direction, keeps the length)."),
                io.Float.Input("smoothing_seconds", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Gaussian smoothing of the vectors over time (sigma in seconds); 0 = off."),
                io.Float.Input("onset_weight", default=0.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Raise the audio word's prompt weight on onsets: weight = 1 + onset_weight x onset strength (0..1) of the frame."),
                io.Float.Input("start_seconds", default=0.0, min=0.0, max=86400.0, step=0.1,
                               tooltip="Where the video starts in the recording, in seconds."),
                io.Float.Input("length_seconds", default=0.0, min=0.0, max=86400.0, step=0.1,
                               tooltip="How many seconds of the recording the video covers; 0 = to the end."),
                io.Combo.Input("channels", options=CHANNEL_POLICIES, default="mix",
                               tooltip="How to make mono for the token: 'mix' averages the channels; 'first' keeps channel 0. "
                                       "The audio output keeps all channels."),
                io.Int.Input("max_frames", default=2400, min=1, max=100000,
                             tooltip="Refuse a timeline with more frames than this (each frame is one image to generate)."),
            ],
            outputs=[
                TIMELINE.Output(display_name="timeline",
                                tooltip="One vector per frame, their prompt weights, onsets and window times: for 'AudioToken "
                                        "Frame Conditioning' or 'AudioToken Video Windows'."),
                io.Int.Output(display_name="frame_count", tooltip="Number of frames: the batch size of the frames to generate."),
                io.Float.Output(display_name="fps", tooltip="The frame rate, for CreateVideo."),
                io.Audio.Output(display_name="audio",
                                tooltip="The recording cut to the frames' span [start, start + frame_count / fps), all channels "
                                        "at its own rate: wire it to CreateVideo's audio."),
            ],
        )

    @classmethod
    def execute(cls, audio, audiotoken: LoadedAudioToken, fps, window_seconds, windows, hop_seconds, interpolation,
                smoothing_seconds, onset_weight, start_seconds, length_seconds, channels, max_frames) -> io.NodeOutput:
        waveform = audio["waveform"]
        if waveform.ndim == 3 and waveform.shape[0] != 1:
            raise ValueError(f"The audio is a batch of {waveform.shape[0]} recordings; a timeline is made from one "
                             "recording per timeline. Split the batch (or load one file) and build one timeline each.")
        timeline = build_timeline(waveform, audio["sample_rate"], audiotoken.embed_wave16, fps=fps,
                                  window_seconds=window_seconds, windows=windows, hop_seconds=hop_seconds,
                                  interpolation=interpolation, smoothing_seconds=smoothing_seconds,
                                  onset_weight=onset_weight, start_seconds=start_seconds, length_seconds=length_seconds,
                                  channel_policy=channels, max_frames=max_frames, source=audiotoken.name)
        clip = span_audio(audio, timeline.start_seconds, timeline.frame_count / timeline.fps)
        return io.NodeOutput(timeline, timeline.frame_count, timeline.fps, clip, ui=timeline_ui(timeline, windows))


NODES = [AudioTokenTimeline]
