"""nodes/frame_nodes.py: per-frame conditioning, coherent frame noise and frame sampling, in-process.

Models: ComfyUI's own classes with tiny random weights -- an SD1.5-architecture UNet (eps and
v-prediction) with a narrow CLIP-L (tools/learn_world), and a Flux.1 DiT (flow) with the tiny
Flux CLIP-L + T5 (tools/placeholder_dit, tools/tiny_text_encoders). Independent references:
ComfyUI's KSampler path (`nodes.common_ksampler`, `comfy.sample.sample`), its noise
(`comfy.sample.prepare_noise`) and prompt weights written into the text.
"""
from __future__ import annotations

import math

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
from audiotoken.audiotoken_core.embedding import AudioEmbedding
from audiotoken.audiotoken_core.timeline import AudioTimeline
from audiotoken.nodes import frame_nodes as fn
from audiotoken.nodes.eval_generator import comfy_nodes
from audiotoken.nodes.splice import encode_with_vectors

PH = "<audio>"
STEPS = 3
SAME, VARYING = fn.NOISE_MODES


def timeline(vectors: dict[str, torch.Tensor], weights=None) -> AudioTimeline:
    frames = next(iter(vectors.values())).shape[0]
    return AudioTimeline(embedding=AudioEmbedding(vectors, source="test"), fps=12.0, start_seconds=0.0,
                         window_seconds=4.0, duration_seconds=frames / 12.0,
                         weights=None if weights is None else torch.as_tensor(weights, dtype=torch.float32))


def random_rows(widths: dict[str, int], frames: int, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(frames, w, generator=gen) * scale for k, w in sorted(widths.items())}


# -- models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    """{prediction: (MODEL, CLIP)}: SD1.5 architecture, eps and v."""
    from tools import learn_world as lw

    comfy, _ = lw._comfy()
    clip = lw._build_clip(comfy, seed=1)
    models = {}
    for prediction in ("eps", "v"):
        unet = lw._build_unet(comfy, channels=32, prediction=prediction, seed=2)
        models[prediction] = comfy.model_patcher.ModelPatcher(unet, mm.get_torch_device(), mm.unet_offload_device())
    return models, clip


@pytest.fixture(scope="module")
def flux():
    from tools.placeholder_dit import tiny_model
    from tools.tiny_text_encoders import tiny_clip

    return tiny_model("flux", context_dim=4096, pooled_dim=768, seed=3), tiny_clip("flux")


