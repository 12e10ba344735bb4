"""The training backend for ComfyUI models: `ComfyBackend(model, clip, vae)`.

Implements the `DiffusionBackend` protocol of `audiotoken_core/training` (see
docs/architecture.md, "Training") with ComfyUI's own model code, for the MODEL / CLIP / VAE
outputs of ComfyUI's loaders: SD1.x, SD2.x (eps and v-prediction), SDXL, and the
flow-matching families (SD3.x, Flux.1, Wan 2.x, Qwen-Image, Z-Image, ...).

Loss per prediction type (`prediction`, read from the MODEL's own model_sampling, including
object patches such as the ModelSamplingSD3 / ModelSamplingFlux nodes applied to it); x0 is
the latent, eps the noise, s the sigma, D(x_t, s) the model's denoised output from
`apply_model` (ComfyUI's calculate_denoised of the model's own prediction):

* "eps" (1000-step DDPM, EPS): s = sigmas[t], x_t = x0 + s eps (ComfyUI's noise_scaling),
  eps_hat = (x_t - D) / s, loss = mean (eps_hat - eps)^2.
* "v" (DDPM, V_PREDICTION): the same eps_hat; loss = mean (eps_hat - eps)^2 (1 + s^2),
  which is the MSE of the VP-form velocity v = a eps - b x0 (a = 1/sqrt(1+s^2), b = s a).
* "flow" (CONST: ModelSamplingDiscreteFlow / ModelSamplingFlux, with their shift): the
  trainer's draw t in 0..999 maps to u = (t + 1/2) / 1000 and s = percent_to_sigma(1 - u)
  (the model's own time shift), x_t = noise_scaling(s, eps, x0) = (1 - s) x0 + s eps,
  the model's velocity v_hat = (x_t - D) / s, target v = eps - x0 (the derivative of x_t in s),
  loss = mean (v_hat - v)^2 = mean ((x0 - D) / s)^2.

Model inputs come from the model's own `extra_conds` (pooled output, Flux `guidance`,
attention masks of the conditioning, width/height from the VAE's real downscale ratio),
latents from the VAE through the model's `process_latent_in` (16-channel SD3/Flux latents;
5-D [B, C, T, h, w] video latents for Wan, one 1-frame clip per image).

Why private copies. The executor runs every node under `torch.inference_mode()`, so the
weights of loaded models are inference tensors and autograd cannot save them for backward.
The backend therefore clones, once, the weights of the text encoder(s) and the diffusion
model outside inference mode (LoRA and other weight patches of the given ModelPatchers baked
in, frozen: `requires_grad=False`) into private modules, and hands those to ComfyUI's memory
manager through ModelPatchers of their own: `model_management.load_models_gpu` moves them to
the GPU and may evict the originals (or offload ours) like any other model. The original
MODEL and CLIP are never modified, so the rest of the graph sees them as before.

Several of ComfyUI's text-encoder layers add their residuals in place (`x += ...` in
CLIPLayer, T5LayerSelfAttention, T5LayerFF; `torch.add(..., out=x)` in newer Llama/Qwen/Gemma
blocks), which breaks backpropagation to the input word embeddings. The blocks of the private
text-encoder copy that do so become subclasses with an out-of-place forward (ComfyUI's
classes are untouched); a block class that adds in place and is not known here is refused by
name rather than failing in backward.

Prompts go through `nodes/splice.py` (the same stand-in tokenization, vector entries and
batched encode as the inference node), so the training conditioning is the inference conditioning.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import weakref
from collections import OrderedDict

import comfy.clip_model
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import comfy.text_encoders.llama
import comfy.text_encoders.t5
import comfy.utils
import torch
import torch.utils.checkpoint

from ..audiotoken_core.training.objective import NUM_TRAIN_TIMESTEPS, timestep_fraction
from .splice import (
    PromptError,
    _concat_conditioning,
    _is_token_id,
    _put_vectors,
    _stand_in_tokens,
    clip_family,
    clip_widths,
    embedding_scales,
    encode_token_rows,
    text_encoders,
)

log = logging.getLogger(__name__)

__all__ = ["ComfyBackend", "BackendError"]

# ModelPatcher writes these onto the model it manages; a private copy starts without them.
_PATCHER_MODEL_ATTRS = ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
                        "current_weight_patches_uuid", "model_offload_buffer_memory")
_PROMPT_CACHE_SIZE = 16
_COND_KEYS_NOT_FOR_THE_MODEL = ("pooled_output", "hooks", "clip_start_percent", "clip_end_percent")


class BackendError(ValueError):
    """MODEL / CLIP / VAE (or inputs) that the training backend cannot use; the message says why."""


# -- text encoders: out-of-place residual adds ----------------------------------------------

class _OutOfPlaceCLIPLayer(comfy.clip_model.CLIPLayer):
    """comfy.clip_model.CLIPLayer without the in-place residual adds (which break backward)."""

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))


class _OutOfPlaceT5LayerSelfAttention(comfy.text_encoders.t5.T5LayerSelfAttention):
    """T5's self-attention sub-layer with `x + attention` instead of `x += attention`."""

    def forward(self, x, mask=None, past_bias=None, optimized_attention=None):
        output, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias,
                                               optimized_attention=optimized_attention)
        return x + output, past_bias


