"""nodes/video_windows.py: Wan context windows that each hear their own part of the audio.

Real ComfyUI sampling (comfy.sample.sample) of a tiny Wan 2.1 model (tools/placeholder_dit.py)
with a tiny umT5 CLIP (tools/tiny_text_encoders.py); a spy on the diffusion model's forward
records which context window each call sampled and which cross-attention context it got.
Known answers are written out by hand: a 33-frame timeline (9 latent frames) with
context_length 9 (3 latents) and overlap 4 (1 latent) gives the standard_static windows
[0-2], [2-4], [4-6], [6-8] with centre frames 4, 10, 18, 26 and the segments
[0-7], [8-14], [15-22], [23-32]. Runs on ComfyUI 0.3.75 and on current ComfyUI (COMFYUI_ROOT).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import comfy.context_windows as cw
import comfy.latent_formats
import comfy.sample
from audiotoken.audiotoken_core.embedding import AudioEmbedding
from audiotoken.audiotoken_core.timeline import AudioTimeline
from audiotoken.nodes import video_windows as vw
from audiotoken.nodes.splice import PromptError, encode_with_vectors

from tools.placeholder_dit import tiny_model
from tools.tiny_text_encoders import tiny_clip

PH = "<audio>"
PROMPT = f"a video of {PH}"
FRAMES = 33  # 9 latent frames
SPANS = [(0, 7), (8, 14), (15, 22), (23, 32)]
SEGMENT_OF_WINDOW = {0: 0, 2: 1, 4: 2, 6: 3}  # first latent of each standard_static window -> its segment
LATENT_SHAPE = (1, 16, 9, 4, 4)


def _timeline(frames: int, seed: int = 0) -> AudioTimeline:
    rows = torch.randn(frames, 4096, generator=torch.Generator().manual_seed(seed))
    return AudioTimeline(embedding=AudioEmbedding({"umt5xxl": rows}, source="test"), fps=16.0, start_seconds=0.0,
                         window_seconds=1.0, duration_seconds=frames / 16.0)


@pytest.fixture(scope="module")
def wan():
    clip = tiny_clip("wan")
    model = tiny_model("wan", 4096, seed=1)
    timeline = _timeline(FRAMES)
    with torch.inference_mode():  # as inside a node
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
        windowed, positive = vw.video_windows(model, clip, timeline, PROMPT, PH, context_length=9, context_overlap=4)
    return SimpleNamespace(clip=clip, model=model, timeline=timeline, negative=negative, windowed=windowed,
                           positive=positive)


class Spy:
    """Records (the context window's latent indices, latent frames given, context rows) per model call."""

    def __init__(self, model):
        self.module = model.model.diffusion_model
        self.calls = []

    def __enter__(self):
        forward = self.module.forward

        def spy(x, timestep, context, *args, transformer_options=None, **kwargs):
            transformer_options = transformer_options or {}
            window = transformer_options.get("context_window")
            self.calls.append((None if window is None else list(window.index_list), x.shape[2],
                               context.detach().clone()))
            return forward(x, timestep, context, *args, transformer_options=transformer_options, **kwargs)

        self.module.forward = spy
        return self

    def __exit__(self, *exc):
        del self.module.forward


def _sample(model, positive, negative, cfg=1.0, steps=2, latent_shape=LATENT_SHAPE):
    latent = torch.zeros(latent_shape)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=7)


# ---- frames, latents and segments: known answers ----

def test_wan_frame_rules():
    assert [vw.latent_frames(n) for n in (1, 4, 5, 8, 9, 33, 81, 84, 85)] == [1, 1, 2, 2, 3, 9, 21, 21, 22]
    assert [vw.latent_overlap(n) for n in (0, 3, 4, 30)] == [0, 0, 1, 7]
    assert [vw.pixel_span(j) for j in (0, 1, 2, 8)] == [(0, 0), (1, 4), (5, 8), (29, 32)]
    assert vw.window_centre_frame([0, 1, 2]) == 4  # frames 0..8
    assert vw.window_centre_frame([2, 3, 4]) == 10  # frames 5..16
    assert vw.window_centre_frame([6, 7, 8]) == 26  # frames 21..32


def test_segments_and_window_mapping():
    windows = vw.static_windows(9, 3, 1)
    assert windows == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    spans = vw.segment_spans(FRAMES, 0, [4, 10, 18, 26])
    assert spans == SPANS
    assert vw.window_segments(windows, spans) == [0, 1, 2, 3]
    # windows shifted as standard_uniform shifts them: centres 6 and 14 -> segments 0 and 1; the end window -> 3
    assert vw.window_segments([[1, 2, 3], [3, 4, 5], [6, 7, 8]], spans) == [0, 1, 3]
    assert vw.segment_spans(10, 4) == [(0, 3), (4, 7), (8, 9)]
    assert vw.window_segments([[0, 1], [1, 2]], vw.segment_spans(10, 4)) == [0, 1]  # centres 2 and 4


