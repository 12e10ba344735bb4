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
from typing import Sequence

import torch

from .io import save_safetensors

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


@dataclass(eq=False)
class AudioEmbedding:
    """Vectors ``{key: [B, D]}`` for B clips (every key has the same B), stored detached as float32
    on the CPU. Files are checked by :func:`load_embedding`; vectors made in code are trusted."""

    vectors: dict[str, torch.Tensor]
    source: str = ""

    def __post_init__(self) -> None:
        self.vectors = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in self.vectors.items()}

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
        if emb.widths != ref_widths:
            raise ValueError(
                f"cannot blend: {_describe(ref, 0)} has text-encoder widths {ref_widths} but {_describe(emb, i)} "
                f"has {emb.widths}; blend embeddings made for the same model family"
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


def save_embedding(path: str | os.PathLike, emb: AudioEmbedding, metadata: dict | None = None) -> None:
    """Write ``emb`` as safetensors (tensors ``vectors.<key>``), atomically.

    ``metadata`` values that are not strings are stored as JSON; ``format``, ``format_version``
    and ``source`` are always this file's own.
    """
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(format=EMBEDDING_FORMAT, format_version=EMBEDDING_FORMAT_VERSION, source=emb.source)
    save_safetensors(path, {_TENSOR_PREFIX + k: v for k, v in emb.vectors.items()}, meta)


def load_embedding(path: str | os.PathLike) -> AudioEmbedding:
    """Read a file written by :func:`save_embedding`. Raises ValueError naming any problem."""
    from safetensors import safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"audio embedding file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ValueError(f"{name} is not a readable safetensors file: {exc}") from exc
    problems = [] if meta.get("format") == EMBEDDING_FORMAT else [
        f"expected metadata format={EMBEDDING_FORMAT!r}, found {meta.get('format')!r}"]
    vectors = {n[len(_TENSOR_PREFIX):]: t for n, t in tensors.items() if n.startswith(_TENSOR_PREFIX)}
    problems += [f"unexpected tensor {n!r}" for n in tensors if not n.startswith(_TENSOR_PREFIX)]
    problems += [f"vector {k!r} is not a finite float [B, D] tensor (shape {list(t.shape)})" for k, t in vectors.items()
                 if t.dim() != 2 or 0 in t.shape or not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if not problems and (not vectors or len({t.shape[0] for t in vectors.values()}) != 1):
        problems.append(f"needs vectors with one batch size, found {({k: t.shape[0] for k, t in vectors.items()})}")
    if problems:
        raise ValueError(f"{name} is not an audio embedding file: " + "; ".join(problems))
    return AudioEmbedding(vectors=vectors, source=meta.get("source", ""))
