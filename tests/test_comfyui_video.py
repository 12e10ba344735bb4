"""A real video file with its sound, written by a REAL ComfyUI server (0.3.75) and read back with PyAV.

The graph is the one the music-video workflow wires: LoadAudio -> AudioToken Audio Timeline (a span that starts
1 s into the recording) -> Frame Conditioning -> Sample Frames -> VAE Decode -> CreateVideo (fps and audio from the
timeline) -> SaveVideo, on the small SD1.5 checkpoint of tests/comfy_fixtures.py. The recording has a known event:
silence from 0.7 s, then noise from 1.5 s; in the written file that onset must sound 0.5 s in, the audio track must
last exactly as long as the frames, and the video stream must hold one frame per timeline frame at its rate.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from audio_files import write_wav
from comfy_fixtures import BEATS, CKPT, TOKEN_SD15

from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui

RATE = 44100  # an AAC rate (the file keeps the recording's rate)
AUDIO = "video_offset_noise.wav"
START, LENGTH, FPS = 1.0, 0.75, 8.0
ONSET = 1.5  # recording time of the event: noise after silence
AAC_FRAME = 1024  # samples per AAC frame


def _recording() -> np.ndarray:
    """3 s mono: a noise burst [0.2, 0.7) s (heard only if the cut ignored the start), silence, noise from ONSET."""
    rng = np.random.default_rng(7)
    x = np.zeros(3 * RATE, np.float32)
    for a, b in ((0.2, 0.7), (ONSET, 3.0)):
        x[round(a * RATE):round(b * RATE)] = np.clip(0.3 * rng.standard_normal(round(b * RATE) - round(a * RATE)), -1, 1)
    return x


@pytest.fixture(scope="module")
def offset_audio(comfy):
    write_wav(comfy.base / "input" / AUDIO, _recording(), RATE)
    return AUDIO


def _graph(audio: str, object_info: dict) -> dict:
    save = {"video": ["video", 0], "filename_prefix": "video/audiotoken_offset", "format": "auto"}
    if "codec" in object_info["SaveVideo"]["input"]["required"]:  # 0.3.75; newer ComfyUI nests it under format
        save["codec"] = "auto"
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "audio": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
        "tok": {"class_type": "AudioTokenLoader",
                "inputs": {"audiotoken_name": TOKEN_SD15, "audio_encoder": ["enc", 0], "pooling": "deterministic"}},
        "timeline": {"class_type": "AudioTokenTimeline",
                     "inputs": {"audio": ["audio", 0], "audiotoken": ["tok", 0], "fps": FPS, "window_seconds": 1.0,
                                "windows": "centred on each frame", "hop_seconds": 1.0, "interpolation": "linear",
                                "smoothing_seconds": 0.0, "onset_weight": 0.0, "start_seconds": START,
                                "length_seconds": LENGTH, "channels": "mix", "max_frames": 2400}},
        "cond": {"class_type": "AudioTokenFrameConditioning",
                 "inputs": {"clip": ["ckpt", 1], "timeline": ["timeline", 0], "text": "a photo of <audio>",
                            "placeholder": "<audio>"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "frames": {"class_type": "AudioTokenSampleFrames",
                   "inputs": {"model": ["ckpt", 0], "positive": ["cond", 0], "negative": ["neg", 0],
                              "latent_image": ["latent", 0], "seed": 3, "steps": 2, "cfg": 7.5,
                              "sampler_name": "euler", "scheduler": "normal", "noise": "same for every frame",
                              "noise_period_frames": 24, "chain_denoise": 1.0, "frames_per_batch": 8}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["frames", 0], "vae": ["ckpt", 2]}},
        "video": {"class_type": "CreateVideo",
                  "inputs": {"images": ["decode", 0], "fps": ["timeline", 2], "audio": ["timeline", 3]}},
        "save": {"class_type": "SaveVideo", "inputs": save},
    }


def _decoded_audio(path) -> tuple[np.ndarray, int, float]:
    """(mono samples placed by their pts, sample rate, the stream's duration in seconds). PyAV's decoder drops the
    encoder's priming samples (the file's edit list), so sample 0 is time 0 of the track."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.sample_rate
        duration = float(stream.duration * stream.time_base)
        pieces = []
        for frame in container.decode(stream):
            data = frame.to_ndarray()
            channels = len(frame.layout.channels)
            data = data.reshape(channels, -1) if frame.format.is_planar else data.reshape(-1, channels).T
            pieces.append((round(frame.pts * frame.time_base * rate), data.mean(0)))
    out = np.zeros(max(p + len(d) for p, d in pieces), np.float32)
    for position, data in pieces:
        out[position:position + len(data)] = data
    return out, rate, duration


def _onset_seconds(x: np.ndarray, rate: int) -> float:
    """First time the 1 ms RMS envelope reaches a quarter of the noise's level (the median over the last part)."""
    width = rate // 1000
    envelope = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(width) / width, "same"))
    level = np.median(envelope[len(x) * 3 // 4:])
    assert level > 0.05, f"no noise in the track's end (RMS {level:.4f}): the cut missed the event"
    return float(np.argmax(envelope > level / 4)) / rate


def test_independent_onset_measure_finds_the_event_in_the_source():
    source = _recording()[round(START * RATE):round((START + LENGTH) * RATE)]
    assert _onset_seconds(source, RATE) == pytest.approx(ONSET - START, abs=1e-3)


def test_music_video_graph_writes_an_mp4_with_the_sound_of_the_frames_span(comfy, offset_audio):
    entry = comfy.run(_graph(offset_audio, comfy.get("/object_info")), timeout=600)
    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    frame_count = int(LENGTH * FPS)  # 6: the span holds exactly six 1/8 s frames
    shown = entry["outputs"]["timeline"]["audiotoken_timeline"][0]
    assert shown["frame_count"] == frame_count and shown["fps"] == FPS and shown["start_seconds"] == START
    saved = entry["outputs"]["save"]["images"]
    assert len(saved) == 1 and saved[0]["filename"].endswith(".mp4"), saved
    path = comfy.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]

    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        video = container.streams.video[0]
        assert video.average_rate == Fraction(8)
        assert (video.width, video.height) == (64, 64)
        times = [float(f.pts * f.time_base) for f in container.decode(video)]
    assert times == pytest.approx([i / FPS for i in range(frame_count)], abs=1e-3)

    samples, rate, duration = _decoded_audio(path)
    assert rate == RATE  # the recording's own rate
    span = frame_count / FPS
    assert abs(duration - span) <= AAC_FRAME / rate, (duration, span)
    assert abs(len(samples) / rate - span) <= AAC_FRAME / rate, (len(samples) / rate, span)
    # the event 1.5 s into the recording sounds 0.5 s into the video (its span starts 1.0 s in)
    assert _onset_seconds(samples[:round(span * rate)], rate) == pytest.approx(ONSET - START, abs=0.01)