def test_segment_vectors_are_frame_means():
    rows = torch.arange(10.0).reshape(10, 1)
    means, weights = vw.segment_vectors({"k": rows}, torch.linspace(1, 2, 10), [(0, 3), (4, 9)])
    torch.testing.assert_close(means["k"], torch.tensor([[1.5], [6.5]]))
    torch.testing.assert_close(weights, torch.tensor([(1 + 4 / 3) / 2, (1 + 4 / 9 + 2) / 2]))


# ---- the node's outputs ----

def test_positive_has_one_tagged_entry_per_segment(wan):
    assert [e[1][vw.SPAN_KEY] for e in wan.positive] == SPANS
    means, _ = vw.segment_vectors(wan.timeline.embedding.vectors, wan.timeline.weights, SPANS)
    with torch.inference_mode():
        want = encode_with_vectors(wan.clip, PROMPT, PH, {"umt5xxl": means["umt5xxl"][2:3]}, "segment 2")
    torch.testing.assert_close(wan.positive[2][0], want[0][0])
    assert not torch.equal(wan.positive[1][0], wan.positive[2][0])
    handler = wan.windowed.model_options["context_handler"]
    assert isinstance(handler, cw.IndexListContextHandler)
    assert (handler.context_length, handler.context_overlap, handler.dim) == (3, 1, 2)
    assert "context_handler" not in wan.model.model_options  # the input model is untouched


def test_each_window_hears_the_segment_at_its_centre(wan):
    with Spy(wan.windowed) as spy:
        _sample(wan.windowed, wan.positive, wan.negative, cfg=1.0, steps=2)
    windows = [w for w, _, _ in spy.calls]
    assert windows == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]] * 2  # 4 windows per step
    for window, frames, context in spy.calls:
        start = window[0]
        assert frames in (3, 4)  # current ComfyUI adds one causal anchor frame before later windows
        want = wan.positive[SEGMENT_OF_WINDOW[start]][0]
        assert torch.equal(context, want), f"window {start} got the wrong segment"


def test_negative_passes_as_in_core(wan):
    """With CFG the untagged negative goes to every window unchanged, next to that window's segment."""
    with Spy(wan.windowed) as spy:
        _sample(wan.windowed, wan.positive, wan.negative, cfg=3.0, steps=1)
    rows_per_window = {}
    for window, _, context in spy.calls:
        rows_per_window.setdefault(window[0], []).extend(context.unbind(0))
    assert sorted(rows_per_window) == [0, 2, 4, 6]
    negative = wan.negative[0][0][0]
    for start, rows in rows_per_window.items():
        segment = wan.positive[SEGMENT_OF_WINDOW[start]][0][0]
        assert len(rows) == 2
        assert sum(torch.equal(r, negative) for r in rows) == 1
        assert sum(torch.equal(r, segment) for r in rows) == 1


def test_result_differs_from_one_averaged_conditioning(wan):
    ours = _sample(wan.windowed, wan.positive, wan.negative)
    mean = {"umt5xxl": wan.timeline.embedding.vectors["umt5xxl"].mean(dim=0, keepdim=True)}
    with torch.inference_mode():
        averaged = encode_with_vectors(wan.clip, PROMPT, PH, mean, "mean")
    core = wan.model.clone()
    core.model_options["context_handler"] = cw.IndexListContextHandler(
        context_schedule=cw.get_matching_context_schedule(vw.SCHEDULES[0]),
        fuse_method=cw.get_matching_fuse_method("pyramid"), context_length=3, context_overlap=1, dim=2)
    theirs = _sample(core, averaged, wan.negative)
    assert ours.shape == theirs.shape == LATENT_SHAPE
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() > 1e-3


# ---- refusals ----

def test_positive_without_its_model_refuses(wan):
    with pytest.raises(vw.VideoWindowsError, match="Connect that MODEL output"):
        _sample(wan.model, wan.positive, wan.negative, steps=1)
    core = wan.model.clone()  # core's context windows would average the segments too
    core.model_options["context_handler"] = cw.IndexListContextHandler(
        context_schedule=cw.get_matching_context_schedule(vw.SCHEDULES[0]),
        fuse_method=cw.get_matching_fuse_method("pyramid"), context_length=3, context_overlap=1, dim=2)
    with pytest.raises(vw.VideoWindowsError, match="Connect that MODEL output"):
        _sample(core, wan.positive, wan.negative, steps=1)


def test_latent_length_must_match_the_timeline(wan):
    with pytest.raises(vw.VideoWindowsError, match=r"latent has 8 frames .* length\) to the timeline's frame_count, 33"):
        _sample(wan.windowed, wan.positive, wan.negative, steps=1, latent_shape=(1, 16, 8, 4, 4))


