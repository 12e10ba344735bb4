"""The training backend for ComfyUI models: `ComfyBackend(model, clip, vae)`.

Implements the `DiffusionBackend` protocol of `audiotoken_core/training` (see
docs/architecture.md, "Training") with ComfyUI's own model code, for the MODEL / CLIP / VAE
outputs of ComfyUI's loaders: SD1.x, SD2.x (eps and v-prediction) and SDXL.

Why private copies. The executor runs every node under `torch.inference_mode()`, so the
weights of loaded models are inference tensors and autograd cannot save them for backward.
The backend therefore clones, once, the weights of the text encoder(s) and the UNet outside
inference mode (LoRA and other weight patches of the given ModelPatchers baked in, frozen:
`requires_grad=False`) into private modules, and hands those to ComfyUI's memory manager
through ModelPatchers of their own: `model_management.load_models_gpu` moves them to the
GPU and may evict the originals (or offload ours) like any other model. The original
MODEL and CLIP are never modified, so the rest of the graph sees them as before.

ComfyUI's `CLIPLayer.forward` adds its residuals in place (`x += ...`), which breaks
backpropagation to the input word embeddings; the layers of the private text-encoder copy
become a subclass with an out-of-place forward (ComfyUI's class itself is untouched).

Prompts go through `nodes/splice.py` (the same stand-in tokenization, vector entries and
batched encode as the inference node), so the training conditioning is the inference conditioning.
"""
from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict

import torch
import torch.utils.checkpoint

import comfy.clip_model
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import comfy.utils

from .splice import (
    PromptError,
    _concat_conditioning,
    _is_token_id,
    _put_vectors,
    _stand_in_tokens,
    encode_token_rows,
    clip_family,
    clip_widths,
)

log = logging.getLogger(__name__)

__all__ = ["ComfyBackend", "BackendError"]

# ModelPatcher writes these onto the model it manages; a private copy starts without them.
_PATCHER_MODEL_ATTRS = ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
                        "current_weight_patches_uuid", "model_offload_buffer_memory")
_PROMPT_CACHE_SIZE = 16


class BackendError(ValueError):
    """MODEL / CLIP / VAE (or inputs) that the training backend cannot use; the message says why."""


# -- private, trainable-graph copies --------------------------------------------------------

class _OutOfPlaceCLIPLayer(comfy.clip_model.CLIPLayer):
    """comfy.clip_model.CLIPLayer without the in-place residual adds (which break backward)."""

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))


def _check_clip_layer_class() -> None:
    params = list(inspect.signature(comfy.clip_model.CLIPLayer.forward).parameters)
    if params != ["self", "x", "mask", "optimized_attention"]:
        raise RuntimeError(
            f"This ComfyUI's CLIPLayer.forward{params[1:]} differs from the one AudioToken's training "
            "backend mirrors (x, mask, optimized_attention): update nodes/comfy_backend.py for it."
        )


def _make_clip_layers_out_of_place(module: torch.nn.Module, what: str) -> int:
    """Give the private copy's CLIP layers an out-of-place forward (by class: no reference cycles)."""
    _check_clip_layer_class()
    count = 0
    for layer in module.modules():
        if type(layer) is comfy.clip_model.CLIPLayer:
            layer.__class__ = _OutOfPlaceCLIPLayer
            count += 1
        elif isinstance(layer, comfy.clip_model.CLIPLayer) and not isinstance(layer, _OutOfPlaceCLIPLayer):
            raise BackendError(f"{what} uses a custom CLIP layer class ({type(layer).__name__}) that the training "
                               "backend cannot make autograd-safe.")
    if count == 0:
        raise BackendError(
            f"{what} has no ComfyUI CLIP text-transformer layers (comfy.clip_model.CLIPLayer); the training "
            "backend supports the CLIP text encoders of SD1.x, SD2.x and SDXL checkpoints."
        )
    return count


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(base: type) -> type:
    """One cached subclass of `base` whose forward recomputes its activations in backward."""
    if base not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                return base.forward(self, *args, **kwargs)
            # ComfyUI mutates transformer_options between blocks: recompute with this call's values.
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(base.forward, self, *args, use_reentrant=False, **kwargs)
        _CHECKPOINTED[base] = type(f"{base.__name__}_Checkpoint", (base,), {"forward": forward})
    return _CHECKPOINTED[base]


