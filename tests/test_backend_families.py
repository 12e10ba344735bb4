"""nodes/comfy_backend.py on the flow-matching families (Flux.1, SD3.x, Wan 2.x, Qwen-Image).

Models: the tiny CLIPs of tools/tiny_text_encoders.py (ComfyUI's own tokenizers and text
encoders: CLIP-L/G, T5-XXL, umT5, Qwen2.5-VL) and the tiny diffusion transformers of
tools/placeholder_dit.py (ComfyUI's own model classes), built once per module, under
inference mode as a loader node would. Independent references: the rectified-flow forward
process and the shifted schedules written out here, the raw diffusion transformer's
velocity (`diffusion_model(...)`, not `apply_model`), and central finite differences.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import comfy.model_base
import comfy.model_sampling
from audiotoken.nodes.comfy_backend import (
    BackendError,
    ComfyBackend,
    _blocks,
    _checkpoint,
    _enable_gradient_checkpointing,
    _make_text_encoder_autograd_safe,
)

from tools.placeholder_dit import tiny_model
from tools.tiny_text_encoders import tiny_clip

PH = "<audio>"
PROMPT = f"a photo of {PH}"
FAMILIES = ("flux", "sd3", "wan", "qwen_image")


def _widths(clip):
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    pooled = cond[0][1].get("pooled_output")
    return int(cond[0][0].shape[-1]), None if pooled is None else int(pooled.shape[-1])


@pytest.fixture(scope="module")
def built():
    """{family: (MODEL, CLIP, backend)}, built lazily, closed at the end."""
    cache = {}

    def get(family):
        if family not in cache:
            clip = tiny_clip(family)
            model = tiny_model(family, *_widths(clip), seed=1)
            with torch.inference_mode():  # as inside a node
                cache[family] = (model, clip, ComfyBackend(model, clip))
        return cache[family]

    yield get
    for _, _, backend in cache.values():
        backend.close()


def _latent_shape(backend, batch=2, size=8):
    fmt = backend._latent_format
    frames = (1,) if fmt.latent_dimensions == 3 else ()
    return (batch, fmt.latent_channels) + frames + (size, size)


def _vectors(widths, batch, seed, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(batch, w, generator=gen) * 0.3).requires_grad_(grad) for k, w in sorted(widths.items())}


# -- references ----------------------------------------------------------------------------

def _reference_sigma(ms, t: torch.Tensor) -> torch.Tensor:
    """u = (t + 1/2) / 1000 through the shifted schedule of the model, written out."""
    u = (t.double() + 0.5) / 1000.0
    if isinstance(ms, comfy.model_sampling.ModelSamplingFlux):  # exp(mu) / (exp(mu) + (1/u - 1))
        return (math.exp(ms.shift) / (math.exp(ms.shift) + (1.0 / u - 1.0))).float()
    return (ms.shift * u / (1.0 + (ms.shift - 1.0) * u)).float()  # SD3 / Wan "shift"


def _reference_flow_loss(model, latents, cond, timesteps, noise, guidance=3.5):
    """x_t = (1 - s) x0 + s eps; velocity target eps - x0; the raw transformer's output."""
    ms = model.model.model_sampling
    s = _reference_sigma(ms, timesteps)
    view = s.view((-1,) + (1,) * (latents.dim() - 1))
    xt = (1 - view) * latents + view * noise
    cross, extras = cond[0][0].detach(), cond[0][1]
    kwargs = {}
    if extras.get("pooled_output") is not None and isinstance(model.model, (comfy.model_base.Flux, comfy.model_base.SD3)):
        kwargs["y"] = extras["pooled_output"].detach()
    if isinstance(model.model, comfy.model_base.Flux):
        kwargs["guidance"] = torch.full((latents.shape[0],), float(guidance))
    timestep = s * float(getattr(ms, "multiplier", 1.0))  # what the transformer reads (Flux: sigma)
    with torch.inference_mode():
        velocity = model.model.diffusion_model(xt, timestep, context=cross, **kwargs).float()
    return (velocity - (noise - latents)).pow(2).mean(dim=tuple(range(1, latents.dim())))