class _OutOfPlaceT5LayerFF(comfy.text_encoders.t5.T5LayerFF):
    """T5's feed-forward sub-layer with `x + ff` instead of `x += ff`."""

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def _attention(self, x, attention_mask, freqs_cis, optimized_attention, cache):
    """Llama-style self-attention of a block; (output, present key/value or None when the
    ComfyUI version's Attention returns no cache)."""
    out = self.self_attn(hidden_states=x, attention_mask=attention_mask, freqs_cis=freqs_cis,
                         optimized_attention=optimized_attention, **cache)
    return out if isinstance(out, tuple) else (out, None)


class _OutOfPlaceLlamaBlock(comfy.text_encoders.llama.TransformerBlock):
    """Llama / Qwen block with out-of-place residual adds (newer ComfyUI writes the MLP residual
    into the block's input with `torch.add(..., out=x)`, which autograd refuses)."""

    def forward(self, x, attention_mask=None, freqs_cis=None, optimized_attention=None, **cache):
        attn, present = _attention(self, self.input_layernorm(x), attention_mask, freqs_cis, optimized_attention, cache)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, present) if "past_key_value" in cache else x


class _OutOfPlaceGemma2Block(comfy.text_encoders.llama.TransformerBlockGemma2):
    """Gemma 2 block with out-of-place residual adds (Gemma 3's sliding attention is not mirrored)."""

    def forward(self, x, attention_mask=None, freqs_cis=None, optimized_attention=None, **cache):
        attn, present = _attention(self, self.input_layernorm(x), attention_mask, freqs_cis, optimized_attention, cache)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return (x, present) if "past_key_value" in cache else x


# ComfyUI block class -> (our out-of-place subclass, the forward parameter lists it mirrors).
_LLAMA_PARAMS = (["self", "x", "attention_mask", "freqs_cis", "optimized_attention"],
                 ["self", "x", "attention_mask", "freqs_cis", "optimized_attention", "past_key_value"])
_OUT_OF_PLACE = {
    comfy.clip_model.CLIPLayer: (_OutOfPlaceCLIPLayer, (["self", "x", "mask", "optimized_attention"],)),
    comfy.text_encoders.t5.T5LayerSelfAttention: (
        _OutOfPlaceT5LayerSelfAttention, (["self", "x", "mask", "past_bias", "optimized_attention"],)),
    comfy.text_encoders.t5.T5LayerFF: (_OutOfPlaceT5LayerFF, (["self", "x"],)),
    comfy.text_encoders.llama.TransformerBlock: (_OutOfPlaceLlamaBlock, _LLAMA_PARAMS),
    comfy.text_encoders.llama.TransformerBlockGemma2: (_OutOfPlaceGemma2Block, _LLAMA_PARAMS),
}
_OURS = {fix for fix, _ in _OUT_OF_PLACE.values()}

# In-place updates in a forward's source: augmented assignment, out= arguments, `.add_(`-style calls.
_IN_PLACE_PATTERN = re.compile(r"(?<![=!<>])(?:\+|-|\*|/)=(?!=)|[(,]\s*out\s*=(?!=)|\.(?:add|addcmul|mul|sub|div|copy)_\(")