def _enable_gradient_checkpointing(unet: torch.nn.Module) -> int:
    """Checkpoint each ResBlock and transformer block of the private UNet copy."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    count = 0
    for m in unet.modules():
        if type(m) in (ResBlock, BasicTransformerBlock):
            m.__class__ = _checkpointed(type(m))
            count += 1
    return count


def _private_copy(patcher, what: str):
    """A frozen, autograd-usable copy of the patcher's model with its weight patches baked in,
    and a ModelPatcher of its own. The original patcher and module are left as they are."""
    # Load the original as ComfyUI would for sampling (inside inference mode, where its
    # weights live): this applies its weight patches (LoRA...) and object patches to the module.
    with torch.inference_mode():
        mm.load_models_gpu([patcher], force_full_load=True)
    src = patcher.model
    for name, obj in patcher.object_patches.items():
        if comfy.utils.get_attr(src, name) is not obj:
            raise RuntimeError(f"ComfyUI did not apply the object patch '{name}' of {what} on loading it.")
    device = patcher.offload_device
    memo: dict[int, object] = {}
    with torch.inference_mode(False), torch.no_grad():
        for m in src.modules():
            tensors = [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]
            tensors += [v for v in vars(m).values() if torch.is_tensor(v)]
            for t in tensors:
                if id(t) in memo:
                    continue
                clone = t.to(device=device, copy=True)  # outside inference mode: a normal tensor
                if isinstance(t, torch.nn.Parameter):
                    clone = torch.nn.Parameter(clone, requires_grad=False)
                memo[id(t)] = clone
            for value in vars(m).values():  # e.g. BaseModel.current_patcher: never copy a patcher
                if isinstance(value, comfy.model_patcher.ModelPatcher):
                    memo[id(value)] = None
                elif isinstance(value, comfy.supported_models_base.BASE):
                    # Shared, not copied: newer ComfyUI (092ee8a5, Dec 2025) gives it a __getattr__ answering None for any missing
                    # name (__deepcopy__, __setstate__...), which copy.deepcopy cannot reconstruct.
                    memo[id(value)] = value
        try:
            private = copy.deepcopy(src, memo)
        except Exception as e:
            raise BackendError(f"Could not make a training copy of {what} ({type(e).__name__}: {e}); models "
                               "wrapped by patches such as torch.compile cannot be trained through.") from e
    del memo
    for attr in _PATCHER_MODEL_ATTRS:
        private.__dict__.pop(attr, None)
    for m in private.modules():
        m.__dict__.pop("comfy_patched_weights", None)
        if "prev_comfy_cast_weights" in m.__dict__:
            m.comfy_cast_weights = m.__dict__.pop("prev_comfy_cast_weights")
        if hasattr(m, "weight_function"):
            m.weight_function = []
            m.bias_function = []
    if "current_patcher" in private.__dict__:
        private.current_patcher = None
    private.device = device
    private.eval()
    own = comfy.model_patcher.ModelPatcher(private, load_device=patcher.load_device, offload_device=device)
    # Weight wrappers are runtime weight functions (not baked): let our patcher re-add them on load.
    own.weight_wrapper_patches = {k: list(v) for k, v in getattr(patcher, "weight_wrapper_patches", {}).items()}
    return private, own


def _ensure_trainable(module: torch.nn.Module) -> None:
    """Re-clone any parameter/buffer that became an inference tensor (a move inside inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and t.is_inference():
                        clone = t.clone()
                        store[name] = torch.nn.Parameter(clone, requires_grad=False) if isinstance(
                            t, torch.nn.Parameter) else clone


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor usable in autograd (inputs made inside inference mode are inference tensors)."""
    return t.clone() if t.is_inference() else t


class _GradMode:
    """Leave inference mode (ComfyUI's executor runs nodes inside it) and record gradients,
    unless the caller turned gradients off outside inference mode (evaluation)."""

    def __enter__(self):
        want_grad = torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        self._inference = torch.inference_mode(False)
        self._grad = torch.set_grad_enabled(want_grad)
        self._inference.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._inference.__exit__(*exc)
        return False


# -- the backend ------------------------------------------------------------------------------

class ComfyBackend:
    """DiffusionBackend for ComfyUI MODEL / CLIP / VAE objects (SD1.x, SD2.x incl. v, SDXL).

    Attributes: `widths` ({text-encoder key: word-embedding width}), `prediction` ("eps" or
    "v"), `family` ("SD1.x" / "SD2.x" / "SDXL"), `device` (where losses are computed),
    `num_timesteps` (1000). Call `close()` (or use it as a context manager) to release the
    private copies early; otherwise they go with the object.

    `batch_prompts=True` encodes a batch of prompts the way the inference node does
    (`splice.encode_token_rows`: several rows per text-encoder pass, equal to encoding each row
    alone); False encodes each row alone.
    `gradient_checkpointing=True` recomputes the UNet's ResBlock / transformer-block activations
    in backward (less memory, about one more UNet forward per step). `memory_required` (bytes,
    default 0) asks ComfyUI to keep that much device memory free for activations when it loads
    the private copies (it unloads other models for it).
    """

    def __init__(self, model, clip, vae=None, *, batch_prompts: bool = True, gradient_checkpointing: bool = False):
        try:
            self.widths = clip_widths(clip)
            self.family = clip_family(self.widths)
        except PromptError as e:
            raise BackendError(str(e)) from None

        context_dim = model.model.model_config.unet_config.get("context_dim")
        cond_width = sum(self.widths.values())
        if context_dim is not None and int(context_dim) != cond_width:
            raise BackendError(
                f"This MODEL reads {context_dim}-wide text conditioning but the {self.family} CLIP gives "
                f"{cond_width}-wide conditioning: connect the MODEL and CLIP of the same checkpoint."
            )
        ms = model.get_model_object("model_sampling")
        self.prediction = self._prediction_type(ms)
        self.num_timesteps = int(len(ms.sigmas))

        _warn_unapplied_patches(model)
        self._vae = vae
        self.batch_prompts = batch_prompts
        self.memory_required = 0
        self._prompt_cache: OrderedDict = OrderedDict()

        # Private copies: text encoders first, then the UNet (each original is loaded on its
        # own, so at most one original sits next to its copy in memory at a time).
        csm, clip_patcher = _private_copy(clip.patcher, "the CLIP")
        _make_clip_layers_out_of_place(csm, "This CLIP")
        clip_patcher.is_clip = True
        clip_patcher.hook_mode = clip.patcher.hook_mode
        self._clip = clip.clone()
        self._clip.cond_stage_model = csm
        self._clip.patcher = clip_patcher
        self._clip.apply_hooks_to_conds = None
        if getattr(clip.patcher, "forced_hooks", None) is not None:
            log.warning("AudioToken training: the CLIP's scheduled hooks are not applied while training.")

        self._model, self._unet_patcher = _private_copy(model, "the MODEL")
        if gradient_checkpointing and _enable_gradient_checkpointing(self._model.diffusion_model) == 0:
            log.warning("AudioToken training: found no UNet blocks to checkpoint; training without checkpointing.")
        self._ms = self._model.model_sampling
        self.device = self._unet_patcher.load_device

    # -- protocol ---------------------------------------------------------------------------

    def encode_prompt(self, text: str, placeholder: str, vectors: dict[str, torch.Tensor]) -> list:
        """CONDITIONING `[[cond [B, T, D], {"pooled_output": [B, P]}]]`; item b holds `vectors[key][b]`
        in place of the placeholder. Differentiable w.r.t. the vectors."""
        batch = len(next(iter(vectors.values())))
        tokens, ids = self._prompt_tokens(text, placeholder)
        with _GradMode():
            self._load()
            items = [_put_vectors(tokens, ids, {k: _plain(vectors[k][b]) for k in self.widths})
                     for b in range(batch)]
            if self.batch_prompts:
                return encode_token_rows(self._clip, items)
            return _concat_conditioning([self._clip.encode_from_tokens_scheduled(item) for item in items])

    def diffusion_loss(self, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE [B] of the model's eps (or, for v models, v) prediction at DDPM timesteps."""
        cross, pooled, extras = self._unpack_cond(cond, latents.shape[0])

        with _GradMode():
            self._load()
            device = self.device
            x0 = _plain(latents).to(device=device, dtype=torch.float32)
            eps = _plain(noise).to(device=device, dtype=torch.float32)
            # ModelSamplingDiscrete.sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]),
            # indexed by the DDPM timestep; apply_model maps sigma back to the same t.
            sigma = self._ms.sigma(_plain(timesteps).to(self._ms.sigmas.device).float()).to(device)
            xt = self._ms.noise_scaling(sigma, eps, x0)
            params = dict(extras)
            params.update(cross_attn=_plain(cross).to(device), device=device, noise=xt,
                          width=latents.shape[-1] * 8, height=latents.shape[-2] * 8)
            if pooled is not None:
                params["pooled_output"] = _plain(pooled)
            conds = self._model.extra_conds(**params)
            kwargs = {name: c.cond for name, c in conds.items()}
            # A fresh transformer_options: ComfyUI's UNet writes into it (the default is a shared dict).
            x0_hat = self._model.apply_model(xt, sigma, transformer_options={}, **kwargs).float()
            s = sigma.view(-1, 1, 1, 1)
            eps_hat = (xt - x0_hat) / s
            if self.prediction == "v":
                # VP form: x_vp = a x0 + b eps with a = 1/sqrt(1+s^2), b = s a; v = a eps - b x0.
                # v_hat - v = (eps_hat - eps) / a, so the v-MSE is the eps-MSE times (1 + s^2).
                err = (eps_hat - eps) * torch.sqrt(1.0 + s * s)
            else:
                err = eps_hat - eps
            return err.pow(2).mean(dim=tuple(range(1, err.dim())))

    def label_targets(self, labels: list[str]) -> dict[str, torch.Tensor]:
        """{key: [B, D]}: the mean input word embedding of each label's tokens (no start/end/pad)."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.widths}
        with torch.inference_mode(False), torch.no_grad():
            for label in labels:
                tokens = self._clip.tokenize(str(label), return_word_ids=True)
                for key in self.widths:
                    ids = [int(t) for chunk in tokens[key] for t, _, word in chunk if word != 0 and _is_token_id(t)]
                    if not ids:
                        raise BackendError(f"The label '{label}' has no words for the text encoder to embed; "
                                           "give every training item a non-empty label.")
                    table = self._embedding_table(key)
                    rows = table.weight[torch.tensor(ids, device=table.weight.device)]
                    out[key].append(rows.float().mean(dim=0).to(self.device))
        return {k: torch.stack(v) for k, v in out.items()}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> latents [B, C, H/8, W/8] as the diffusion model consumes them."""
        with torch.inference_mode():  # ComfyUI's VAE (weights and moves) lives in inference mode
            latents = self._vae.encode(images.movedim(1, -1).clamp(0, 1))
        with torch.inference_mode(False), torch.no_grad():
            latents = latents.clone().float()
            return self._model.process_latent_in(latents.to(self.device))

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the private copies. Nothing else references them (no reference cycles), so they are
        freed at once, and ComfyUI's memory manager drops its entries for them by its own weak
        references; memory still held by a caller's autograd graph or traceback goes with it."""
        self._clip = self._model = self._ms = self._unet_patcher = None
        mm.soft_empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _prediction_type(ms) -> str:
        ok_schedule = isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
            ms, comfy.model_sampling.ModelSamplingDiscreteEDM)
        if ok_schedule and not isinstance(ms, comfy.model_sampling.EDM):
            if isinstance(ms, comfy.model_sampling.V_PREDICTION):
                return "v"
            if isinstance(ms, comfy.model_sampling.EPS) and not isinstance(ms, comfy.model_sampling.X0):
                return "eps"
        raise BackendError(
            f"This MODEL samples with {type(ms).__name__} ({', '.join(c.__name__ for c in type(ms).__mro__[1:3])}); "
            "AudioToken trains eps- and v-prediction models on the 1000-step DDPM schedule (SD1.x, SD2.x, SDXL)."
        )

    def _load(self) -> None:
        """Both private copies on the compute device (together, so one cannot evict the other mid-step).

        ComfyUI moves, patches and evicts models inside inference mode, as its executor does:
        the originals' weights are inference tensors, which may not be updated in place outside
        it. Whatever of ours it moved there became inference tensors too: re-cloned here (once
        per move, device-local; nothing happens while the copies stay loaded)."""
        with torch.inference_mode():
            mm.load_models_gpu([self._clip.patcher, self._unet_patcher], memory_required=int(self.memory_required))
        _ensure_trainable(self._clip.cond_stage_model)
        _ensure_trainable(self._model)

    def _prompt_tokens(self, text: str, placeholder: str):
        key = (text, placeholder)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        value = _stand_in_tokens(self._clip, text, placeholder)
        self._prompt_cache[key] = value
        while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return value

    @staticmethod
    def _unpack_cond(cond, batch: int):
        """encode_prompt's CONDITIONING -> (cross [B, T, D], pooled or None, other model inputs)."""
        cross, extras = cond[0][0], dict(cond[0][1])
        pooled = extras.pop("pooled_output", None)
        extras = {k: v for k, v in extras.items() if k not in ("hooks", "clip_start_percent", "clip_end_percent")}
        if cross.shape[0] == 1 and batch > 1:
            cross = cross.expand(batch, -1, -1)
            pooled = pooled.expand(batch, -1) if pooled is not None else None
        return cross, pooled, extras

    def _embedding_table(self, key: str):
        return getattr(self._clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings()


def _warn_unapplied_patches(model) -> None:
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    unapplied = [name for name in ("patches", "patches_replace") if transformer.get(name)]
    unapplied += [name for name in ("model_function_wrapper",) if options.get(name)]
    if unapplied:
        log.warning("AudioToken training: model patches %s (e.g. IPAdapter, FreeU) are not applied while "
                    "training; weight patches such as LoRA are.", unapplied)
