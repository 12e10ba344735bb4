"""Audio embeddings: the word vectors for one or more clips, keyed by text encoder.

An :class:`AudioEmbedding` holds ``{text-encoder key: [B, D] float32 CPU tensor}``
(``"l"`` = CLIP-L 768, ``"h"`` = OpenCLIP-H 1024, ``"g"`` = OpenCLIP-bigG 1280) and a
human-readable ``source``. It can be blended with others and saved as a small
``.safetensors`` file (tensors ``vectors.<key>``, metadata ``format`` =
``audiotoken-embedding``, ``format_version``, ``source`` and any caller metadata).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = [
    "AudioEmbedding",
    "blend_embeddings",
    "save_embedding",
    "load_embedding",
    "EMBEDDING_FORMAT",
    "EMBEDDING_FORMAT_VERSION",
]

EMBEDDING_FORMAT = "audiotoken-embedding"
EMBEDDING_FORMAT_VERSION = "1"
_TENSOR_PREFIX = "vectors."
_RESERVED_METADATA = ("format", "format_version", "source")


@dataclass(eq=False)
class AudioEmbedding:
    """Vectors ``{key: [B, D]}`` for B clips; every key has the same B.

    Tensors are detached and converted to float32 on the CPU. Raises ValueError for an
    empty dict, a non-string key, a non-tensor or non-2-D value, mismatched batch sizes
    or non-finite values.
    """

    vectors: dict[str, torch.Tensor]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("AudioEmbedding needs at least one text-encoder key, got none")
        if not isinstance(self.source, str):
            raise ValueError(f"AudioEmbedding.source must be a str, got {type(self.source).__name__}")
        clean: dict[str, torch.Tensor] = {}
        batch: int | None = None
        first_key = None
        for key, value in self.vectors.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"AudioEmbedding keys must be non-empty strings, got {key!r}")
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"AudioEmbedding vector {key!r} must be a torch.Tensor, got {type(value).__name__}"
                )
            if value.dim() != 2:
                raise ValueError(
                    f"AudioEmbedding vector {key!r} must be 2-D [B, D], got shape {list(value.shape)}"
                )
            if value.shape[0] < 1 or value.shape[1] < 1:
                raise ValueError(
                    f"AudioEmbedding vector {key!r} is empty (shape {list(value.shape)})"
                )
            if batch is None:
                batch, first_key = int(value.shape[0]), key
            elif int(value.shape[0]) != batch:
                raise ValueError(
                    f"AudioEmbedding batch sizes differ: {first_key!r} has {batch}, "
                    f"{key!r} has {int(value.shape[0])}"
                )
            tensor = value.detach().to(device="cpu", dtype=torch.float32)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"AudioEmbedding vector {key!r} contains NaN or Inf")
            clean[key] = tensor.contiguous()
        self.vectors = clean

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(value.shape[1]) for key, value in self.vectors.items()}

    @property
    def keys(self) -> list[str]:
        return sorted(self.vectors)

    def __repr__(self) -> str:
        return f"AudioEmbedding(batch={self.batch_size}, widths={self.widths}, source={self.source!r})"


def _describe(emb: AudioEmbedding, index: int) -> str:
    return f"embedding {index} ({emb.source!r})" if emb.source else f"embedding {index}"


def blend_embeddings(
    embeddings: Sequence[AudioEmbedding],
    weights: Sequence[float],
    normalize_weights: bool = True,
) -> AudioEmbedding:
    """Weighted mix ``sum_i w_i * e_i`` of embeddings with the same keys and widths.

    With ``normalize_weights`` the weights are divided by their sum (which must not be
    0). Batch sizes must be equal or 1 (a batch of 1 is broadcast to the others).
    """
    embeddings = list(embeddings)
    weights = [float(w) for w in weights]
    if not embeddings:
        raise ValueError("blend_embeddings needs at least one embedding")
    if len(weights) != len(embeddings):
        raise ValueError(
            f"blend_embeddings got {len(embeddings)} embeddings but {len(weights)} weights"
        )
    for i, emb in enumerate(embeddings):
        if not isinstance(emb, AudioEmbedding):
            raise ValueError(f"blend_embeddings item {i} is a {type(emb).__name__}, not an AudioEmbedding")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"blend weights must be finite, got {weights}")
    if normalize_weights:
        total = math.fsum(weights)
        if abs(total) < 1e-12:
            raise ValueError(
                f"blend weights {weights} sum to 0 and cannot be normalised; "
                "change a weight or turn normalisation off"
            )
        weights = [w / total for w in weights]

    ref = embeddings[0]
    ref_widths = ref.widths
    for i, emb in enumerate(embeddings[1:], start=1):
        if set(emb.widths) != set(ref_widths):
            raise ValueError(
                f"cannot blend: {_describe(ref, 0)} has text-encoder keys {sorted(ref_widths)} "
                f"but {_describe(emb, i)} has {sorted(emb.widths)}"
            )
        for key, width in emb.widths.items():
            if width != ref_widths[key]:
                raise ValueError(
                    f"cannot blend: key {key!r} has width {ref_widths[key]} in {_describe(ref, 0)} "
                    f"but {width} in {_describe(emb, i)}"
                )
    batches = [emb.batch_size for emb in embeddings]
    target = max(batches)
    for i, b in enumerate(batches):
        if b not in (1, target):
            raise ValueError(
                f"cannot blend batch sizes {batches}: each must be {target} or 1 "
                f"({_describe(embeddings[i], i)} has {b})"
            )

    vectors: dict[str, torch.Tensor] = {}
    for key in ref_widths:
        acc = torch.zeros(target, ref_widths[key], dtype=torch.float32)
        for emb, w in zip(embeddings, weights):
            acc = acc + w * emb.vectors[key].expand(target, -1)
        vectors[key] = acc
    parts = [f"{w:.3g}*{emb.source or f'#{i}'}" for i, (emb, w) in enumerate(zip(embeddings, weights))]
    source = "blend(" + " + ".join(parts) + ")"
    return AudioEmbedding(vectors=vectors, source=source)


def save_embedding(
    path: str | os.PathLike, emb: AudioEmbedding, metadata: dict | None = None
) -> None:
    """Write ``emb`` as safetensors (tensors ``vectors.<key>``).

    ``metadata`` values that are not strings are stored as JSON; the keys ``format``,
    ``format_version`` and ``source`` are reserved.
    """
    from safetensors.torch import save_file

    if not isinstance(emb, AudioEmbedding):
        raise ValueError(f"save_embedding expects an AudioEmbedding, got {type(emb).__name__}")
    meta: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    meta.update(format=EMBEDDING_FORMAT, format_version=EMBEDDING_FORMAT_VERSION, source=emb.source)
    tensors = {_TENSOR_PREFIX + k: v.contiguous() for k, v in emb.vectors.items()}
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_embedding(path: str | os.PathLike) -> AudioEmbedding:
    """Read a file written by :func:`save_embedding`. Raises ValueError on any problem."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"audio embedding file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            fmt = meta.get("format")
            if fmt != EMBEDDING_FORMAT:
                raise ValueError(
                    f"{os.path.basename(path)} is not an audio embedding file: expected metadata "
                    f"format={EMBEDDING_FORMAT!r}, found {fmt!r}"
                )
            bad = [n for n in names if not n.startswith(_TENSOR_PREFIX)]
            if bad:
                raise ValueError(f"unexpected tensors in audio embedding file: {bad[:5]}")
            vectors = {n[len(_TENSOR_PREFIX):]: f.get_tensor(n) for n in names}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    return AudioEmbedding(vectors=vectors, source=meta.get("source", ""))
