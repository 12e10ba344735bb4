"""Evaluation through ComfyUI's own generation path, shared by the node and scripts/evaluate_audiotoken.py.

    generator = ComfyGenerator(model, clip, vae, audiotoken, prompt="a photo of <audio>", steps=50, ...)
    results, sheet = evaluate(items, generator, scorers, out_dir, protocol, progress)

Each image: the conditioning from nodes/splice.encode_with_vectors (audio vector in place of
the placeholder; the label word for the topline), the empty (or given) negative prompt, an
empty latent, `nodes.common_ksampler` (ComfyUI's KSampler) and `vae.decode`, as the
LoadAudio -> AudioToken Encode -> KSampler -> VAE Decode workflow does.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..audiotoken_core.data import module_fingerprint
from ..audiotoken_core.evaluation.contact_sheet import eval_contact_sheet
from ..audiotoken_core.evaluation.eval_set import EvalItem, item_audio
from ..audiotoken_core.evaluation.runner import EvalProtocol, EvalResults, EvalRunner, Scorers, standard_scorers
from ..audiotoken_core.token_file import weights_digest
from ..audiotoken_core.training.trainer import new_audiotoken
from .runtime import LoadedAudioToken
from .splice import check_prompt, encode_with_vectors, replace_placeholder

FLOOR_SEED = 0  # the untrained Embedder of the floor row is new_audiotoken(..., seed=FLOOR_SEED)
SHEET_COLUMNS = ("spectrogram", "audiotoken", "reference", "untrained", "text_label")


def comfy_nodes():
    """ComfyUI's `nodes` module (for common_ksampler), whatever this pack's own package is called."""
    module = sys.modules.get("nodes")
    if module is not None and hasattr(module, "common_ksampler"):
        return module
    if module is not None:
        raise RuntimeError(f"`nodes` is imported from {getattr(module, '__file__', '?')}, not from ComfyUI")
    import folder_paths

    root = os.path.dirname(os.path.abspath(folder_paths.__file__))
    saved = list(sys.path)
    sys.path.insert(0, root)
    try:
        import nodes  # noqa: F401  (ComfyUI's nodes.py)
    finally:
        sys.path[:] = saved
    return sys.modules["nodes"]


def _weights_id(obj, attr: str | None) -> str:
    module = getattr(obj, attr, None) if attr else obj
    if isinstance(module, torch.nn.Module):
        return module_fingerprint(module)
    return type(obj).__name__


def _feed(h, value, depth: int = 0) -> None:
    """Hash `value` by content: tensors by dtype, shape and bytes; containers and plain objects (a LoRA
    adapter, a patch tuple) item by item; functions by name and captured values; modules by weights."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif depth > 8:
        h.update(type(value).__qualname__.encode())
    elif isinstance(value, torch.nn.Module):
        h.update(f"M{type(value).__qualname__}{module_fingerprint(value)}".encode())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            _feed(h, key, depth + 1)
            _feed(h, value[key], depth + 1)
        h.update(b"}")
    elif isinstance(value, (list, tuple, set, frozenset)):
        h.update(b"[")
        for item in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value):
            _feed(h, item, depth + 1)
        h.update(b"]")
    elif callable(value) and hasattr(value, "__qualname__"):
        h.update(f"F{getattr(value, '__module__', '')}.{value.__qualname__}".encode())
        cells = [c.cell_contents for c in (getattr(value, "__closure__", None) or ()) if c.cell_contents is not value]
        _feed(h, [cells, getattr(value, "__defaults__", None)], depth + 1)
    elif hasattr(value, "__dict__"):
        h.update(f"O{type(value).__qualname__}".encode())
        _feed(h, {k: v for k, v in vars(value).items() if not k.startswith("_")}, depth + 1)
    else:
        h.update(type(value).__qualname__.encode())


def patches_digest(patcher) -> str:
    """Digest of what a ModelPatcher adds to its base weights: every weight patch (key, strengths, offset and
    the patch's tensors, e.g. a LoRA's), object patches and model options. A changed LoRA or strength changes it."""
    if patcher is None:
        return "none"
    h = hashlib.sha256()
    _feed(h, [getattr(patcher, name, None) for name in ("patches", "object_patches", "model_options")])
    return h.hexdigest()[:16]