# -- the flow objective ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_flow_loss_equals_the_independent_flow_target(built, family):
    model, _, backend = built(family)
    assert backend.prediction == "flow" and backend.num_timesteps == 1000
    gen = torch.Generator().manual_seed(3)
    shape = _latent_shape(backend)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    timesteps = torch.tensor([30, 870])
    vectors = _vectors(backend.widths, 2, seed=4)
    with torch.inference_mode():  # the executor's mode
        cond = backend.encode_prompt(PROMPT, PH, vectors)
        loss = backend.diffusion_loss(latents, cond, timesteps, noise)
    want = _reference_flow_loss(model, latents, cond, timesteps, noise)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss.detach(), want, rtol=2e-4, atol=1e-5)
    # the two samples' noise levels differ: their losses are not the same number
    assert not torch.allclose(loss[0], loss[1])


def test_flux_guidance_reaches_the_model(built):
    model, _, backend = built("flux")
    gen = torch.Generator().manual_seed(5)
    shape = _latent_shape(backend)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        cond = backend.encode_prompt(PROMPT, PH, _vectors(backend.widths, 2, seed=6))
        default = backend.diffusion_loss(latents, cond, t, noise)  # ComfyUI's Flux default: 3.5
        backend.guidance = 1.0
        try:
            low = backend.diffusion_loss(latents, cond, t, noise)
        finally:
            backend.guidance = None
    torch.testing.assert_close(default, _reference_flow_loss(model, latents, cond, t, noise, 3.5), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(low, _reference_flow_loss(model, latents, cond, t, noise, 1.0), rtol=2e-4, atol=1e-5)
    assert (default - low).abs().max() > 1e-4


def test_model_sampling_patch_shift_is_used(built):
    """A ModelSamplingSD3-style object patch on the MODEL (shift 3) sets the sigmas the loss uses."""
    _, clip, _ = built("wan")
    model = tiny_model("wan", *_widths(clip), seed=2)  # its own module: object patches are applied to it
    default = SimpleNamespace(shift=model.model.model_config.sampling_settings["shift"])  # Wan: 8
    patched = model.clone()
    ms = type("ModelSamplingAdvanced", (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST), {})()
    ms.set_parameters(shift=3.0, multiplier=1000)
    patched.add_object_patch("model_sampling", ms)
    t = torch.tensor([100, 600])
    with torch.inference_mode():
        plain, shifted = ComfyBackend(model, clip), ComfyBackend(patched, clip)
    try:
        torch.testing.assert_close(plain._sigmas(t), _reference_sigma(default, t))
        torch.testing.assert_close(shifted._sigmas(t), _reference_sigma(ms, t))
        assert (shifted._sigmas(t) < plain._sigmas(t)).all()  # shift 3 < 8: less noise at the same t
    finally:
        plain.close()
        shifted.close()


# -- gradients through T5 and an LLM ---------------------------------------------------------

@pytest.mark.parametrize("family, key", [("flux", "t5xxl"), ("qwen_image", "qwen25_7b")])
def test_gradient_through_the_text_encoder_matches_finite_differences(built, family, key):
    _, _, backend = built(family)
    gen = torch.Generator().manual_seed(7)
    shape = _latent_shape(backend, batch=1)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.tensor([400])
    base = _vectors(backend.widths, 1, seed=8)

    def loss_of(vector):
        vectors = dict(base, **{key: vector})
        return backend.diffusion_loss(latents, backend.encode_prompt(PROMPT, PH, vectors), t, noise).sum()

    v = base[key].clone().requires_grad_(True)
    loss_of(v).backward()
    grad = v.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = grad / grad.norm()
    h = 2e-3  # the tiny random T5 / Qwen are strongly curved along the gradient: small steps
    with torch.no_grad():
        slope = (loss_of(v.detach() + h * direction) - loss_of(v.detach() - h * direction)) / (2 * h)
    torch.testing.assert_close(slope, grad.norm(), rtol=1e-2, atol=0)


def test_text_encoder_layers_are_made_out_of_place(built):
    _, clip, backend = built("flux")
    private = {type(m).__name__ for m in backend._clip.cond_stage_model.modules()}
    assert {"_OutOfPlaceCLIPLayer", "_OutOfPlaceT5LayerSelfAttention", "_OutOfPlaceT5LayerFF"} <= private
    original = {type(m).__name__ for m in clip.cond_stage_model.modules()}
    assert "T5LayerFF" in original and not any(name.startswith("_OutOfPlace") for name in original)


def test_unknown_in_place_layer_class_is_refused_by_name():
    class ResidualInPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            x += self.lin(x)
            return x

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([ResidualInPlace()])

    with pytest.raises(BackendError, match="ResidualInPlace"):
        _make_text_encoder_autograd_safe(Encoder(), "This CLIP")


def test_checkpointing_gives_the_same_loss_and_gradients(built):
    """Text-encoder (umT5) and DiT (Wan) block checkpointing: same numbers, fewer saved activations."""
    model, clip, _ = built("wan")
    with torch.inference_mode():
        backend = ComfyBackend(model, clip)
    try:
        gen = torch.Generator().manual_seed(9)
        shape = _latent_shape(backend)
        latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        t = torch.tensor([200, 700])
        results = []
        for step in range(2):
            if step == 1:
                assert _checkpoint(_blocks(backend._clip.cond_stage_model, outermost=True)) > 0
                assert _enable_gradient_checkpointing(backend._model.diffusion_model) > 0
            vectors = _vectors(backend.widths, 2, seed=10, grad=True)
            loss = backend.diffusion_loss(latents, backend.encode_prompt(PROMPT, PH, vectors), t, noise)
            loss.sum().backward()
            results.append((loss.detach(), vectors["umt5xxl"].grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
    finally:
        backend.close()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_checkpointing_blocks_that_add_in_place_gives_the_same_gradients(built, family):
    """Flux's and MMDiT's blocks add residuals in place (`x += ...`): checkpointed, each pass works on
    copies of the block inputs, so the loss and the gradients equal the run without checkpointing."""
    model, clip, plain = built(family)
    with torch.inference_mode():
        ckpt = ComfyBackend(model, clip, gradient_checkpointing=True)
    try:
        assert any(type(m).__name__.endswith("_CheckpointCopies") for m in ckpt._model.diffusion_model.modules())
        gen = torch.Generator().manual_seed(21)
        shape = _latent_shape(plain)
        latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        results = []
        for backend in (plain, ckpt):
            vectors = _vectors(backend.widths, 2, seed=22, grad=True)
            loss = backend.diffusion_loss(latents, backend.encode_prompt(PROMPT, PH, vectors), torch.tensor([300, 800]),
                                          noise)
            loss.sum().backward()
            results.append((loss.detach(), {k: v.grad for k, v in vectors.items()}))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        for key, grad in results[0][1].items():
            assert grad.abs().max() > 0, key
            torch.testing.assert_close(results[1][1][key], grad, rtol=1e-4, atol=1e-6)
    finally:
        ckpt.close()


def test_bf16_autocast_with_fp32_vectors(built):
    _, _, backend = built("wan")  # umT5 (ComfyUI's T5 classes) and a DiT
    vectors = _vectors(backend.widths, 2, seed=11, grad=True)  # the Embedder's fp32 master weights' output
    shape = _latent_shape(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = backend.encode_prompt(PROMPT, PH, vectors)
        loss = backend.diffusion_loss(torch.randn(shape), cond, torch.tensor([100, 900]), torch.randn(shape))
    loss.sum().backward()
    for v in vectors.values():
        assert v.grad is not None and v.grad.dtype == torch.float32 and torch.isfinite(v.grad).all()
        assert v.grad.abs().sum() > 0


# -- latents, VAE, compatibility ----------------------------------------------------------------

def test_wan_takes_one_frame_video_latents_and_refuses_images(built):
    _, _, backend = built("wan")
    vectors = _vectors(backend.widths, 2, seed=12)
    with torch.no_grad():
        cond = backend.encode_prompt(PROMPT, PH, vectors)
        loss = backend.diffusion_loss(torch.randn(2, 16, 1, 8, 8), cond, torch.tensor([1, 2]), torch.randn(2, 16, 1, 8, 8))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(BackendError, match=r"5-D latents \[B, C, T, h, w\]"):
        backend.diffusion_loss(torch.randn(2, 16, 8, 8), cond, torch.tensor([1, 2]), torch.randn(2, 16, 8, 8))


class _VideoVAE:
    """A stand-in for ComfyUI's Wan 2.2 VAE: [N, H, W, 3] frames of ONE clip -> [1, 16, T', H/16, W/16]."""
    latent_dim = 3
    downscale_ratio = (lambda frames: max(0, (frames + 3) // 4), 16, 16)

    def __init__(self):
        self.calls = []

    def encode(self, pixels):
        self.calls.append(tuple(pixels.shape))
        frames = self.downscale_ratio[0](pixels.shape[0])
        cell = torch.nn.functional.avg_pool2d(pixels.mean(dim=(0, 3))[None, None], 16)[0, 0]  # identifies the image
        return cell.expand(1, 16, frames, *cell.shape).clone()


def test_video_vae_encodes_each_image_as_its_own_clip(built):
    model, clip, _ = built("wan")
    vae = _VideoVAE()
    with torch.inference_mode():
        backend = ComfyBackend(model, clip, vae)
    try:
        images = torch.stack([torch.full((3, 32, 64), v) for v in (0.1, 0.5, 0.9)])
        latents = backend.encode_images(images)
        assert vae.calls == [(1, 32, 64, 3)] * 3  # one call per image, never one 3-frame clip
        assert latents.shape == (3, 16, 1, 2, 4)
        want = model.model.process_latent_in(torch.stack([torch.full((16, 1, 2, 4), v) for v in (0.1, 0.5, 0.9)]))
        torch.testing.assert_close(latents, want)

        # width/height for the model's extra_conds come from the VAE's real ratio (16), not 8
        seen = {}
        real = backend._model.extra_conds

        def spy(**kwargs):
            seen.update(width=kwargs["width"], height=kwargs["height"])
            return real(**kwargs)
        backend._model.extra_conds = spy
        with torch.no_grad():
            cond = backend.encode_prompt(PROMPT, PH, _vectors(backend.widths, 1, seed=14))
            backend.diffusion_loss(torch.randn(1, 16, 1, 4, 6), cond, torch.tensor([5]), torch.randn(1, 16, 1, 4, 6))
        assert seen == {"width": 6 * 16, "height": 4 * 16}
    finally:
        backend.close()


def test_mismatched_model_and_clip_is_refused(built):
    flux_model, _, _ = built("flux")
    _, qwen_clip, _ = built("qwen_image")
    with pytest.raises(BackendError, match="reads 4096-wide text conditioning.*gives 112-wide.*same checkpoint"), \
            torch.inference_mode():
        ComfyBackend(flux_model, qwen_clip)


# -- training -----------------------------------------------------------------------------------

def test_trainer_steps_reduce_the_flux_loss_with_guidance(built, tmp_path, monkeypatch):
    from audiotoken_core.training.config import TrainConfig
    from audiotoken_core.training.trainer import Trainer, new_audiotoken

    _, _, backend = built("flux")
    backend.guidance = 2.0  # as ComfyBackend(..., guidance=2.0); the shared backend is restored below
    try:
        encoder = {"kind": "beats", "layers": [1, 2, 3], "hidden_size": 4, "sample_rate": 16000}
        token = new_audiotoken(backend.widths, encoder, seed=0, pooling_dropout=0.0)
        gen = torch.Generator().manual_seed(13)
        batch = {"features": torch.randn(2, 6, 12, generator=gen), "latents": torch.randn(_latent_shape(backend), generator=gen)}
        config = TrainConfig(steps=4, batch_size=2, base_lr=5e-3, scale_lr=False, lambda_l1=0.0, save_every=0,
                             keep_last=0, log_every=100)
        # A fixed batch with fixed draws: every step sees the same t and eps (those of samples 0 and 1).
        import audiotoken_core.training.trainer as trainer_module

        drawn = trainer_module.per_sample_timesteps_and_noise
        monkeypatch.setattr(trainer_module, "per_sample_timesteps_and_noise",
                            lambda latents, seed, first_sample, *rest: drawn(latents, seed, 0, *rest))
        summary = Trainer(config, backend, token, None, [batch], tmp_path).run()
        losses = [h["diffusion"] for h in summary.history]
        assert summary.status == "completed" and len(losses) == 4
        assert losses[-1] < losses[0] * 0.97, losses
    finally:
        backend.guidance = None


def test_bad_guidance_is_refused(built):
    model, clip, _ = built("wan")
    with pytest.raises(BackendError, match="guidance must be a number >= 0"):
        ComfyBackend(model, clip, guidance=-1.0)