def _adds_in_place(cls: type) -> bool:
    """Whether `cls.forward` updates a tensor in place (comments and strings of its source ignored)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # no source to check: treat as unsafe
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    return bool(_IN_PLACE_PATTERN.search(code))


def _blocks(module: torch.nn.Module, outermost: bool = False) -> list[torch.nn.Module]:
    """The members of the module's ModuleLists (transformer blocks and their sub-layers);
    `outermost`: only those not inside another listed block."""
    found, seen = [], set()

    def visit(m, inside):
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    if id(block) not in seen and not (outermost and inside):
                        seen.add(id(block))
                        found.append(block)
                    visit(block, True)
            else:
                visit(child, inside)

    visit(module, False)
    return found


def _make_text_encoder_autograd_safe(module: torch.nn.Module, what: str) -> int:
    """Give the private copy's blocks that add residuals in place an out-of-place forward (by
    class: no reference cycles); refuse, by class name, a block class that adds in place and
    that this backend does not mirror. Returns the number of blocks checked."""
    blocks = _blocks(module)
    for block in blocks:
        cls = type(block)
        if cls in _OURS:
            continue
        if cls in _OUT_OF_PLACE:
            fix, accepted = _OUT_OF_PLACE[cls]
            if cls is not comfy.clip_model.CLIPLayer and not _adds_in_place(cls):
                continue  # this ComfyUI's forward is already out of place
            params = list(inspect.signature(cls.forward).parameters)
            if params not in [list(p) for p in accepted]:
                raise RuntimeError(
                    f"This ComfyUI's {cls.__name__}.forward{params[1:]} differs from the one AudioToken's training "
                    f"backend mirrors ({accepted[-1][1:]}): update nodes/comfy_backend.py for it.")
            if fix is _OutOfPlaceGemma2Block and block.transformer_type != "gemma2":
                raise BackendError(f"{what} has {block.transformer_type} text-encoder blocks, which add in place; the "
                                   "training backend mirrors Gemma 2 blocks only (not Gemma 3's sliding attention).")
            block.__class__ = fix
        elif _adds_in_place(cls):
            raise BackendError(
                f"{what} has text-encoder layers of class {cls.__module__}.{cls.__qualname__}, which update "
                "their input in place; gradients cannot reach the audio word through them and the training "
                "backend has no out-of-place version of this class. Train with a supported text encoder "
                "(CLIP, T5, umT5, Llama, Qwen, Gemma 2).")
    if not blocks:
        raise BackendError(f"{what} has no transformer layers the training backend recognises (no ModuleList of "
                           "blocks); connect the CLIP output of a ComfyUI loader.")
    return len(blocks)


class _CopySavedActivations:
    """Autograd keeps its own copy of every activation it saves (tensors that require grad) and
    checks that the other tensors it saves are unchanged when backward reads them.

    Why: ComfyUI's diffusion transformers (Flux, SD3/MMDiT, Wan, Qwen-Image...) add their
    residuals in place (`img += ...`), overwriting tensors that autograd saved for backward.
    Mirroring every DiT block out of place would track every model ComfyUI adds; saving
    copies makes any block autograd-safe at the price of one copy per saved activation (the
    memory autograd holds is unchanged: the copy replaces the reference). With saved-tensor
    hooks autograd no longer checks versions itself, hence the check of what is not copied."""

    def __init__(self):
        self._copies: dict[int, tuple] = {}

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_saved)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._copies.clear()
        return self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        if t.requires_grad:
            hit = self._copies.get(id(t))  # one copy for a tensor saved by several ops (q, k, v projections)
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                return hit[2]
            saved = t.detach().clone()
            self._copies[id(t)] = (weakref.ref(t), t._version, saved)
            return saved
        return (t, None if t.is_inference() else t._version)


def _unpack_saved(packed):
    if isinstance(packed, tuple):
        t, version = packed
        if version is not None and t._version != version:
            raise RuntimeError("A tensor that autograd saved for the AudioToken backward pass was changed in place "
                               "by the diffusion model; this model cannot be trained through (report it).")
        return t
    return packed


_CHECKPOINTED: dict[tuple, type] = {}


def _checkpointed(base: type, copy_saved: bool = False) -> type:
    """One cached subclass of `base` whose forward recomputes its activations in backward.

    `copy_saved` (blocks that update tensors in place): re-entrant checkpointing, whose first
    pass saves nothing and whose recomputation in backward saves copies (_CopySavedActivations);
    keyword arguments travel as positional ones so that gradients reach every tensor input."""
    key = (base, copy_saved)
    if key not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                return base.forward(self, *args, **kwargs)
            # ComfyUI mutates transformer_options between blocks: recompute with this call's values.
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            if not copy_saved:
                def recompute(*a, **k):
                    with _TrainingFlag():
                        return base.forward(*a, **k)
                return torch.utils.checkpoint.checkpoint(recompute, self, *args, use_reentrant=False, **kwargs)
            names = list(kwargs)
            flat = list(args) + [kwargs[n] for n in names]
            for value in flat:
                if isinstance(value, (tuple, list)) and any(torch.is_tensor(v) and v.requires_grad for v in value):
                    raise BackendError(f"{base.__name__} takes tensors that need gradients inside a tuple or list; "
                                       "train this model without gradient checkpointing.")

            def run(*values):
                # Blocks that add in place would overwrite their inputs, which checkpointing keeps for
                # the recomputation (and which are leaves there): each pass works on its own copies.
                values = [v.clone() if torch.is_tensor(v) and v.is_floating_point() else v for v in values]
                with _CopySavedActivations(), _TrainingFlag():
                    return base.forward(self, *values[:len(args)], **dict(zip(names, values[len(args):])))
            return torch.utils.checkpoint.checkpoint(run, *flat, use_reentrant=True)
        name = f"{base.__name__}_Checkpoint{'Copies' if copy_saved else ''}"
        _CHECKPOINTED[key] = type(name, (base,), {"forward": forward})
    return _CHECKPOINTED[key]


def _checkpoint(blocks, copy_saved: bool = False) -> int:
    count = 0
    for m in blocks:
        if type(m) not in _CHECKPOINTED.values():
            m.__class__ = _checkpointed(type(m), copy_saved)
            count += 1
    return count


def _unet_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ResBlocks and transformer blocks of an SD-style UNet (none for a DiT)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return [m for m in diffusion_model.modules() if type(m) in (ResBlock, BasicTransformerBlock)]


def _enable_gradient_checkpointing(diffusion_model: torch.nn.Module) -> int:
    """Checkpoint each ResBlock and transformer block of a private UNet copy, or each block of
    a DiT's block lists (Flux double/single blocks, MMDiT joint blocks, Wan blocks...)."""
    unet_blocks = _unet_blocks(diffusion_model)
    if unet_blocks:
        return _checkpoint(unet_blocks)
    return _checkpoint(_blocks(diffusion_model, outermost=True), copy_saved=True)


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


