"""nodes/comfy_backend.py: the training backend on real ComfyUI models, in-process, no server.

SD1.5: a tiny SD1.5-shaped checkpoint (real CLIP-L and VAE shapes, one UNet level) written to
disk and loaded by ComfyUI's own `load_checkpoint_guess_config` under `torch.inference_mode()`,
as the checkpoint-loader node does (so its weights are inference tensors). SD2 (v-prediction)
and SDXL: small models of ComfyUI's own classes (`supported_models.SD20 / SDXL`, `comfy.sd.CLIP`)
built under inference mode. Independent references: the DDPM forward process written out with
alphas_cumprod and the raw UNet (`diffusion_model`) output, and the inference splice path.
"""
from __future__ import annotations

import math

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import comfy.model_base  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from audiotoken.nodes.comfy_backend import BackendError, ComfyBackend  # noqa: E402
from audiotoken.nodes.splice import PromptError, encode_with_vectors  # noqa: E402

PH = "<audio>"
PROMPT = f"a photo of {PH}"
ATOL = 1e-5


# -- models --------------------------------------------------------------------------------

def _write_tiny_sd15(path):
    """write_placeholder_sd15, with the UNet's GroupNorm scales set to 1.

    tools/placeholder_sd.py zeroes every 1-D weight whose name lacks "norm"; the UNet's
    GroupNorms are named `in_layers.0` / `out_layers.0` / `out.0`, so its output is identically
    zero and does not depend on the conditioning. Fixed here so gradients have a path.
    """
    from safetensors.torch import load_file, save_file

    from tools.placeholder_sd import write_placeholder_sd15

    write_placeholder_sd15(path)
    state = load_file(str(path))
    for key, value in state.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and value.dim() == 1 \
                and not value.any():
            state[key] = torch.ones_like(value)
    save_file(state, str(path))
    return path


def _snapshot(model, clip):
    """What the rest of a graph would get from the original MODEL and CLIP (inference mode)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog at night"))[0][0].clone()
        mm.load_models_gpu([model])
        sigma = model.get_model_object("model_sampling").sigma(torch.tensor([20.0, 700.0]))
        out = model.model.apply_model(x, sigma, c_crossattn=cond.expand(2, -1, -1)).clone()
    return cond, out


def _weights(module):
    return {n: (t.is_inference(), t.data_ptr()) for n, t in module.state_dict(keep_vars=True).items()}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = _write_tiny_sd15(tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    before = {"outputs": _snapshot(model, clip), "unet": _weights(model.model), "clip": _weights(clip.cond_stage_model)}
    return {"model": model, "clip": clip, "vae": vae, "before": before}


@pytest.fixture(scope="module")
def backend(sd15):
    with torch.inference_mode():  # as inside a node
        b = ComfyBackend(sd15["model"], sd15["clip"], sd15["vae"])
    yield b
    b.close()


def _init_module(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI layers are created with torch.empty: seeded values, norms at 1 (call in inference mode)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        is_norm = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, p in m.named_parameters(recurse=False):
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "logit_scale":
                continue
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                scale = 0.5 if isinstance(m, torch.nn.Embedding) else 1.0 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _text_config(width: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 4,
            "num_hidden_layers": 3, "vocab_size": 49408, "max_position_embeddings": 77}


SMALL = {  # family: (supported model, base-model class, text-encoder widths, model type, prediction)
    "sd1": (comfy.supported_models.SD15, comfy.model_base.BaseModel, {"l": 64}, comfy.model_base.ModelType.EPS),
    "sd2v": (comfy.supported_models.SD20, comfy.model_base.BaseModel, {"h": 80}, comfy.model_base.ModelType.V_PREDICTION),
    "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL, {"g": 96, "l": 64}, comfy.model_base.ModelType.EPS),
}


def _small_model(family: str):
    """(MODEL, CLIP) of ComfyUI's classes with small widths, built like a loader would (inference mode)."""
    cls, base_cls, widths, model_type = SMALL[family]
    adm = 96 + 6 * 256 if family == "sdxl" else None  # pooled clip_g + 6 size embeddings
    unet = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
            "context_dim": sum(widths.values()), "use_linear_in_transformer": family != "sd1", "adm_in_channels": adm,
            "use_temporal_resblock": False, "use_temporal_attention": False}
    if adm is not None:
        unet["num_classes"] = "sequential"
    with torch.inference_mode():
        config = cls(unet)
        config.unet_config.update(num_heads=-1, num_head_channels=16)
        base = base_cls(config, model_type=model_type)
        _init_module(base, seed=1)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
        options = {"dtype": torch.float32}
        for key, width in widths.items():
            options[f"clip_{key}_model_config"] = _text_config(width)
        clip = comfy.sd.CLIP(target=config.clip_target(), model_options=options)
        _init_module(clip.cond_stage_model, seed=2)
    return model, clip


