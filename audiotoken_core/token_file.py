"""The AudioToken weights file (``.safetensors``) and the reference-checkpoint importer.

File layout (format_version "1"):

* tensors ``embedders.<key>.<reference state-dict name>`` for each text-encoder key the
  token serves (``l`` CLIP-L 768, ``h`` OpenCLIP-H 1024, ``g`` OpenCLIP-bigG 1280);
* metadata (all strings): ``format`` = ``audiotoken``, ``format_version`` = ``1``,
  ``encoder`` (JSON audio-encoder spec, e.g. ``{"kind": "beats", "layers": [4, 8, 12],
  "hidden_size": 768, "sample_rate": 16000, "feature_dim": 2304}``), ``embedders``
  (JSON: key -> EmbedderConfig dict), ``placeholder``, ``prompt_template``,
  ``training`` (JSON), ``description``.

The released reference weights (``embedder_learned_embeds.bin``, a torch pickle of the
13-tensor FGAEmbedder state dict, SD 1.4 / width 768) are read only with
``torch.load(weights_only=True)`` by :func:`import_reference_embedder`, also available
as ``python -m audiotoken_core.token_file import-reference IN.bin OUT.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .embedder import (
    REFERENCE_STATE_DICT_NAMES,
    Embedder,
    EmbedderConfig,
    infer_dims,
    reference_state_dict_shapes,
    state_dict_problems,
)
from .audio import TARGET_SAMPLE_RATE
from .beats import BEATsConfig
from .embedding import AudioEmbedding
from .encoders import DEFAULT_BEATS_LAYERS

__all__ = [
    "AudioToken",
    "AudioTokenFileError",
    "save_audiotoken",
    "load_audiotoken",
    "import_reference_embedder",
    "encoder_feature_dim",
    "DEFAULT_ENCODER",
    "FORMAT",
    "FORMAT_VERSION",
    "REFERENCE_KEY_BY_WIDTH",
    "main",
]

FORMAT = "audiotoken"
FORMAT_VERSION = "1"
TENSOR_PREFIX = "embedders."
MODELS_FOLDER_HINT = "models/audiotoken"
# The reference setup: BEATs (iter3+, AS2M fine-tuned), layers 4, 8, 12 concatenated.
DEFAULT_ENCODER: dict[str, Any] = {
    "kind": "beats",
    "layers": list(DEFAULT_BEATS_LAYERS),
    "hidden_size": BEATsConfig().encoder_embed_dim,
    "sample_rate": TARGET_SAMPLE_RATE,
}
# Text-encoder key served by a reference Embedder of a given output width.
REFERENCE_KEY_BY_WIDTH = {768: "l", 1024: "h", 1280: "g"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")


class AudioTokenFileError(ValueError):
    """A file is missing, unreadable, of another kind, or inconsistent."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encoder_feature_dim(spec: Mapping[str, Any]) -> int:
    """Feature width F of an audio-encoder spec: ``hidden_size * len(layers)``.

    A spec without ``hidden_size``/``layers`` must give ``feature_dim``; when both are
    present they must agree. Raises ValueError otherwise.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"encoder spec must be a dict, got {type(spec).__name__}")
    if not isinstance(spec.get("kind"), str) or not spec.get("kind"):
        raise ValueError(f"encoder spec needs a non-empty string 'kind', got {spec.get('kind')!r}")
    computed = None
    if "hidden_size" in spec or "layers" in spec:
        hidden, layers = spec.get("hidden_size"), spec.get("layers")
        if not _is_int(hidden) or hidden < 1:
            raise ValueError(f"encoder 'hidden_size' must be a positive int, got {hidden!r}")
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or not all(_is_int(layer) and layer >= 0 for layer in layers)
        ):
            raise ValueError(f"encoder 'layers' must be a non-empty list of ints, got {layers!r}")
        computed = hidden * len(layers)
    given = spec.get("feature_dim")
    if given is not None and (not _is_int(given) or given < 1):
        raise ValueError(f"encoder 'feature_dim' must be a positive int, got {given!r}")
    if computed is not None and given is not None and computed != given:
        raise ValueError(
            f"encoder feature_dim {given} disagrees with hidden_size x len(layers) = {computed}"
        )
    if computed is None and given is None:
        raise ValueError("encoder spec needs 'hidden_size' and 'layers' (or 'feature_dim')")
    return computed if computed is not None else given


def _json_dict(value: Any, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from exc


@dataclass(eq=False)
class AudioToken:
    """One trained AudioToken: an Embedder per text-encoder key, plus how to use it.

    ``encoder`` is the audio-encoder spec whose features the Embedders read; its
    ``feature_dim`` (``hidden_size * len(layers)``, filled in if absent) must equal every
    Embedder's ``input_dim``. ``prompt_template`` must contain ``placeholder``.
    Raises ValueError on inconsistent arguments.
    """

    embedders: dict[str, Embedder]
    encoder: dict = field(default_factory=lambda: dict(DEFAULT_ENCODER))
    placeholder: str = "<audio>"
    prompt_template: str = "a photo of <audio>"
    training: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.embedders, Mapping) or not self.embedders:
            raise ValueError("an AudioToken needs at least one Embedder")
        self.encoder = _json_dict(self.encoder, "encoder spec")
        feature_dim = encoder_feature_dim(self.encoder)
        self.encoder["feature_dim"] = feature_dim
        for key, embedder in self.embedders.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ValueError(
                    f"text-encoder key {key!r} must be a non-empty string of letters, digits or _"
                )
            if not isinstance(embedder, Embedder):
                raise ValueError(f"embedders[{key!r}] is a {type(embedder).__name__}, not an Embedder")
            if embedder.input_dim != feature_dim:
                raise ValueError(
                    f"embedder {key!r} reads features of width {embedder.input_dim} but the "
                    f"encoder {self.encoder.get('kind')!r} gives feature_dim {feature_dim}"
                )
        self.embedders = dict(self.embedders)
        for name in ("placeholder", "prompt_template", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"AudioToken.{name} must be a str")
        if not self.placeholder.strip():
            raise ValueError("AudioToken.placeholder must not be empty")
        if self.placeholder not in self.prompt_template:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} does not contain the placeholder "
                f"{self.placeholder!r}"
            )
        self.training = _json_dict(self.training, "training metadata")

    @property
    def keys(self) -> list[str]:
        return sorted(self.embedders)

    @property
    def widths(self) -> dict[str, int]:
        return {key: emb.output_dim for key, emb in self.embedders.items()}

    @property
    def feature_dim(self) -> int:
        return int(self.encoder["feature_dim"])

    @property
    def device(self) -> torch.device:
        return next(iter(self.embedders.values())).fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.embedders.values())).fc1.weight.dtype

    def to(self, *args: Any, **kwargs: Any) -> "AudioToken":
        """Move/cast every Embedder (same arguments as ``nn.Module.to``); returns self."""
        for embedder in self.embedders.values():
            embedder.to(*args, **kwargs)
        return self

    def eval(self) -> "AudioToken":
        for embedder in self.embedders.values():
            embedder.eval()
        return self

    def set_stochastic_pooling(self, enabled: bool) -> "AudioToken":
        """Reference-compatible random pooling (True) or deterministic (False, default)."""
        for embedder in self.embedders.values():
            embedder.set_stochastic_pooling(enabled)
        return self

    @torch.no_grad()
    def embed(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        source: str = "",
    ) -> AudioEmbedding:
        """Run every Embedder on features [B, N, feature_dim] -> AudioEmbedding {key: [B, D]}.

        Features are moved to the Embedders' device and dtype; the Embedders run in
        their current mode (loaded tokens are in eval mode).
        """
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"AudioToken expects features [B, N, {self.feature_dim}] from encoder "
                f"{self.encoder.get('kind')!r}, got {list(features.shape)}"
            )
        vectors = {}
        for key, embedder in self.embedders.items():
            p = embedder.fc1.weight
            x = features.to(device=p.device, dtype=p.dtype)
            mask = None if padding_mask is None else padding_mask.to(p.device)
            vectors[key] = embedder(x, padding_mask=mask).float().cpu()
        return AudioEmbedding(vectors=vectors, source=source)

    def __repr__(self) -> str:
        return (
            f"AudioToken(widths={self.widths}, encoder={self.encoder}, "
            f"placeholder={self.placeholder!r}, prompt_template={self.prompt_template!r})"
        )


# --------------------------------------------------------------------------- saving


def weights_digest(token: AudioToken) -> str:
    """sha256 (hex) of every Embedder tensor: identifies the weights, not the file name.

    Equal digests mean bitwise-equal weights (across ranks, runs, renamed files).
    """
    import hashlib

    h = hashlib.sha256()
    for key, embedder in sorted(token.embedders.items()):
        for name, tensor in sorted(embedder.state_dict().items()):
            h.update(f"{key}.{name}".encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_audiotoken(path: str | os.PathLike, token: AudioToken) -> None:
    """Write ``token`` as an AudioToken ``.safetensors`` file (atomically)."""
    from safetensors.torch import save_file

    if not isinstance(token, AudioToken):
        raise ValueError(f"save_audiotoken expects an AudioToken, got {type(token).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for key, embedder in token.embedders.items():
        configs[key] = embedder.config.to_dict()
        for name, tensor in embedder.state_dict().items():
            tensors[f"{TENSOR_PREFIX}{key}.{name}"] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": json.dumps(token.encoder),
        "embedders": json.dumps(configs),
        "placeholder": token.placeholder,
        "prompt_template": token.prompt_template,
        "training": json.dumps(token.training),
        "description": token.description,
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- loading


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def _sniff(path: str) -> str:
    """'safetensors', 'pickle' or 'unknown' from the first bytes of a file."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    # safetensors first: its little-endian header length may well start with 0x80.
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _guess_kind(names: Sequence[str], meta: Mapping[str, str]) -> str | None:
    """A guess at what a non-AudioToken safetensors file is, from its tensor names."""
    if meta.get("format") == "audiotoken-embedding":
        return "a saved audio embedding (load it with the audio-embedding loader)"
    name_set = set(names)
    if name_set and name_set <= set(REFERENCE_STATE_DICT_NAMES):
        return (
            "a bare reference Embedder state dict; convert it with "
            "`python -m audiotoken_core.token_file import-reference IN OUT.safetensors`"
        )
    joined = "\n".join(names[:2000])
    lower = joined.lower()
    if "lora" in lower:
        return "a LoRA checkpoint"
    if any(s in joined for s in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders")):
        return "a Stable Diffusion checkpoint"
    if any(s in joined for s in ("down_blocks.", "up_blocks.", "conv_in.")):
        return "a diffusion UNet/VAE checkpoint"
    if any(s in joined for s in ("post_extract_proj", "patch_embedding", "encoder.layers.")) and (
        "relative_attention_bias" in joined or "grep_linear" in joined or "patch_embedding" in joined
    ):
        return "a BEATs audio-encoder checkpoint"
    if any(s in joined for s in ("text_model.", "cond_stage_model.", "transformer.resblocks")):
        return "a CLIP text-encoder checkpoint"
    if any(s in name_set for s in ("emb_params", "string_to_param", "clip_l", "clip_g")):
        return "a textual-inversion embedding"
    if any(s in joined for s in ("wav2vec2", "hubert", "audio_spectrogram_transformer", "feature_extractor.conv_layers")):
        return "an audio-encoder (transformers) checkpoint"
    return None


def _parse_json_field(meta: Mapping[str, str], name: str, path: str, default: Any = None) -> Any:
    raw = meta.get(name)
    if raw is None:
        if default is not None:
            return default
        raise AudioTokenFileError(f"{path}: AudioToken metadata field {name!r} is missing")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AudioTokenFileError(
            f"{path}: AudioToken metadata field {name!r} is not valid JSON ({exc}): {raw[:200]!r}"
        ) from exc


def _build_embedder(
    config: EmbedderConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> Embedder:
    with torch.device("meta"):
        embedder = Embedder(config)
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    embedder.load_state_dict(tensors, strict=True, assign=True)
    return embedder.eval()


def load_audiotoken(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    stochastic_pooling: bool | None = None,
) -> AudioToken:
    """Read an AudioToken file; every problem raises :class:`AudioTokenFileError`.

    ``dtype`` casts the weights (None keeps the file's); ``stochastic_pooling``
    overrides the mode stored in the file. The Embedders are returned in eval mode.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise AudioTokenFileError(f"AudioToken file not found: {path}")
    if not os.path.isfile(path):
        raise AudioTokenFileError(f"AudioToken path is not a file: {path}")
    kind = _sniff(path)
    if kind == "pickle":
        raise AudioTokenFileError(
            f"{name} is a torch pickle, not a safetensors AudioToken file (expected a "
            f".safetensors file with metadata format={FORMAT!r}). If it is the reference "
            "embedder_learned_embeds.bin, convert it once with: python -m "
            f"audiotoken_core.token_file import-reference {name} OUT.safetensors"
        )
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise AudioTokenFileError(
            f"{name} is not a safetensors file (expected an AudioToken .safetensors with "
            f"metadata format={FORMAT!r}): {exc}"
        ) from exc
    with handle as f:
        meta = dict(f.metadata() or {})
        names = list(f.keys())
        fmt = meta.get("format")
        if fmt != FORMAT:
            guess = _guess_kind(names, meta)
            what = f"this looks like {guess}, not an AudioToken file" if guess else (
                "this is not an AudioToken file"
            )
            raise AudioTokenFileError(
                f"{name}: expected metadata format={FORMAT!r}, found {fmt!r}; {what}. "
                f"Put AudioToken files (format={FORMAT!r}) in {MODELS_FOLDER_HINT} and other "
                "checkpoints in their own folders."
            )
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise AudioTokenFileError(
                f"{name}: unsupported AudioToken format_version {version!r} (this code reads "
                f"version {FORMAT_VERSION!r}); update the AudioToken nodes"
            )
        encoder = _parse_json_field(meta, "encoder", name)
        configs_raw = _parse_json_field(meta, "embedders", name)
        training = _parse_json_field(meta, "training", name, default={})
        if not isinstance(configs_raw, dict) or not configs_raw:
            raise AudioTokenFileError(
                f"{name}: metadata 'embedders' must be a non-empty JSON object "
                f"(key -> Embedder config), found {configs_raw!r}"
            )
        try:
            feature_dim = encoder_feature_dim(encoder)
        except ValueError as exc:
            raise AudioTokenFileError(f"{name}: bad encoder metadata: {exc}") from exc

        configs: dict[str, EmbedderConfig] = {}
        for key, raw in configs_raw.items():
            if not _KEY_RE.match(key):
                raise AudioTokenFileError(f"{name}: invalid text-encoder key {key!r} in metadata")
            try:
                configs[key] = EmbedderConfig.from_dict(raw)
            except (TypeError, ValueError) as exc:
                raise AudioTokenFileError(f"{name}: bad Embedder config for key {key!r}: {exc}") from exc
            if configs[key].input_dim != feature_dim:
                raise AudioTokenFileError(
                    f"{name}: embedder {key!r} expects features of width "
                    f"{configs[key].input_dim} but the encoder {encoder.get('kind')!r} "
                    f"(layers {encoder.get('layers')}) gives feature_dim {feature_dim}"
                )
            if stochastic_pooling is not None:
                configs[key].stochastic_pooling = bool(stochastic_pooling)

        # Names and shapes, from the header only.
        expected: dict[str, tuple[int, ...]] = {}
        for key, cfg in configs.items():
            for tname, shape in reference_state_dict_shapes(cfg.input_dim, cfg.output_dim).items():
                expected[f"{TENSOR_PREFIX}{key}.{tname}"] = shape
        missing = sorted(set(expected) - set(names))
        unexpected = sorted(set(names) - set(expected))
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensor(s): {_few(unexpected)}")
        for tname, shape in expected.items():
            if tname in names:
                found = tuple(f.get_slice(tname).get_shape())
                if found != shape:
                    problems.append(f"{tname}: expected shape {list(shape)}, found {list(found)}")
        if problems:
            raise AudioTokenFileError(f"{name}: inconsistent AudioToken file: " + "; ".join(problems))

        embedders: dict[str, Embedder] = {}
        for key, cfg in configs.items():
            state = {}
            for tname in REFERENCE_STATE_DICT_NAMES:
                full = f"{TENSOR_PREFIX}{key}.{tname}"
                tensor = f.get_tensor(full)
                if not tensor.is_floating_point():
                    raise AudioTokenFileError(f"{name}: {full} has dtype {tensor.dtype}, expected a float")
                if not bool(torch.isfinite(tensor).all()):
                    raise AudioTokenFileError(f"{name}: {full} contains NaN or Inf")
                state[tname] = tensor
            embedders[key] = _build_embedder(cfg, state, dtype).to(device)

    try:
        return AudioToken(
            embedders=embedders,
            encoder=encoder,
            placeholder=meta.get("placeholder", "<audio>"),
            prompt_template=meta.get("prompt_template", "a photo of <audio>"),
            training=training,
            description=meta.get("description", ""),
        )
    except ValueError as exc:
        raise AudioTokenFileError(f"{name}: {exc}") from exc


# --------------------------------------------------------------------------- reference import


def _flatten(obj: Any, prefix: str = "", depth: int = 0, out: dict | None = None) -> dict[str, Any]:
    """Nested mappings -> {dotted name: leaf} (at most 5 levels)."""
    out = {} if out is None else out
    if isinstance(obj, Mapping) and depth <= 5:
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", depth + 1, out)
    else:
        out[prefix[:-1]] = obj
    return out


def _find_reference_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise AudioTokenFileError(
            f"{name}: expected a state dict (a mapping of tensor names to tensors), "
            f"found a {type(obj).__name__}"
        )
    flat = _flatten(obj)
    anchor = "fc1.weight"
    prefixes = sorted(
        {
            k[: -len(anchor)]
            for k, v in flat.items()
            if isinstance(v, torch.Tensor) and (k == anchor or k.endswith("." + anchor))
        }
    )
    found = sorted(k for k, v in flat.items() if isinstance(v, torch.Tensor))
    if not prefixes:
        raise AudioTokenFileError(
            f"{name}: no reference Embedder found (expected the 13 tensors "
            f"{_few(list(REFERENCE_STATE_DICT_NAMES), 3)}; found {len(found)} tensor(s): "
            f"{_few(found)})"
        )
    if len(prefixes) > 1:
        raise AudioTokenFileError(
            f"{name}: several Embedder state dicts found (under {_few(prefixes)}); "
            "extract the one to import first"
        )
    prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise AudioTokenFileError(f"{name}: non-tensor entries next to the Embedder: {_few(bad)}")
    return state


def _read_checkpoint(path: str) -> Any:
    name = os.path.basename(path)
    if _sniff(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise AudioTokenFileError(f"{name}: unreadable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports every weights_only failure as UnpicklingError; tell a refused
        # Python object apart from a corrupt file, and quote only torch's own detail
        # (never its advice to retry with weights_only=False).
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise AudioTokenFileError(
                f"{name}: refused to load: it holds a Python object ({refused.group(1)}) "
                "besides tensors and plain containers, and checkpoints are only read with "
                "torch.load(weights_only=True), never by unrestricted unpickling"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        raise AudioTokenFileError(
            f"{name}: not a readable torch checkpoint (expected the reference "
            "embedder_learned_embeds.bin, read with torch.load(weights_only=True)): "
            f"{detail.group(1).strip() if detail else type(exc).__name__}"
        ) from exc
    except Exception as exc:
        raise AudioTokenFileError(
            f"{name}: not a readable torch checkpoint (expected the reference "
            f"embedder_learned_embeds.bin): {type(exc).__name__}: {exc}"
        ) from exc


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

    The file is read with ``torch.load(weights_only=True, map_location="cpu")`` only
    (a safetensors file with the same tensors is accepted too). The 13-tensor state dict
    may be nested under keys (e.g. ``{"state_dict": ...}``) or prefixed
    (``module.``); sizes are inferred from ``fc1``/``fc2``. The text-encoder key is
    inferred from the width (768 -> ``l``, 1024 -> ``h``, 1280 -> ``g``) unless given.
    ``encoder`` defaults to BEATs layers 4, 8, 12 (hidden 768 -> 2304 features).
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise AudioTokenFileError(f"reference embedder file not found: {path}")
    state = _find_reference_state_dict(_read_checkpoint(path), name)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        input_dim, output_dim = infer_dims(shapes)
    except ValueError as exc:
        problems = state_dict_problems(shapes, 1, 1)
        raise AudioTokenFileError(f"{name}: {exc}; " + "; ".join(problems[:2])) from exc
    problems = state_dict_problems(shapes, input_dim, output_dim)
    if problems:
        raise AudioTokenFileError(
            f"{name}: not a reference Embedder state dict: " + "; ".join(problems)
        )
    for tname, tensor in state.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise AudioTokenFileError(f"{name}: {tname} is not a finite float tensor")
    encoder = dict(DEFAULT_ENCODER) if encoder is None else dict(encoder)
    try:
        feature_dim = encoder_feature_dim(encoder)
    except ValueError as exc:
        raise AudioTokenFileError(f"bad encoder spec: {exc}") from exc
    if feature_dim != input_dim:
        raise AudioTokenFileError(
            f"{name}: the Embedder reads features of width {input_dim} but the encoder spec "
            f"{encoder} gives {feature_dim}; pass the matching encoder spec"
        )
    if key is None:
        key = REFERENCE_KEY_BY_WIDTH.get(output_dim)
        if key is None:
            raise AudioTokenFileError(
                f"{name}: output width {output_dim} matches no known text encoder "
                f"({REFERENCE_KEY_BY_WIDTH}); pass key= explicitly"
            )
    embedder = _build_embedder(
        EmbedderConfig(input_dim=input_dim, output_dim=output_dim), state, torch.float32
    )
    base = {768: "CompVis/stable-diffusion-v1-4"}.get(output_dim, "unknown")
    training = {
        "origin": "reference",
        "reference_repository": "guyyariv/AudioToken",
        "imported_from": name,
        "base_model": base,
    }
    if description is None:
        description = (
            f"AudioToken reference Embedder ({input_dim} -> {output_dim}) imported from {name}"
        )
    try:
        return AudioToken(
            embedders={key: embedder},
            encoder=encoder,
            placeholder=placeholder,
            prompt_template=prompt_template,
            training=training,
            description=description,
        )
    except ValueError as exc:
        raise AudioTokenFileError(str(exc)) from exc


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audiotoken_core.token_file",
        description="AudioToken file tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-reference",
        help="convert the reference embedder_learned_embeds.bin to an AudioToken .safetensors",
    )
    imp.add_argument("input", help="reference checkpoint (torch pickle, read with weights_only=True)")
    imp.add_argument("output", help="AudioToken file to write (.safetensors)")
    imp.add_argument("--key", default=None, help="text-encoder key (default: from the width)")
    imp.add_argument("--placeholder", default="<audio>")
    imp.add_argument("--prompt-template", default="a photo of <audio>")
    imp.add_argument("--description", default=None)
    imp.add_argument("--encoder", default=None, help="encoder spec as JSON (default: BEATs 4,8,12)")
    imp.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    info = sub.add_parser("info", help="print an AudioToken file's metadata")
    info.add_argument("path")
    args = parser.parse_args(argv)

    try:
        if args.command == "import-reference":
            if os.path.exists(args.output) and not args.force:
                print(f"error: {args.output} exists (use --force to overwrite)", file=sys.stderr)
                return 1
            encoder = None
            if args.encoder is not None:
                try:
                    encoder = json.loads(args.encoder)
                except json.JSONDecodeError as exc:
                    print(f"error: --encoder is not valid JSON: {exc}", file=sys.stderr)
                    return 1
            token = import_reference_embedder(
                args.input,
                encoder=encoder,
                placeholder=args.placeholder,
                prompt_template=args.prompt_template,
                key=args.key,
                description=args.description,
            )
            save_audiotoken(args.output, token)
            print(f"wrote {args.output}: widths {token.widths}, encoder {token.encoder}")
        else:
            token = load_audiotoken(args.path)
            n_params = {
                k: sum(p.numel() for p in e.parameters()) for k, e in token.embedders.items()
            }
            print(json.dumps(
                {
                    "widths": token.widths,
                    "parameters": n_params,
                    "encoder": token.encoder,
                    "placeholder": token.placeholder,
                    "prompt_template": token.prompt_template,
                    "training": token.training,
                    "description": token.description,
                },
                indent=2,
            ))
    except (AudioTokenFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