class _TrainingFlag:
    """Newer ComfyUI (0.33) runs RoPE through custom kernels without a backward unless
    `model_management.in_training` is set (its own trainer sets it); older versions lack the flag.
    Set while the backend computes with gradients, and in checkpointed recomputations."""

    def __enter__(self):
        self._before = getattr(mm, "in_training", None)
        if self._before is not None:
            mm.in_training = True
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            mm.in_training = self._before
        return False


class _GradMode:
    """Leave inference mode (ComfyUI's executor runs nodes inside it) and record gradients,
    unless the caller turned gradients off outside inference mode (evaluation)."""

    def __enter__(self):
        want_grad = torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        self._inference = torch.inference_mode(False)
        self._grad = torch.set_grad_enabled(want_grad)
        self._flag = _TrainingFlag()
        self._inference.__enter__()
        self._grad.__enter__()
        self._flag.__enter__()

    def __exit__(self, *exc):
        self._flag.__exit__(*exc)
        self._grad.__exit__(*exc)
        self._inference.__exit__(*exc)
        return False


# -- what the MODEL expects -------------------------------------------------------------------

# unet_config names of the width of the text conditioning a diffusion model reads.
_CONTEXT_WIDTH_NAMES = ("context_dim", "context_in_dim", "text_dim", "joint_attention_dim", "cap_feat_dim")
# Diffusion-model submodules whose first Linear takes the text conditioning (when the config omits its width).
_TEXT_INPUT_MODULES = ("txt_in", "context_embedder", "text_embedding", "cap_embedder")