def sd_case(sd15, prediction: str, frames: int = 4):
    models, clip = sd15
    rows = random_rows({"l": 64}, frames, seed=11)
    positive = fn.AudioTokenFrameConditioning.execute(clip, timeline(rows), f"a photo of {PH}", PH).args[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return models[prediction], clip, rows, positive, negative, {"samples": torch.zeros(1, 4, 8, 8)}


def flux_case(flux, frames: int = 3):
    model, clip = flux
    rows = random_rows({"l": 768, "t5xxl": 4096}, frames, seed=12, scale=0.05)
    positive = fn.AudioTokenFrameConditioning.execute(clip, timeline(rows), f"a photo of {PH}", PH).args[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, rows, positive, negative, {"samples": torch.zeros(1, 4, 16, 16)}  # 4 ch: fixed to 16


def run(model, positive, negative, latent, **options):
    options = {"seed": 5, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", **options}
    return fn.sample_frames(model, positive, negative, latent, **options)


def assert_frames_close(got, want):
    """Equal up to fp32 rounding: a frame sampled in a batch of 3 and alone differ by about 1e-6 of
    the latents' scale (batched convolutions round differently; the random eps UNet gives |x| ~ 300)."""
    torch.testing.assert_close(got, want, atol=2e-6 * float(want.abs().max()) + 1e-6, rtol=0)


def swap_rows(conditioning, order):
    return [[cond[order], {k: v[order] if torch.is_tensor(v) and v.shape[0] == len(order) else v
                           for k, v in extras.items()}] for cond, extras in conditioning]


# -- noise -----------------------------------------------------------------------------------

def test_same_noise_is_comfyuis_noise_of_a_batch_of_one():
    noise = fn.frame_noise([4, 8, 8], range(5), seed=42, mode=SAME)
    want = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 42)
    assert noise.shape == (5, 4, 8, 8)
    assert all(torch.equal(noise[i], want[0]) for i in range(5))


def test_slowly_varying_noise_is_gaussian_smooth_and_batch_independent():
    period = 6
    frames = fn.frame_noise([4, 64, 64], range(13), seed=7, mode=VARYING, period=period)
    first = fn.frame_noise([4, 64, 64], [0], seed=7, mode=SAME)
    assert torch.equal(frames[0], first[0])  # keyframe 0 is the "same" noise
    for f in frames:  # every frame is N(0, 1) per element (16384 elements: std error about 0.008)
        assert abs(float(f.mean())) < 0.03 and abs(float(f.std()) - 1.0) < 0.03
    flat = frames.flatten(1)
    neighbour = [float(torch.corrcoef(flat[i:i + 2])[0, 1]) for i in range(12)]
    assert all(abs(c - math.cos(math.pi / (2 * period))) < 0.03 for c in neighbour), neighbour
    assert abs(float(torch.corrcoef(flat[[0, 6]])[0, 1])) < 0.03  # keyframes are independent
    half = frames[3].flatten()  # u = 1/2: cos(pi/4) of each keyframe
    want = math.cos(math.pi / 4) * (frames[0] + frames[6]).flatten()
    torch.testing.assert_close(half, want, atol=1e-6, rtol=0)
    some = fn.frame_noise([4, 64, 64], [12, 3, 7], seed=7, mode=VARYING, period=period)
    torch.testing.assert_close(some, frames[[12, 3, 7]], atol=0, rtol=0)


def test_frame_noise_node_for_sampler_custom_advanced():
    (noise,) = fn.AudioTokenFrameNoise.execute(9, VARYING, 4).args
    assert noise.seed == 9
    latent = {"samples": torch.zeros(6, 4, 8, 8, dtype=torch.float16)}
    out = noise.generate_noise(latent)
    assert out.shape == (6, 4, 8, 8) and out.dtype == torch.float16
    torch.testing.assert_close(out, fn.frame_noise([4, 8, 8], range(6), 9, VARYING, 4).half(), atol=0, rtol=0)
    picked = noise.generate_noise({"samples": torch.zeros(2, 4, 8, 8), "batch_index": [5, 2]})
    torch.testing.assert_close(picked, fn.frame_noise([4, 8, 8], [5, 2], 9, VARYING, 4), atol=0, rtol=0)
    same = fn.AudioTokenFrameNoise.execute(9, SAME, 4).args[0].generate_noise({"samples": torch.zeros(3, 4, 8, 8)})
    assert torch.equal(same[0], same[2])


@pytest.mark.parametrize("mode, period, message", [
    ("white", 4, "Unknown noise mode 'white'"), (VARYING, 0, "noise_period_frames is 0: set it to 1 or more")])
def test_bad_noise_options_are_refused(mode, period, message):
    with pytest.raises(fn.FrameError, match=message):
        fn.FrameNoise(1, mode, period)


# -- conditioning ----------------------------------------------------------------------------

def test_frame_conditioning_rows_and_weights(sd15):
    """One row per frame; frame weight w on '<audio>' encodes like the prompt '(<audio>:w)'."""
    _, clip = sd15
    rows = random_rows({"l": 64}, 3, seed=4)
    weights = [1.0, 1.5, 0.8]
    (got,) = fn.AudioTokenFrameConditioning.execute(clip, timeline(rows, weights), f"a photo of {PH}", PH).args
    cond, pooled = got[0][0], got[0][1]["pooled_output"]
    assert cond.shape == (3, 77, 64) and pooled.shape == (3, 64)
    for i, w in enumerate(weights):
        want = encode_with_vectors(clip, f"a photo of ({PH}:{w})", PH, {"l": rows["l"][i:i + 1]}, "test")
        torch.testing.assert_close(cond[i:i + 1], want[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled[i:i + 1], want[0][1]["pooled_output"], atol=1e-6, rtol=0)


def test_frame_conditioning_validates_the_placeholder():
    assert fn.AudioTokenFrameConditioning.validate_inputs(placeholder="<audio>") is True
    assert "contains spaces" in fn.AudioTokenFrameConditioning.validate_inputs(placeholder="<a b>")


def test_frame_conditioning_refuses_other_inputs(sd15):
    with pytest.raises(fn.FrameError, match="Expected an audio timeline"):
        fn.AudioTokenFrameConditioning.execute(sd15[1], {"l": torch.zeros(2, 64)}, f"a {PH}", PH)


# -- sampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sd15_frames_follow_their_own_rows(sd15, prediction):
    model, clip, rows, positive, negative, latent = sd_case(sd15, prediction)
    frames = run(model, positive, negative, latent, frames_per_batch=3)
    assert frames.shape == (4, 4, 8, 8)
    # frame 0 is ComfyUI's own KSampler on row 0 (the "same" noise is its batch-1 noise)
    row0 = [[positive[0][0][:1], {**positive[0][1], "pooled_output": positive[0][1]["pooled_output"][:1]}]]
    (want,) = comfy_nodes().common_ksampler(model, 5, STEPS, 2.0, "euler", "normal", row0, negative, latent)
    assert_frames_close(frames[:1], want["samples"])
    # frames_per_batch does not change the frames
    assert_frames_close(run(model, positive, negative, latent, frames_per_batch=1), frames)
    # swapped rows give swapped frames
    swapped = run(model, swap_rows(positive, [2, 0, 3, 1]), negative, latent, frames_per_batch=4)
    assert_frames_close(swapped, frames[[2, 0, 3, 1]])
    assert (frames[0] - frames[1]).abs().max() > 1e-3  # the rows differ, so the frames do
    # identical rows with the same noise: identical frames
    held = fn.AudioTokenFrameConditioning.execute(clip, timeline({"l": rows["l"][[1, 1, 1]]}), f"a photo of {PH}", PH).args[0]
    again = run(model, held, negative, latent, frames_per_batch=2)
    assert_frames_close(again[0], again[2])
    assert_frames_close(again[0], frames[1])


def test_sd15_chaining_starts_each_frame_from_the_previous(sd15):
    model, _, _, positive, negative, latent = sd_case(sd15, "eps", frames=3)
    frames = run(model, positive, negative, latent, chain_denoise=0.5, noise_mode=VARYING, noise_period=2)
    unchained = run(model, positive, negative, latent, noise_mode=VARYING, noise_period=2)
    assert_frames_close(frames[0], unchained[0])  # frame 0: from noise at denoise 1
    noise = fn.frame_noise([4, 8, 8], range(3), 5, VARYING, 2)
    for k in (1, 2):
        rows = fn.conditioning_rows(positive, k, k + 1, 3)
        want = comfy.sample.sample(model, noise[k:k + 1], STEPS, 2.0, "euler", "normal", rows, negative,
                                   frames[k - 1:k], denoise=0.5, seed=5)
        assert_frames_close(frames[k:k + 1], want)
    assert (frames[1] - unchained[1]).abs().max() > 1e-3


def test_flux_frames(flux):
    model, _, _, positive, negative, latent = flux_case(flux)
    frames = run(model, positive, negative, latent, cfg=1.0, frames_per_batch=2)
    assert frames.shape == (3, 16, 16, 16)  # the empty 4-channel latent became Flux's 16 channels
    assert_frames_close(run(model, positive, negative, latent, cfg=1.0, frames_per_batch=3), frames)
    swapped = run(model, swap_rows(positive, [1, 2, 0]), negative, latent, cfg=1.0, frames_per_batch=3)
    assert_frames_close(swapped, frames[[1, 2, 0]])
    assert (frames[0] - frames[1]).abs().max() > 1e-4
    chained = run(model, positive, negative, latent, cfg=1.0, chain_denoise=0.6)
    noise = fn.frame_noise([16, 16, 16], [1], 5, SAME)
    want = comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "normal", fn.conditioning_rows(positive, 1, 2, 3),
                               negative, chained[:1], denoise=0.6, seed=5)
    assert_frames_close(chained[1:2], want)


def test_sample_frames_node_returns_a_latent(sd15):
    model, _, _, positive, negative, latent = sd_case(sd15, "eps", frames=2)
    (out,) = fn.AudioTokenSampleFrames.execute(model, positive, negative, latent, 5, STEPS, 2.0, "euler", "normal",
                                               SAME, 24, 1.0, 8).args
    torch.testing.assert_close(out["samples"], run(model, positive, negative, latent), atol=0, rtol=0)


def test_mismatched_frame_counts_are_refused(sd15):
    model, _, _, positive, negative, _ = sd_case(sd15, "eps", frames=3)
    with pytest.raises(fn.FrameError, match=r"different frame counts \[2, 3\]"):
        run(model, positive, negative, {"samples": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(fn.FrameError, match="chain_denoise is 0.0"):
        run(model, positive, negative, {"samples": torch.zeros(1, 4, 8, 8)}, chain_denoise=0.0)
    with pytest.raises(fn.FrameError, match="frames_per_batch is 0"):
        run(model, positive, negative, {"samples": torch.zeros(1, 4, 8, 8)}, frames_per_batch=0)


def test_interrupt_stops_sampling(sd15, monkeypatch):
    model, _, _, positive, negative, latent = sd_case(sd15, "eps", frames=2)
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) > 2:
            raise mm.InterruptProcessingException()
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupted)
    with pytest.raises(mm.InterruptProcessingException):
        run(model, positive, negative, latent, frames_per_batch=1)
    assert len(calls) == 3  # checked before the batch and at every step