class ComfyGenerator:
    """The runner's Generator on ComfyUI objects (MODEL, CLIP, VAE, a LoadedAudioToken)."""

    def __init__(self, model, clip, vae, audiotoken: LoadedAudioToken, *, prompt: str = "a photo of <audio>",
                 placeholder: str = "<audio>", negative: str = "", steps: int = 50, cfg: float = 7.5,
                 sampler: str = "euler", scheduler: str = "normal", width: int = 512, height: int = 512,
                 window_seconds: float = 10.0, channel_policy: str = "mix", floor_seed: int = FLOOR_SEED,
                 checkpoint_name: str = "", on_step: Callable[[], None] | None = None) -> None:
        problem = check_prompt(prompt, placeholder)
        if problem:
            raise ValueError(problem)
        self.model, self.clip, self.vae = model, clip, vae
        self.audiotoken = audiotoken
        self.prompt, self.placeholder, self.negative = prompt, placeholder, negative
        self.steps, self.cfg, self.sampler, self.scheduler = int(steps), float(cfg), sampler, scheduler
        self.width, self.height = int(width), int(height)
        self.window_seconds, self.channel_policy, self.floor_seed = float(window_seconds), channel_policy, int(floor_seed)
        self.on_step = on_step
        token = audiotoken.token
        token.eval()
        floor = new_audiotoken(token.widths, token.encoder, seed=self.floor_seed, placeholder=token.placeholder,
                               description=f"untrained floor (seed {self.floor_seed})").eval()
        self.floor = LoadedAudioToken(token=floor, encoder=audiotoken.encoder, name=f"untrained (seed {self.floor_seed})")
        self._negative_cond = None
        self._common = {
            "checkpoint": checkpoint_name,
            "model_weights": _weights_id(getattr(model, "model", model), None), "model_patches": patches_digest(model),
            "clip_weights": _weights_id(clip, "cond_stage_model"), "clip_patches": patches_digest(getattr(clip, "patcher", None)),
            "clip_layer": getattr(clip, "layer_idx", None), "vae_weights": _weights_id(vae, "first_stage_model"),
            "negative": negative, "steps": self.steps, "cfg": self.cfg, "sampler": sampler, "scheduler": scheduler,
            "width": self.width, "height": self.height,
        }
        self._audio = {"encoder": audiotoken.encoder.name, "encoder_spec": audiotoken.encoder.encoder.spec.to_dict(),
                       "window_seconds": self.window_seconds, "channel_policy": channel_policy,
                       "prompt": prompt, "placeholder": placeholder}
        self._token = {"audiotoken": audiotoken.name, "token_digest": weights_digest(token)[:16],
                       "stochastic_pooling": any(getattr(e, "stochastic_pooling", False) for e in token.embedders.values())}

    # ------------------------------------------------------------------ Generator protocol

    def settings(self, system: str) -> dict:
        if system == "audiotoken":
            return {**self._common, **self._audio, **self._token}
        if system == "untrained":
            return {**self._common, **self._audio, "floor_seed": self.floor_seed,
                    "token_widths": self.audiotoken.token.widths}
        if system == "text_label":
            return {**self._common, "prompt": self.prompt, "placeholder": self.placeholder}
        raise ValueError(f"unknown system {system!r}")

    def conditioning(self, system: str, item: EvalItem) -> list:
        if system == "text_label":
            text = replace_placeholder(self.prompt, self.placeholder, item.label)[0]  # as a word, like the splice
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        loaded = self.audiotoken if system == "audiotoken" else self.floor
        wave, rate = item_audio(item)
        emb, _ = loaded.embed_audio({"waveform": wave[None], "sample_rate": rate}, start_seconds=0.0,
                                 window_seconds=self.window_seconds, channel_policy=self.channel_policy, loop=True)
        return encode_with_vectors(self.clip, self.prompt, self.placeholder, emb.vectors, f"AudioToken '{loaded.name}'")

    def generate(self, system: str, item: EvalItem, seed: int) -> torch.Tensor:
        nodes = comfy_nodes()
        positive = self.conditioning(system, item)
        if self._negative_cond is None:
            self._negative_cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(self.negative))
        channels = getattr(getattr(self.model.model, "latent_format", None), "latent_channels", 4)
        latent = {"samples": torch.zeros(1, channels, self.height // 8, self.width // 8)}
        samples = nodes.common_ksampler(self.model, seed, self.steps, self.cfg, self.sampler, self.scheduler,
                                        positive, self._negative_cond, latent)[0]["samples"]
        image = self.vae.decode(samples)
        if image.ndim == 5:  # video VAEs: [B, T, H, W, 3]
            image = image.reshape(-1, *image.shape[-3:])
        if self.on_step is not None:
            self.on_step()
        return image[0].float().cpu()


# ---------------------------------------------------------------------- scorers from model files


def clip_vision_embedder(clip_vision) -> Callable[[torch.Tensor], torch.Tensor]:
    """ComfyUI CLIP_VISION -> normalised image embeddings (its `image_embeds`)."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = clip_vision.encode_image(images)
        return torch.nn.functional.normalize(out["image_embeds"].float().cpu(), dim=-1)

    return embed


def load_scorers(*, clip_vision=None, clip_vision_name: str = "", clip_folder: str | os.PathLike | None = None,
                 wav2clip_path: str | os.PathLike | None = None, inception_path: str | os.PathLike | None = None,
                 device=None, hints: dict | None = None) -> Scorers:
    """Load the local metric models that are given and build the scorers (the others are n/a)."""
    from ..audiotoken_core.evaluation.clip_models import load_hf_clip
    from ..audiotoken_core.evaluation.inception import load_fid_inception
    from ..audiotoken_core.evaluation.wav2clip import load_wav2clip

    device = device or "cpu"
    hf_clip = load_hf_clip(clip_folder, device=device) if clip_folder else None
    wav2clip = load_wav2clip(wav2clip_path, device=device) if wav2clip_path else None
    inception = load_fid_inception(inception_path, device=device) if inception_path else None
    image = clip_vision_embedder(clip_vision) if clip_vision is not None else None
    return standard_scorers(image_embedder=image, image_embedder_name=f"CLIP vision {clip_vision_name}".strip(),
                            hf_clip=hf_clip, wav2clip=wav2clip, inception=inception, missing_hint=hints)


# ---------------------------------------------------------------------- one call for node and command


def evaluate(items: Sequence[EvalItem], generator, scorers: Scorers, out_dir: str | os.PathLike,
             protocol: EvalProtocol, progress: Callable[[int, int], None] | None = None, sheet_rows: int = 8,
             sheet_columns: Sequence[str] = SHEET_COLUMNS) -> tuple[EvalResults, np.ndarray]:
    """Run the protocol, write results.json/.md and contact_sheet.png into `out_dir`; return both."""
    from PIL import Image

    runner = EvalRunner(items, generator, scorers, out_dir, protocol)
    results = runner.run(progress=progress)
    columns = [c for c in sheet_columns if c in ("spectrogram", "reference") or c in protocol.systems]
    sheet = eval_contact_sheet(out_dir, items, columns=columns, max_rows=sheet_rows)
    Image.fromarray(sheet).save(Path(out_dir) / "contact_sheet.png")
    return results, sheet
