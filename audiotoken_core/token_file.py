"""The AudioToken: an ``nn.Module`` holding one Embedder per text-encoder key, its ``.safetensors``
file, and the importer of the authors' released weights.

File layout (format_version "1"): the tensors are exactly ``AudioToken.state_dict()``, i.e.
``embedders.<key>.<reference state-dict name>`` for each text-encoder key the token serves
(``l`` CLIP-L 768, ``h`` OpenCLIP-H 1024, ``g`` OpenCLIP-bigG 1280); metadata (all strings):
``format`` = ``audiotoken``, ``format_version`` = ``1``, ``encoder`` (JSON audio-encoder spec,
e.g. ``{"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768, "sample_rate": 16000,
"feature_dim": 2304}``), ``embedders`` (JSON: key -> EmbedderConfig dict), ``placeholder``,
``prompt_template``, ``training`` (JSON), ``description``.

:func:`load_audiotoken` is the edge where files are checked; a token built in code is trusted.
The released reference weights (``embedder_learned_embeds.bin``, a torch pickle of the
13-tensor FGAEmbedder state dict, SD 1.4 / width 768) are read weights-only by
:func:`import_reference_embedder` (CLI: ``scripts/import_reference_token.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .audio import TARGET_SAMPLE_RATE
from .beats import BEATsConfig
from .embedder import REFERENCE_STATE_DICT_NAMES, Embedder, EmbedderConfig, state_dict_problems
from .embedding import AudioEmbedding
from .encoders import DEFAULT_BEATS_LAYERS
from .io import git_blob_id, is_safetensors, load_torch_weights_only, save_safetensors

__all__ = [
    "AudioToken",
    "AudioTokenFileError",
    "save_audiotoken",
    "load_audiotoken",
    "import_reference_embedder",
    "encoder_feature_dim",
    "weights_digest",
    "DEFAULT_ENCODER",
    "FORMAT",
    "FORMAT_VERSION",
    "REFERENCE_KEY_BY_WIDTH",
]

FORMAT = "audiotoken"
FORMAT_VERSION = "1"
TENSOR_PREFIX = "embedders."
MODELS_FOLDER_HINT = "models/audiotoken"
IMPORT_HINT = "'Import Reference AudioToken' node or scripts/import_reference_token.py"
# The reference setup: BEATs (iter3+, AS2M fine-tuned), layers 4, 8, 12 concatenated.
DEFAULT_ENCODER: dict[str, Any] = {
    "kind": "beats",
    "layers": list(DEFAULT_BEATS_LAYERS),
    "hidden_size": BEATsConfig().encoder_embed_dim,
    "sample_rate": TARGET_SAMPLE_RATE,
}
# Text-encoder key served by a reference Embedder of a given output width.
REFERENCE_KEY_BY_WIDTH = {768: "l", 1024: "h", 1280: "g"}


class AudioTokenFileError(ValueError):
    """A file is missing, unreadable, of another kind, or inconsistent."""


def encoder_feature_dim(spec: Mapping[str, Any]) -> int:
    """Feature width F of an audio-encoder spec: ``hidden_size * len(layers)``, or its ``feature_dim``.

    Raises ValueError when the spec gives neither, or both and they disagree.
    """
    hidden, layers, given = spec.get("hidden_size"), spec.get("layers"), spec.get("feature_dim")
    computed = hidden * len(layers) if isinstance(hidden, int) and isinstance(layers, (list, tuple)) else given
    if not isinstance(computed, int) or isinstance(computed, bool) or computed < 1 or given not in (None, computed):
        raise ValueError(f"encoder spec {dict(spec)}: its feature_dim must be hidden_size (an int) x len(layers) "
                         "(a list), or be given alone; it disagrees or is missing")
    return computed


class AudioToken(nn.Module):
    """One trained AudioToken: an Embedder per text-encoder key (``.embedders``, a ModuleDict), plus how
    to use it: the audio-encoder spec its Embedders read (``encoder``), the placeholder word, the prompt
    template and how it was made (``training_info``, the file's ``training`` metadata).

    ``state_dict()`` is the file's tensors; ``forward`` is the differentiable path (trainer),
    ``embed`` the inference one. Raises ValueError if an Embedder's input width is not the encoder's
    ``feature_dim`` or the template lacks the placeholder.
    """

    def __init__(
        self,
        embedders: Mapping[str, Embedder],
        encoder: Mapping[str, Any] | None = None,
        placeholder: str = "<audio>",
        prompt_template: str = "a photo of <audio>",
        training: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        super().__init__()
        self.embedders = nn.ModuleDict(dict(embedders))
        self.encoder = dict(DEFAULT_ENCODER if encoder is None else encoder)
        self.encoder["feature_dim"] = encoder_feature_dim(self.encoder)
        self.placeholder = placeholder
        self.prompt_template = prompt_template
        self.training_info = dict(training or {})
        self.description = description
        for key, embedder in self.embedders.items():
            if embedder.input_dim != self.feature_dim:
                raise ValueError(
                    f"embedder {key!r} reads features of width {embedder.input_dim} but the encoder "
                    f"{self.encoder.get('kind')!r} gives feature_dim {self.feature_dim}"
                )
        if not placeholder.strip() or placeholder not in prompt_template:
            raise ValueError(f"prompt_template {prompt_template!r} does not contain the placeholder {placeholder!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "training" and not isinstance(value, bool):  # nn.Module's train-mode flag
            raise TypeError("AudioToken.training is nn.Module's train/eval flag; "
                            "the training metadata is AudioToken.training_info")
        super().__setattr__(name, value)

    @property
    def keys(self) -> list[str]:
        return sorted(self.embedders)

    @property
    def widths(self) -> dict[str, int]:
        return {key: emb.output_dim for key, emb in self.embedders.items()}

    @property
    def feature_dim(self) -> int:
        return int(self.encoder["feature_dim"])

    def set_stochastic_pooling(self, enabled: bool) -> "AudioToken":
        """Reference-compatible random pooling (True) or deterministic (False, default)."""
        for embedder in self.embedders.values():
            embedder.set_stochastic_pooling(enabled)
        return self

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """features [B, N, feature_dim] (on the module's device and dtype) -> {key: [B, D_key]}."""
        return {key: embedder(features, padding_mask=padding_mask) for key, embedder in self.embedders.items()}

    @torch.no_grad()
    def embed(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None, source: str = "") -> AudioEmbedding:
        """Inference: features from any device -> AudioEmbedding of float32 CPU vectors, in the current mode."""
        weight = next(self.parameters())
        mask = None if padding_mask is None else padding_mask.to(weight.device)
        vectors = self(features.to(device=weight.device, dtype=weight.dtype), mask)
        return AudioEmbedding(vectors={k: v.float().cpu() for k, v in vectors.items()}, source=source)

    def extra_repr(self) -> str:
        return f"encoder={self.encoder}, placeholder={self.placeholder!r}, prompt_template={self.prompt_template!r}"


# --------------------------------------------------------------------------- saving


def weights_digest(token: AudioToken) -> str:
    """sha256 (hex) of every Embedder tensor: identifies the weights, not the file name.

    Equal digests mean bitwise-equal weights (across ranks, runs, renamed files).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(token.state_dict().items()):
        h.update(name[len(TENSOR_PREFIX):].encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_audiotoken(path: str | os.PathLike, token: AudioToken) -> None:
    """Write ``token`` as an AudioToken ``.safetensors`` file (atomically)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in token.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": json.dumps(token.encoder),
        "embedders": json.dumps({key: e.config.to_dict() for key, e in token.embedders.items()}),
        "placeholder": token.placeholder,
        "prompt_template": token.prompt_template,
        "training": json.dumps(token.training_info),
        "description": token.description,
    }
    save_safetensors(path, tensors, metadata)


# --------------------------------------------------------------------------- loading


def _guess_kind(names: Sequence[str], meta: Mapping[str, str]) -> str | None:
    """A guess at what a non-AudioToken safetensors file is, from its tensor names."""
    if meta.get("format") == "audiotoken-embedding":
        return "a saved audio embedding (load it with the audio-embedding loader)"
    name_set = set(names)
    if name_set and name_set <= set(REFERENCE_STATE_DICT_NAMES):
        return f"a bare reference Embedder state dict; convert it with the {IMPORT_HINT}"
    joined = "\n".join(names[:2000])
    if "lora" in joined.lower():
        return "a LoRA checkpoint"
    if any(s in joined for s in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders")):
        return "a Stable Diffusion checkpoint"
    if any(s in joined for s in ("down_blocks.", "up_blocks.", "conv_in.")):
        return "a diffusion UNet/VAE checkpoint"
    if "patch_embedding" in joined or "relative_attention_bias" in joined or "grep_linear" in joined:
        return "a BEATs audio-encoder checkpoint"
    if any(s in joined for s in ("text_model.", "cond_stage_model.", "transformer.resblocks")):
        return "a CLIP text-encoder checkpoint"
    if any(s in name_set for s in ("emb_params", "string_to_param", "clip_l", "clip_g")):
        return "a textual-inversion embedding"
    if any(s in joined for s in ("wav2vec2", "hubert", "audio_spectrogram_transformer", "feature_extractor.conv_layers",
                                 "encoder.conv2.", "audio_encoder.layers")):  # the last two: Whisper, CLAP
        return "an audio-encoder (transformers) checkpoint"
    return None


def _read_header(path: str, name: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor name -> shape) of an AudioToken file, refusing files of another kind."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise AudioTokenFileError(f"AudioToken file not found: {path}")
    try:
        if not is_safetensors(path):
            raise ValueError("no safetensors header")
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise AudioTokenFileError(
            f"{name} is not a safetensors file ({exc}); an AudioToken file is a .safetensors with metadata "
            f"format={FORMAT!r}. If it is the authors' embedder_learned_embeds.bin (a torch pickle), convert it "
            f"once with the {IMPORT_HINT}."
        ) from exc
    if meta.get("format") != FORMAT:
        guess = _guess_kind(list(shapes), meta)
        raise AudioTokenFileError(
            f"{name}: expected metadata format={FORMAT!r}, found {meta.get('format')!r}; "
            f"{f'this looks like {guess}' if guess else 'this is not an AudioToken file'}. Put AudioToken files "
            f"in {MODELS_FOLDER_HINT} and other checkpoints in their own folders."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise AudioTokenFileError(
            f"{name}: unsupported AudioToken format_version {meta.get('format_version')!r} (this code reads "
            f"version {FORMAT_VERSION!r}); update the AudioToken nodes"
        )
    return meta, shapes


def _json_field(meta: Mapping[str, str], field: str, name: str, default: Any = None) -> Any:
    raw = meta.get(field)
    if raw is None and default is not None:
        return default
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise AudioTokenFileError(f"{name}: AudioToken metadata field {field!r} is missing or not valid JSON: "
                                  f"{raw!r:.200}") from exc


def load_audiotoken(path: str | os.PathLike, *, stochastic_pooling: bool | None = None) -> AudioToken:
    """Read an AudioToken file -> a float32 CPU AudioToken in eval mode; every problem raises
    :class:`AudioTokenFileError`. ``stochastic_pooling`` overrides the mode stored in the file.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    name = os.path.basename(path)
    meta, shapes = _read_header(path, name)
    raw_configs, encoder, training = (_json_field(meta, f, name, d) for f, d in
                                      (("embedders", None), ("encoder", None), ("training", {})))
    try:
        if not isinstance(raw_configs, dict) or not raw_configs:
            raise ValueError(f"metadata 'embedders' must be a non-empty JSON object (key -> Embedder config), "
                             f"found {raw_configs!r:.200}")
        configs = {key: EmbedderConfig.from_dict(raw) for key, raw in raw_configs.items()}
        for cfg in configs.values():
            cfg.stochastic_pooling = cfg.stochastic_pooling if stochastic_pooling is None else bool(stochastic_pooling)
        with torch.device("meta"):
            token = AudioToken(
                {key: Embedder(cfg) for key, cfg in configs.items()},
                encoder=encoder,
                placeholder=meta.get("placeholder", "<audio>"),
                prompt_template=meta.get("prompt_template", "a photo of <audio>"),
                training=training,
                description=meta.get("description", ""),
            )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise AudioTokenFileError(f"{name}: {exc}") from exc
    problems = state_dict_problems(shapes, {n: tuple(t.shape) for n, t in token.state_dict().items()})
    if not problems:
        tensors = load_file(path, device="cpu")
        problems = [f"{n} is not a finite float tensor (NaN, Inf or integers)" for n, t in tensors.items()
                    if not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if problems:
        raise AudioTokenFileError(f"{name}: inconsistent AudioToken file: " + "; ".join(problems))
    token.load_state_dict({n: t.float() for n, t in tensors.items()}, assign=True)
    return token.eval()


# --------------------------------------------------------------------------- reference import


# The authors publish no checksum; this is the git object id of output/embedder_learned_embeds.bin in
# guyyariv/AudioToken (one commit, May 2023, not Git LFS): `git hash-object` of an intact download.
AUTHORS_RELEASE_GIT_BLOB_ID = "5d1f5c101e5b5e1fdf5637a2e372b0d441b09639"


def _find_reference_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The 13 Embedder tensors inside a loaded checkpoint, nested under keys or prefixed (``module.``)."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str, depth: int) -> None:
        if isinstance(value, Mapping) and depth <= 5:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.", depth + 1)
        else:
            flat[prefix[:-1]] = value

    walk(obj, "", 0)
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    prefixes = sorted({k[: -len("fc1.weight")] for k in tensors if k == "fc1.weight" or k.endswith(".fc1.weight")})
    if len(prefixes) != 1:
        found = f"several (under {prefixes[:5]})" if prefixes else f"none among {len(tensors)} tensor(s) {sorted(tensors)[:5]}"
        raise AudioTokenFileError(f"{name}: expected one reference Embedder state dict (13 tensors such as "
                                  f"'fc1.weight', 'fga.reduce_potentials.0.weight'), found {found}")
    return {k[len(prefixes[0]):]: v for k, v in flat.items() if k.startswith(prefixes[0])}


def import_reference_embedder(
    path: str | os.PathLike,
    *,
    encoder: dict | None = None,
    placeholder: str = "<audio>",
    prompt_template: str = "a photo of <audio>",
    key: str | None = None,
    description: str | None = None,
) -> AudioToken:
    """Convert the reference ``embedder_learned_embeds.bin`` into an :class:`AudioToken`.

    The pickle is read weights-only (:func:`load_torch_weights_only`: a file that carries code is
    refused with ``UnsafeFileError``); a safetensors file with the same tensors is accepted too. The
    13-tensor state dict may be nested under keys (``{"state_dict": ...}``) or prefixed (``module.``);
    sizes come from ``fc1``/``fc2``. The text-encoder key follows from the width (768 -> ``l``,
    1024 -> ``h``, 1280 -> ``g``) unless given; ``encoder`` defaults to BEATs layers 4, 8, 12. The
    training metadata records the file's git object id and whether it is the authors' release
    (``authors_release``: the id equals AUTHORS_RELEASE_GIT_BLOB_ID; a retrained .bin of your own is not).
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise AudioTokenFileError(f"reference embedder file not found: {path}")
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise AudioTokenFileError(f"{name}: unreadable safetensors file: {exc}") from exc
    else:
        obj = load_torch_weights_only(path, "the reference embedder_learned_embeds.bin")
    state = _find_reference_state_dict(obj, name)
    blob_id = git_blob_id(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()
           or not bool(torch.isfinite(v).all())]
    if bad:
        raise AudioTokenFileError(f"{name}: {', '.join(map(repr, bad[:5]))} next to the Embedder "
                                  "is not a finite float tensor")
    try:
        embedder = Embedder.from_state_dict(state)
        key = key or REFERENCE_KEY_BY_WIDTH.get(embedder.output_dim)
        if key is None:
            raise ValueError(f"output width {embedder.output_dim} matches no known text encoder "
                             f"({REFERENCE_KEY_BY_WIDTH}); pass key= explicitly")
        return AudioToken(
            {key: embedder},
            encoder=encoder,
            placeholder=placeholder,
            prompt_template=prompt_template,
            training={
                "origin": "reference",
                "reference_repository": "guyyariv/AudioToken",
                "imported_from": name,
                "git_blob_id": blob_id,
                "authors_release": blob_id == AUTHORS_RELEASE_GIT_BLOB_ID,
                "base_model": {768: "CompVis/stable-diffusion-v1-4"}.get(embedder.output_dim, "unknown"),
            },
            description=description if description is not None else (
                f"AudioToken reference Embedder ({embedder.input_dim} -> {embedder.output_dim}) imported from {name}"),
        )
    except ValueError as exc:
        raise AudioTokenFileError(f"{name}: {exc}") from exc