def test_timeline_shorter_than_one_window_is_refused(wan):
    with pytest.raises(vw.VideoWindowsError, match="9 frames .* no longer than one context window of 9 frames"):
        vw.video_windows(wan.model, wan.clip, _timeline(9), PROMPT, PH, context_length=9, context_overlap=4)
    # 4n + 1: 12 frames are 3 latents, as many as a 9-frame (3-latent) window
    with pytest.raises(vw.VideoWindowsError, match="12 frames"):
        vw.video_windows(wan.model, wan.clip, _timeline(12), PROMPT, PH, context_length=11, context_overlap=4)


def test_bad_settings_and_inputs_are_refused(wan):
    with pytest.raises(vw.VideoWindowsError, match="must be shorter than context_length"):
        vw.video_windows(wan.model, wan.clip, wan.timeline, PROMPT, PH, context_length=9, context_overlap=12)
    with pytest.raises(vw.VideoWindowsError, match="has no single time per window"):
        vw.video_windows(wan.model, wan.clip, wan.timeline, PROMPT, PH, 9, 4, context_schedule="looped_uniform")
    sd15 = SimpleNamespace(model=SimpleNamespace(latent_format=comfy.latent_formats.SD15()))
    with pytest.raises(vw.VideoWindowsError, match="for Wan 2.x video models, but this model's latents are SD15"):
        vw.video_windows(sd15, wan.clip, wan.timeline, PROMPT, PH, 9, 4)
    with pytest.raises(PromptError, match="does not contain the placeholder"):
        vw.video_windows(wan.model, wan.clip, wan.timeline, "a video", PH, 9, 4)
    flux_clip = tiny_clip("flux")
    with pytest.raises(PromptError, match=r"umt5xxl.*Flux\.1 CLIP needs"):
        vw.video_windows(wan.model, flux_clip, wan.timeline, PROMPT, PH, 9, 4)


def test_fixed_segment_frames(wan):
    with torch.inference_mode():
        _, positive = vw.video_windows(wan.model, wan.clip, wan.timeline, PROMPT, PH, 9, 4, segment_frames=16)
    assert [e[1][vw.SPAN_KEY] for e in positive] == [(0, 15), (16, 31), (32, 32)]


def test_node_schema_and_execute(wan):
    node = vw.AudioTokenVideoWindows
    assert node in vw.NODES
    schema = node.define_schema()
    assert schema.display_name == "AudioToken Video Windows (Wan context windows)"
    assert schema.category == "audio/AudioToken/video" and len(schema.description) > 80
    ids = [i.id for i in schema.inputs]
    assert ids == ["model", "clip", "timeline", "text", "placeholder", "context_length", "context_overlap",
                   "context_schedule", "context_stride", "fuse_method", "segment_frames"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [o.display_name for o in schema.outputs] == ["model", "positive"]
    info = node.GET_NODE_INFO_V1()  # what ComfyUI serves to the frontend
    assert info["input"]["required"]["timeline"][0] == "AUDIOTOKEN_TIMELINE"
    assert info["input"]["required"]["context_length"][1]["default"] == 81
    assert info["output"] == ["MODEL", "CONDITIONING"]
    assert node.validate_inputs(placeholder="two words") == (
        "The placeholder 'two words' contains spaces: use one word such as <audio>.")
    with torch.inference_mode():
        model, positive = node.execute(model=wan.model, clip=wan.clip, timeline=wan.timeline, text=PROMPT,
                                       placeholder=PH, context_length=9, context_overlap=4,
                                       context_schedule="standard_static", context_stride=1,
                                       fuse_method="pyramid", segment_frames=0).result
    assert [e[1][vw.SPAN_KEY] for e in positive] == SPANS
    assert isinstance(model.model_options["context_handler"], vw.AudioTokenContextHandler)


def test_window_past_the_timeline_is_refused():
    with pytest.raises(vw.VideoWindowsError, match=r"Video frame 34 lies in no audio segment \(they cover frames 0 to 32\)"):
        vw.window_segments([[8, 9, 10]], SPANS)  # frames 29..40, centre 34: past the timeline


def test_shifting_windows_hear_the_segment_at_their_centre(wan):
    """standard_uniform moves the windows every step; each still gets the segment at its centre frame."""
    shifting = vw.windows_model(wan.model, 3, 1, "standard_uniform", 1, "pyramid")  # segments do not depend on it
    positive = wan.positive
    with Spy(shifting) as spy:
        _sample(shifting, positive, wan.negative, steps=2)
    for window, _, context in spy.calls:
        assert window == list(range(window[0], window[-1] + 1))  # a run of latent frames
        centre = (max(4 * window[0] - 3, 0) + 4 * window[-1]) // 2  # latent j shows frames 4j-3 .. 4j
        segment = next(k for k, (a, b) in enumerate(SPANS) if a <= centre <= b)
        assert torch.equal(context, positive[segment][0]), f"window {window} (centre {centre})"
    starts = [w[0] for w, _, _ in spy.calls]
    assert len(set(starts)) > 4, starts  # the second step's windows differ from the first's