@pytest.fixture(scope="module")
def small():
    """{family: (MODEL, CLIP, backend)} for the small SD1 / SD2-v / SDXL models."""
    out = {}
    for family in SMALL:
        model, clip = _small_model(family)
        with torch.inference_mode():
            out[family] = (model, clip, ComfyBackend(model, clip))
    yield out
    for _, _, b in out.values():
        b.close()


# -- references ----------------------------------------------------------------------------

def _alphas_cumprod() -> torch.Tensor:
    """SD's DDPM schedule: betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _reference_loss(model, latents, cross, timesteps, noise, prediction, y=None):
    """Forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps, the raw UNet output vs eps (or v)."""
    a = _alphas_cumprod()[timesteps].float().view(-1, 1, 1, 1)
    xt = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.inference_mode():
        kwargs = {"y": y} if y is not None else {}
        out = model.model.diffusion_model(xt, timesteps.float(), context=cross, **kwargs).float()
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    return (out - target).pow(2).mean(dim=(1, 2, 3))


def _vectors(widths: dict, batch: int, seed: int, grad: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(batch, w, generator=gen) * 0.3).requires_grad_(grad) for k, w in sorted(widths.items())}


def _assert_same_conditioning(got, want, atol=ATOL):
    assert len(got) == len(want) == 1
    torch.testing.assert_close(got[0][0].detach(), want[0][0], atol=atol, rtol=0)
    torch.testing.assert_close(got[0][1]["pooled_output"].detach(), want[0][1]["pooled_output"], atol=atol, rtol=0)


# -- SD1.5 from a checkpoint ---------------------------------------------------------------

def test_private_copies_are_trainable_and_separate(sd15, backend):
    model, clip = sd15["model"], sd15["clip"]
    assert next(model.model.parameters()).is_inference()  # the loader's weights: inference tensors
    assert backend.widths == {"l": 768} and backend.family == "SD1.x" and backend.prediction == "eps"
    assert backend.num_timesteps == 1000
    originals = {t.data_ptr() for t in list(model.model.state_dict().values()) + list(clip.cond_stage_model.state_dict().values())}
    for private in (backend._model, backend._clip.cond_stage_model):
        tensors = list(private.state_dict(keep_vars=True).values())
        assert tensors and not any(t.is_inference() for t in tensors)
        assert not any(t.requires_grad for t in tensors)
        assert not originals & {t.data_ptr() for t in tensors}
    assert backend._clip.cond_stage_model is not clip.cond_stage_model
    assert backend._model is not model.model


def test_encode_prompt_equals_inference_path_and_gradients_reach_the_vectors(sd15, backend):
    vectors = _vectors(backend.widths, batch=2, seed=6, grad=True)  # the Embedder's output: not inference
    with torch.inference_mode():
        want = encode_with_vectors(sd15["clip"], PROMPT, PH, {k: v.detach() for k, v in vectors.items()}, "test")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.inference_mode():  # the executor's mode: the backend leaves it for its graph
        cond = backend.encode_prompt(PROMPT, PH, vectors)
        loss = backend.diffusion_loss(latents, cond, torch.tensor([15, 640]), noise)
    _assert_same_conditioning(cond, want)
    assert loss.shape == (2,) and loss.requires_grad and not loss.is_inference()
    loss.sum().backward()
    grad = vectors["l"].grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=1) > 0).all()  # each item's vector gets its own gradient
    for private in (backend._model, backend._clip.cond_stage_model):
        assert all(p.grad is None for p in private.parameters())


def test_no_grad_is_respected(backend):
    vectors = _vectors(backend.widths, batch=1, seed=6, grad=True)
    with torch.no_grad():
        cond = backend.encode_prompt(PROMPT, PH, vectors)
    assert not cond[0][0].requires_grad


def test_diffusion_loss_equals_ddpm_eps_mse(sd15, backend):
    gen = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    cross = torch.randn(3, 77, 768, generator=gen)
    timesteps = torch.tensor([0, 500, 999])
    cond_tensor = cross.clone().requires_grad_()
    loss = backend.diffusion_loss(latents, [[cond_tensor, {"pooled_output": torch.zeros(3, 768)}]], timesteps, noise)
    want = _reference_loss(sd15["model"], latents, cross, timesteps, noise, "eps")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    assert cond_tensor.grad is not None and (cond_tensor.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_label_targets_are_mean_word_embeddings(sd15, backend):
    labels = ["dog barking", "Cat", "church bell ringing loudly"]
    got = backend.label_targets(labels)
    assert set(got) == {"l"} and got["l"].shape == (3, 768) and not got["l"].requires_grad
    tokenizer = sd15["clip"].tokenizer.clip_l.tokenizer  # the HF CLIP tokenizer itself
    table = sd15["clip"].cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    for row, label in zip(got["l"], labels):
        ids = tokenizer(label)["input_ids"][1:-1]  # without start / end
        assert len(ids) >= 1
        torch.testing.assert_close(row, table[ids].float().mean(dim=0), atol=1e-6, rtol=0)
    with pytest.raises(BackendError, match="no words"):
        backend.label_targets(["dog", "  "])


def test_encode_images(sd15, backend):
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(8))
    latents = backend.encode_images(images)
    assert latents.shape == (2, 4, 8, 6) and not latents.is_inference()
    with torch.inference_mode():
        want = sd15["vae"].encode(images.movedim(1, -1)) * 0.18215  # SD1.x latent scale
    torch.testing.assert_close(latents, want, atol=1e-5, rtol=1e-5)


def test_prompt_without_the_placeholder_is_a_clear_error(backend):
    with pytest.raises(PromptError, match="does not contain the placeholder"):
        backend.encode_prompt("a photo", PH, {"l": torch.zeros(1, 768)})


def test_mismatched_model_and_clip(sd15, small):
    with pytest.raises(BackendError, match="same checkpoint"):
        ComfyBackend(sd15["model"], small["sd2v"][1])


def test_lora_and_object_patches_are_used(sd15):
    """Weight patches (LoRA) are baked into the private UNet; a ModelSamplingDiscrete(v) object patch
    makes it a v model; the shared original module is unpatched again when ComfyUI next loads it."""
    model = sd15["model"]
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    base = model.model.state_dict()[key].clone()
    delta = torch.randn(base.shape, generator=torch.Generator().manual_seed(9)) * 0.01

    class ModelSamplingV(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    with torch.inference_mode():
        patched = model.clone()
        patched.add_patches({key: (delta,)}, 1.0)
        patched.add_object_patch("model_sampling", ModelSamplingV(model.model.model_config))
        b = ComfyBackend(patched, sd15["clip"])
    try:
        assert b.prediction == "v"
        torch.testing.assert_close(b._model.state_dict()[key], base + delta, atol=1e-6, rtol=0)
        gen = torch.Generator().manual_seed(10)
        latents, noise, cross = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen), \
            torch.randn(3, 77, 768, generator=gen)
        timesteps = torch.tensor([3, 250, 998])
        loss = b.diffusion_loss(latents, [[cross, {}]], timesteps, noise)
        with torch.inference_mode():
            mm.load_models_gpu([patched], force_full_load=True)  # the reference runs the patched weights
            want = _reference_loss(patched, latents, cross, timesteps, noise, "v")
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    finally:
        b.close()
    with torch.inference_mode():
        mm.load_models_gpu([model])
        torch.testing.assert_close(model.model.state_dict()[key], base, atol=0, rtol=0)


def test_close_releases_the_private_copies(sd15):
    """close() only drops references: the copies are freed at once and ComfyUI's memory manager forgets
    them by itself (its list keeps the originals, and no dead entries)."""
    import weakref

    with torch.inference_mode():
        b = ComfyBackend(sd15["model"], sd15["clip"])
    b.diffusion_loss(torch.randn(1, 4, 8, 8), b.encode_prompt(PROMPT, PH, _vectors(b.widths, 1, seed=1)),
                     torch.tensor([5]), torch.randn(1, 4, 8, 8))
    copies = [weakref.ref(m) for m in (b._unet_patcher, b._clip.patcher, b._model, b._clip.cond_stage_model)]
    assert all(any(m is p() for m in mm.loaded_models()) for p in copies[:2])
    others = [m for m in mm.loaded_models() if not any(m is p() for p in copies[:2])]
    with b:
        pass
    assert all(ref() is None for ref in copies)
    assert [id(m) for m in mm.loaded_models()] == [id(m) for m in others] and None not in mm.loaded_models()


def test_zz_originals_unchanged(sd15, backend):
    """Runs after the other SD1.5 tests (file order): the original MODEL / CLIP still give the same outputs,
    hold the same (inference) tensors, and work in inference mode."""
    backend.diffusion_loss(torch.randn(1, 4, 8, 8), backend.encode_prompt(PROMPT, PH, _vectors(backend.widths, 1, 2, True)),
                           torch.tensor([100]), torch.randn(1, 4, 8, 8)).sum().backward()
    cond, out = _snapshot(sd15["model"], sd15["clip"])
    want_cond, want_out = sd15["before"]["outputs"]
    assert torch.equal(cond, want_cond) and torch.equal(out, want_out)
    assert _weights(sd15["model"].model) == sd15["before"]["unet"]
    assert _weights(sd15["clip"].cond_stage_model) == sd15["before"]["clip"]


# -- small SD1 / SD2 (v-prediction) / SDXL models, in process ------------------------------

@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("batch_prompts", [True, False])
@pytest.mark.parametrize("text", [PROMPT, f"a (loud:1.3) {PH}, at night, " + "very " * 80 + f"sharp, {PH}"])
def test_small_encode_prompt_equals_inference_path(small, family, batch_prompts, text):
    """Prompt weights, two chunks, two placeholders, batched or per item: the inference conditioning."""
    _, clip, b = small[family]
    vectors = _vectors(b.widths, batch=3, seed=5)
    with torch.inference_mode():
        want = encode_with_vectors(clip, text, PH, vectors, "test")
    b.batch_prompts = batch_prompts
    try:
        got = b.encode_prompt(text, PH, vectors)
    finally:
        b.batch_prompts = True
    assert got[0][0].shape == want[0][0].shape and got[0][0].shape[0] == 3
    _assert_same_conditioning(got, want)  # cond and the per-item pooled output


@pytest.mark.parametrize("family", list(SMALL))
def test_small_models_loss_and_gradients(small, family):
    model, clip, b = small[family]
    expect = {"sd1": ({"l": 64}, "SD1.x", "eps"), "sd2v": ({"h": 80}, "SD2.x", "v"),
              "sdxl": ({"g": 96, "l": 64}, "SDXL", "eps")}[family]
    assert (b.widths, b.family, b.prediction) == expect
    text = f"a photo of {PH}, (high resolution:1.1)"
    vectors = _vectors(b.widths, batch=2, seed=11, grad=True)
    with torch.inference_mode():
        want = encode_with_vectors(clip, text, PH, {k: v.detach() for k, v in vectors.items()}, "test")
    gen = torch.Generator().manual_seed(12)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([40, 960])
    y = None
    if family == "sdxl":  # the UNet also reads the pooled output, through y
        with torch.inference_mode():
            y = model.model.encode_adm(pooled_output=want[0][1]["pooled_output"], width=64, height=64)
        cond = b.encode_prompt(text, PH, vectors)
        pooled_only = b.diffusion_loss(latents, [[cond[0][0].detach(), cond[0][1]]], timesteps, noise)
        assert torch.autograd.grad(pooled_only.sum(), vectors["g"])[0].abs().sum() > 0
    cond = b.encode_prompt(text, PH, vectors)
    loss = b.diffusion_loss(latents, cond, timesteps, noise)
    ref = _reference_loss(model, latents, want[0][0], timesteps, noise, b.prediction, y=y)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    for key, v in vectors.items():
        assert v.grad is not None and (v.grad.abs().sum(dim=1) > 0).all(), key
    targets = b.label_targets(["dog", "bird song"])
    assert {k: tuple(v.shape) for k, v in targets.items()} == {k: (2, w) for k, w in b.widths.items()}


def test_small_clip_skip_and_single_item(small):
    """CLIPSetLastLayer (clip skip) carries over; a batch of one takes the per-item path."""
    _, clip, _ = small["sd1"]
    skipped = clip.clone()
    skipped.clip_layer(-2)
    model = small["sd1"][0]
    with torch.inference_mode():
        b = ComfyBackend(model, skipped)
    try:
        for batch in (1, 2):
            vectors = _vectors(b.widths, batch=batch, seed=13)
            with torch.inference_mode():
                want = encode_with_vectors(skipped, PROMPT, PH, vectors, "test")
                plain = encode_with_vectors(clip, PROMPT, PH, vectors, "test")
            got = b.encode_prompt(PROMPT, PH, vectors)
            _assert_same_conditioning(got, want)
            assert not torch.allclose(got[0][0], plain[0][0], atol=1e-3)
    finally:
        b.close()


def test_small_gradient_checkpointing_gives_the_same_loss_and_gradients(small):
    model, clip, plain = small["sd1"]
    with torch.inference_mode():
        ckpt = ComfyBackend(model, clip, gradient_checkpointing=True)
    try:
        names = {type(m).__name__ for m in ckpt._model.diffusion_model.modules()}
        assert {"ResBlock_Checkpoint", "BasicTransformerBlock_Checkpoint"} <= names
        gen = torch.Generator().manual_seed(14)
        latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        results = []
        for b in (plain, ckpt):
            vectors = _vectors(b.widths, batch=2, seed=15, grad=True)
            loss = b.diffusion_loss(latents, b.encode_prompt(PROMPT, PH, vectors), torch.tensor([100, 800]), noise)
            loss.sum().backward()
            results.append((loss.detach(), vectors["l"].grad))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    finally:
        ckpt.close()


def test_closed_backend_is_freed_without_garbage_collection(small):
    import gc
    import weakref

    model, clip, _ = small["sdxl"]
    with torch.inference_mode():
        b = ComfyBackend(model, clip)
    b.diffusion_loss(torch.randn(1, 4, 8, 8), b.encode_prompt(PROMPT, PH, _vectors(b.widths, 1, seed=1)),
                     torch.tensor([5]), torch.randn(1, 4, 8, 8))
    refs = [weakref.ref(b._model), weakref.ref(b._clip.cond_stage_model), weakref.ref(b._unet_patcher)]
    gc.disable()
    try:
        b.close()
        del b
        assert all(r() is None for r in refs)  # no reference cycles keep the private copies alive
    finally:
        gc.enable()


def test_copies_moved_inside_inference_mode_are_repaired(small):
    """ComfyUI moves models inside inference mode (e.g. evicting ours while a VAE loads): the moved
    weights become inference tensors; the next step re-clones them instead of failing in backward."""
    _, _, b = small["sd1"]
    with torch.inference_mode():
        for private in (b._model, b._clip.cond_stage_model):
            private._apply(lambda t: t.clone())  # what Module.to does to a moved tensor
    assert next(b._model.parameters()).is_inference()
    vectors = _vectors(b.widths, batch=2, seed=16, grad=True)
    loss = b.diffusion_loss(torch.randn(2, 4, 8, 8), b.encode_prompt(PROMPT, PH, vectors), torch.tensor([1, 2]),
                            torch.randn(2, 4, 8, 8))
    loss.sum().backward()
    assert vectors["l"].grad.abs().sum() > 0
    for private in (b._model, b._clip.cond_stage_model):
        assert not any(t.is_inference() or t.requires_grad for t in private.state_dict(keep_vars=True).values())


def test_model_config_answering_none_for_missing_names_is_shared_not_copied(small, monkeypatch):
    """Newer ComfyUI (upstream 092ee8a5) gives the model config a __getattr__ that returns None for any
    missing name, so copy.deepcopy would call None as __setstate__: the private copy must share the config."""
    import comfy.supported_models_base

    model, clip, _ = small["sd1"]
    monkeypatch.setattr(comfy.supported_models_base.BASE, "__getattr__", lambda self, name: None, raising=False)
    with torch.inference_mode():
        b = ComfyBackend(model, clip)
    try:
        assert b._model.model_config is model.model.model_config
        assert b._model is not model.model
        loss = b.diffusion_loss(torch.randn(1, 4, 8, 8), b.encode_prompt(PROMPT, PH, _vectors(b.widths, 1, seed=1)),
                                torch.tensor([5]), torch.randn(1, 4, 8, 8))
        assert torch.isfinite(loss).all()
    finally:
        b.close()