def model_text_width(model) -> int | None:
    """The width of the text conditioning the MODEL reads, from its config or its text-input layer;
    None when this backend cannot tell (then nothing is checked)."""
    config = model.model.model_config.unet_config
    for name in _CONTEXT_WIDTH_NAMES:
        if isinstance(config.get(name), int):
            return int(config[name])
    embedder = config.get("context_embedder_config") or {}
    if isinstance(embedder.get("params", {}).get("in_features"), int):
        return int(embedder["params"]["in_features"])
    diffusion_model = getattr(model.model, "diffusion_model", None)
    for name in _TEXT_INPUT_MODULES:
        sub = getattr(diffusion_model, name, None)
        if isinstance(sub, torch.nn.Module):
            for m in sub.modules():
                if isinstance(m, torch.nn.Linear):
                    return int(m.in_features)
    return None


def prediction_type(ms) -> str:
    """"eps", "v" (1000-step DDPM schedules) or "flow" (rectified flow: CONST with a flow schedule)."""
    ms_lib = comfy.model_sampling
    ddpm = isinstance(ms, ms_lib.ModelSamplingDiscrete) and not isinstance(ms, ms_lib.ModelSamplingDiscreteEDM)
    if ddpm and not isinstance(ms, ms_lib.EDM):
        if isinstance(ms, ms_lib.V_PREDICTION):
            return "v"
        if isinstance(ms, ms_lib.EPS) and not isinstance(ms, ms_lib.X0):
            return "eps"
    kind = type(ms)
    const = ms_lib.CONST
    if isinstance(ms, const) and all(getattr(kind, f) is getattr(const, f)
                                     for f in ("calculate_input", "calculate_denoised", "noise_scaling")):
        middle = ms.percent_to_sigma(0.5) if hasattr(ms, "percent_to_sigma") else None
        if middle is not None and 0.0 < float(middle) < 1.0:
            return "flow"
    raise BackendError(
        f"This MODEL samples with {kind.__name__} ({', '.join(c.__name__ for c in kind.__mro__[1:3])}); "
        "AudioToken trains eps- and v-prediction models on the 1000-step DDPM schedule (SD1.x, SD2.x, SDXL) "
        "and rectified-flow models (SD3.x, Flux.1, Wan 2.x, Qwen-Image, Z-Image...)."
    )


def _spatial_ratio(vae, latent_format) -> int:
    """Pixels per latent cell along height/width: the VAE's own downscale ratio (an int, or
    (time formula, h, w) for video VAEs); without a VAE the latent format's, else SD's 8."""
    if vae is not None and getattr(vae, "downscale_ratio", None) is not None:
        ratio = vae.downscale_ratio
        return int(ratio[-1] if isinstance(ratio, (tuple, list)) else ratio)
    return int(getattr(latent_format, "spacial_downscale_ratio", 8))


# -- the backend ------------------------------------------------------------------------------

class ComfyBackend:
    """DiffusionBackend for ComfyUI MODEL / CLIP / VAE objects (SD1.x, SD2.x incl. v, SDXL,
    and flow-matching models: SD3.x, Flux.1, Wan 2.x, Qwen-Image...).

    Attributes: `widths` ({text-encoder key: word-embedding width}), `prediction` ("eps", "v"
    or "flow"), `family` (the CLIP's family name), `device` (where losses are computed),
    `num_timesteps` (1000: the trainer's draws t in 0..999; DDPM index, or u = (t + 1/2)/1000
    for flow). Call `close()` (or use it as a context manager) to release the private copies
    early; otherwise they go with the object.

    `batch_prompts=True` encodes a batch of prompts the way the inference node does
    (`splice.encode_token_rows`); False encodes each row alone.
    `gradient_checkpointing=True` recomputes the diffusion model's block activations in backward
    (UNet ResBlocks / transformer blocks, or a DiT's blocks): less memory, about one more forward
    per step. `text_encoder_checkpointing=True` does the same for the text encoder's layers
    (worth it for T5-XXL and LLM encoders). `guidance`: the distilled-guidance input of
    guidance-embedded models (Flux.1-dev, HunyuanVideo), passed where the model's extra_conds
    reads it; None keeps ComfyUI's default for the model (3.5 for Flux, as FluxGuidance);
    models without a guidance input ignore it. `memory_required` (bytes, default 0) asks
    ComfyUI to keep that much device memory free for activations when it loads the private
    copies (it unloads other models for it).
    """

    def __init__(self, model, clip, vae=None, *, batch_prompts: bool = True, gradient_checkpointing: bool = False,
                 text_encoder_checkpointing: bool = False, guidance: float | None = None):
        try:
            self.widths = clip_widths(clip)
            self.family = clip_family(self.widths)
        except PromptError as e:
            raise BackendError(str(e)) from None
        if guidance is not None and not (isinstance(guidance, (int, float)) and guidance >= 0):
            raise BackendError(f"guidance must be a number >= 0 (Flux.1-dev uses 3.5) or None, got {guidance!r}.")
        self.guidance = None if guidance is None else float(guidance)

        ms = model.get_model_object("model_sampling")
        self.prediction = prediction_type(ms)
        self.num_timesteps = len(ms.sigmas) if self.prediction != "flow" else NUM_TRAIN_TIMESTEPS
        _check_model_reads_clip(model, clip, self.family)

        _warn_unapplied_patches(model)
        self._vae = vae
        self.batch_prompts = batch_prompts
        self.memory_required = 0
        self._prompt_cache: OrderedDict = OrderedDict()

        # Private copies: text encoders first, then the diffusion model (each original is loaded
        # on its own, so at most one original sits next to its copy in memory at a time).
        csm, clip_patcher = _private_copy(clip.patcher, "the CLIP")
        _make_text_encoder_autograd_safe(csm, "This CLIP")
        if text_encoder_checkpointing:
            _checkpoint(_blocks(csm, outermost=True))
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
            log.warning("AudioToken training: found no diffusion-model blocks to checkpoint; training without "
                        "checkpointing.")
        # DiTs add residuals in place (see _CopySavedActivations); SD UNets do not.
        self._copy_saved = not _unet_blocks(self._model.diffusion_model)
        self._ms = self._model.model_sampling
        self._latent_format = self._model.latent_format
        self.device = self._unet_patcher.load_device

    # -- protocol ---------------------------------------------------------------------------

    def encode_prompt(self, text: str, placeholder: str, vectors: dict[str, torch.Tensor]) -> list:
        """CONDITIONING `[[cond [B, T, D], {"pooled_output": [B, P], ...}]]`; item b holds `vectors[key][b]`
        in place of the placeholder. Differentiable w.r.t. the vectors."""
        batch = len(next(iter(vectors.values())))
        tokens, ids = self._prompt_tokens(text, placeholder)
        with _GradMode():
            self._load()
            scales = embedding_scales(self._clip, ids)
            items = [_put_vectors(tokens, ids, {k: _plain(vectors[k][b]) for k in self.widths}, scales)
                     for b in range(batch)]
            if self.batch_prompts:
                return encode_token_rows(self._clip, items)
            return _concat_conditioning([self._clip.encode_from_tokens_scheduled(item) for item in items])

    def diffusion_loss(self, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE [B] in the model's own target space (eps, v or flow velocity; see the
        module docstring) at the trainer's timestep draws (0..num_timesteps-1)."""
        self._check_latents(latents)
        batch = latents.shape[0]
        cross, pooled, extras = self._unpack_cond(cond, batch)

        with _GradMode():
            self._load()
            device = self.device
            x0 = _plain(latents).to(device=device, dtype=torch.float32)
            eps = _plain(noise).to(device=device, dtype=torch.float32)
            sigma = self._sigmas(_plain(timesteps)).to(device)
            xt = self._ms.noise_scaling(sigma, eps, x0)
            ratio = _spatial_ratio(self._vae, self._latent_format)
            params = dict(extras)
            params.update(cross_attn=_plain(cross).to(device), device=device, noise=xt,
                          width=latents.shape[-1] * ratio, height=latents.shape[-2] * ratio)
            if pooled is not None:
                params["pooled_output"] = _plain(pooled)
            if self.guidance is not None:
                params["guidance"] = self.guidance
            conds = self._model.extra_conds(**params)
            kwargs = {name: c.process_cond(batch_size=batch, area=None, device=device).cond
                      for name, c in conds.items()}
            # A fresh transformer_options: ComfyUI's models write into it (the default is a shared dict).
            with _CopySavedActivations() if self._copy_saved else contextlib.nullcontext():
                x0_hat = self._model.apply_model(xt, sigma, transformer_options={}, **kwargs).float()
            s = sigma.view((-1,) + (1,) * (xt.dim() - 1))
            if self.prediction == "flow":
                # CONST: x0_hat = x_t - s v_hat and x_t - x0 = s v, so v_hat - v = (x0 - x0_hat) / s.
                err = (x0 - x0_hat) / s
            else:
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
        """[B, 3, H, W] in [0, 1] -> latents as the diffusion model consumes them: [B, C, H/r, W/r],
        or [B, C, 1, H/r, W/r] for video models (each image its own 1-frame clip)."""
        if self._vae is None:
            raise BackendError("This training backend has no VAE: connect the model's VAE, or give latents.")
        pixels = images.movedim(1, -1).clamp(0, 1)
        with torch.inference_mode():  # ComfyUI's VAE (weights and moves) lives in inference mode
            if getattr(self._vae, "latent_dim", 2) == 3:
                # A video VAE merges the images of one call into one clip's frames: one call per image.
                latents = torch.cat([self._vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])])
            else:
                latents = self._vae.encode(pixels)
        with torch.inference_mode(False), torch.no_grad():
            latents = latents.clone().float()
            self._check_latents(latents, "The VAE")
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

    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """float32 [B] sigmas of the trainer's timestep draws, from the model's own model_sampling."""
        if self.prediction == "flow":
            fractions = timestep_fraction(timesteps, self.num_timesteps)
            return torch.tensor([float(self._ms.percent_to_sigma(1.0 - float(u))) for u in fractions],
                                dtype=torch.float32)
        # ModelSamplingDiscrete.sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]),
        # indexed by the DDPM timestep; apply_model maps sigma back to the same t.
        return self._ms.sigma(timesteps.to(self._ms.sigmas.device).float())

    def _check_latents(self, latents: torch.Tensor, what: str = "These latents") -> None:
        fmt = self._latent_format
        dims = int(getattr(fmt, "latent_dimensions", 2)) + 2
        channels = getattr(fmt, "latent_channels", None)
        if latents.dim() != dims or (channels is not None and latents.shape[1] != channels):
            layout = "[B, C, T, h, w] (video; one frame per image: T = 1)" if dims == 5 else "[B, C, h, w]"
            raise BackendError(
                f"{what} have shape {list(latents.shape)} but this MODEL takes {dims}-D latents {layout} with "
                f"{channels} channels: use the VAE of the model's family (and its latents).")

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
        pooled = extras.get("pooled_output")
        extras = {k: v for k, v in extras.items() if k not in _COND_KEYS_NOT_FOR_THE_MODEL}
        if cross.shape[0] == 1 and batch > 1:
            cross = cross.expand(batch, -1, -1)
            pooled = pooled.expand(batch, -1) if pooled is not None else None
        return cross, pooled, extras

    def _embedding_table(self, key: str):
        return text_encoders(self._clip, [key])[key].transformer.get_input_embeddings()

    def text_match_loss(self, text: str, placeholder: str, vectors: dict[str, torch.Tensor],
                        labels: list[str]) -> torch.Tensor:
        """Per-sample text-match loss [B] (nodes/text_match.py; NOT the paper's objective), differentiable
        w.r.t. the vectors. Only the text encoder runs, so only its copy is loaded on the device."""
        from .text_match import text_match_loss

        with _GradMode():
            with torch.inference_mode():
                mm.load_models_gpu([self._clip.patcher], memory_required=int(self.memory_required))
            _ensure_trainable(self._clip.cond_stage_model)
            return text_match_loss(self._clip, self._prompt_tokens(text, placeholder), text, placeholder,
                                   {k: _plain(v) for k, v in vectors.items()}, list(labels))



def _check_model_reads_clip(model, clip, family: str) -> None:
    """Refuse a CLIP whose conditioning width is not what the MODEL reads (e.g. SD1.5's CLIP with Flux)."""
    wanted = model_text_width(model)
    if wanted is None:
        return
    with torch.inference_mode():
        given = int(clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))[0][0].shape[-1])
    if given != wanted:
        raise BackendError(
            f"This MODEL reads {wanted}-wide text conditioning but the {family} CLIP gives {given}-wide "
            "conditioning: connect the MODEL and CLIP of the same checkpoint (or the text encoders made for "
            "this model, loaded with its CLIP type).")


def _warn_unapplied_patches(model) -> None:
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    unapplied = [name for name in ("patches", "patches_replace") if transformer.get(name)]
    unapplied += [name for name in ("model_function_wrapper",) if options.get(name)]
    if unapplied:
        log.warning("AudioToken training: model patches %s (e.g. IPAdapter, FreeU) are not applied while "
                    "training; weight patches such as LoRA are.", unapplied)
