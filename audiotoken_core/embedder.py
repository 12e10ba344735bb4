"""The AudioToken Embedder: audio-encoder features -> one text-encoder word vector.

This is the network of the paper (Yariv et al., Interspeech 2023, reference class
``FGAEmbedder``), rewritten so that its state dict carries exactly the 13 reference
names and shapes and a released reference checkpoint loads with ``load_state_dict``::

    features [B, N, F] --fc1 (F->F)--> GELU --fc2 (F->D)--> X [B, N, D]
    --attentive pooling (``fga``)--> e [B, D]

Attentive pooling (a single-utility factor-graph attention) over the rows x_t of X:

* unary      u_t = w_r . Dropout(ReLU(W_e x_t + b_e)) + b_r
  (``fga.un_models.0.embed`` = W_e, ``fga.un_models.0.feature_reduce`` = w_r)
* pairwise   p_t = mean_s < n(W_X x_t + b_X), n(W_Y x_s + b_Y) >
  with n(v) = v / max(||v||_2, 1e-12): the mean over s of the cosine similarity
  between frame t's X-embedding and every frame's Y-embedding (self included)
  (``fga.pp_models.0.embed_X`` / ``embed_Y``)
* z_t = a u_t + b p_t, with [a, b] = ``fga.reduce_potentials.0.weight[0, :, 0]``
  (the order of the two potentials is unary first, then pairwise)
* w = softmax_t(z);  e = sum_t w_t x_t  (x_t is the fc2 output, not the raw feature)

Reference quirks (guyyariv/AudioToken @ ab7d280):

* ``modules/FGA/atten.py`` line 24: the unary dropout is ``F.dropout(F.relu(...))``
  with the functional default ``training=True`` and p=0.5, so it is active even in
  ``eval()``: reference inference is random. Here the default is ordinary
  ``nn.Dropout`` semantics (active only in train mode); ``stochastic_pooling=True``
  reproduces the reference (always on, also in eval).
* ``modules/FGA/atten.py`` lines 63-64: ``F.normalize`` on the [B, D, T] embeddings
  uses its default ``dim=1`` (the feature axis) and eps=1e-12: a per-frame L2
  normalisation, i.e. a true cosine; an all-zero embedding gives cosine 0, not NaN.
* ``modules/FGA/atten.py`` line 74: the self-pairwise potential is ``S.mean(dim=2)``,
  the mean over *all* frames s, including s == t.
* ``modules/FGA/atten.py`` lines 241-244 / 268-270: potentials are concatenated as
  [unary, pairwise] and mixed by a bias-free Conv1d(2, 1, 1).
* ``modules/AudioToken/embedder.py`` line 10: ``Atten(..., pairwise_flag=False)`` only
  disables *cross*-utility factors; the self-pairwise factor (``self_flag=True``) is
  kept, which is why ``fga.pp_models.0`` exists. The reference stores it in a
  ``ModuleDict`` keyed "0"; a one-element ``ModuleList`` gives the same names.
* ``fga.un_models.0.feature_reduce.bias`` (b_r) adds the same constant to every z_t,
  and the softmax is shift-invariant, so it has no effect on the output and its
  gradient is exactly zero in exact arithmetic (tiny float noise in practice). It is
  kept for state-dict compatibility.

Additions that the reference does not have: an optional boolean padding mask
(True = padded frame; padded frames get zero weight and are left out of the
pairwise mean, so a padded batch equals running each clip alone), and the pairwise
cosines, the potentials and the softmax are computed in float32 even for half
precision modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config_fields import known_fields

__all__ = [
    "EmbedderConfig",
    "Embedder",
    "AttentivePooling",
    "UnaryPotential",
    "PairwisePotential",
    "REFERENCE_STATE_DICT_NAMES",
    "reference_state_dict_shapes",
    "state_dict_problems",
]

# The 13 tensor names of the reference FGAEmbedder state dict, in reference order.
REFERENCE_STATE_DICT_NAMES: tuple[str, ...] = (
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fga.un_models.0.embed.weight",
    "fga.un_models.0.embed.bias",
    "fga.un_models.0.feature_reduce.weight",
    "fga.un_models.0.feature_reduce.bias",
    "fga.pp_models.0.embed_X.weight",
    "fga.pp_models.0.embed_X.bias",
    "fga.pp_models.0.embed_Y.weight",
    "fga.pp_models.0.embed_Y.bias",
    "fga.reduce_potentials.0.weight",
)

_NORMALIZE_EPS = 1e-12  # F.normalize's default, as used by the reference


def reference_state_dict_shapes(input_dim: int, output_dim: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an Embedder ``input_dim -> output_dim``."""
    f, d = int(input_dim), int(output_dim)
    return {
        "fc1.weight": (f, f),
        "fc1.bias": (f,),
        "fc2.weight": (d, f),
        "fc2.bias": (d,),
        "fga.un_models.0.embed.weight": (d, d, 1),
        "fga.un_models.0.embed.bias": (d,),
        "fga.un_models.0.feature_reduce.weight": (1, d, 1),
        "fga.un_models.0.feature_reduce.bias": (1,),
        "fga.pp_models.0.embed_X.weight": (d, d, 1),
        "fga.pp_models.0.embed_X.bias": (d,),
        "fga.pp_models.0.embed_Y.weight": (d, d, 1),
        "fga.pp_models.0.embed_Y.bias": (d,),
        "fga.reduce_potentials.0.weight": (1, 2, 1),
    }


def _fmt_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def state_dict_problems(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between a name -> shape mapping and the ``expected`` one
    (e.g. :func:`reference_state_dict_shapes`); empty when names and shapes are equal."""
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected]
    problems = [f"missing {len(missing)} tensor(s): {_fmt_names(missing)}"] if missing else []
    problems += [f"unexpected {len(unexpected)} tensor(s): {_fmt_names(unexpected)}"] if unexpected else []
    return problems + [f"{n}: expected shape {list(s)}, found {list(shapes[n])}"
                       for n, s in expected.items() if n in shapes and tuple(shapes[n]) != tuple(s)]


@dataclass
class EmbedderConfig:
    """Size and pooling options of an :class:`Embedder`.

    ``input_dim``: audio feature width F (BEATs layers 4, 8, 12 -> 3 x 768 = 2304).
    ``output_dim``: text-encoder word-embedding width D (CLIP-L 768, OpenCLIP-H 1024,
    OpenCLIP-bigG 1280). ``stochastic_pooling``: keep the unary dropout active in eval
    mode, as the reference does. ``pooling_dropout``: that dropout's probability.
    """

    input_dim: int = 2304
    output_dim: int = 768
    stochastic_pooling: bool = False
    pooling_dropout: float = 0.5

    def __post_init__(self) -> None:
        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        p = self.pooling_dropout
        if not (positive_int(self.input_dim) and positive_int(self.output_dim)
                and isinstance(self.stochastic_pooling, bool)
                and isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ValueError(f"bad EmbedderConfig {asdict(self)}: input_dim and output_dim must be positive ints, "
                             "stochastic_pooling a bool and pooling_dropout in [0, 1)")
        self.pooling_dropout = float(p)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EmbedderConfig":
        return cls(**known_fields(cls, data))


class UnaryPotential(nn.Module):
    """u_t = w_r . Dropout(ReLU(W_e x_t + b_e)) + b_r (reference ``Unary``)."""

    def __init__(self, dim: int, dropout: float = 0.5, stochastic: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv1d(dim, dim, 1)
        self.feature_reduce = nn.Conv1d(dim, 1, 1)
        self.dropout = float(dropout)
        self.stochastic = bool(stochastic)

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        """x_t: [B, D, T] (channels first) -> [B, T]."""
        h = F.relu(self.embed(x_t))
        # Reference: always-on dropout; ours: nn.Dropout semantics unless stochastic.
        h = F.dropout(h, p=self.dropout, training=self.stochastic or self.training)
        return self.feature_reduce(h).squeeze(1)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, stochastic={self.stochastic}"


class PairwisePotential(nn.Module):
    """p_t = mean over valid s of cos(W_X x_t + b_X, W_Y x_s + b_Y) (reference ``Pairwise``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed_X = nn.Conv1d(dim, dim, 1)
        self.embed_Y = nn.Conv1d(dim, dim, 1)

    def forward(self, x_t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: [B, D, T]; valid: optional [B, T] bool (True = real frame) -> [B, T] float32."""
        xn = F.normalize(self.embed_X(x_t).float(), dim=1, eps=_NORMALIZE_EPS)
        yn = F.normalize(self.embed_Y(x_t).float(), dim=1, eps=_NORMALIZE_EPS)
        sim = torch.bmm(xn.transpose(1, 2), yn)  # [B, T(t), T(s)]
        if valid is None:
            return sim.mean(dim=2)
        v = valid.to(sim.dtype)
        count = v.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1]
        return (sim * v.unsqueeze(1)).sum(dim=2) / count


class AttentivePooling(nn.Module):
    """Single-utility factor-graph attention pooling [B, T, D] -> [B, D] (reference ``Atten``).

    Attribute names reproduce the reference state dict: ``un_models.0``,
    ``pp_models.0``, ``reduce_potentials.0``.
    """

    def __init__(self, dim: int, dropout: float = 0.5, stochastic: bool = False) -> None:
        super().__init__()
        self.dim = int(dim)
        self.un_models = nn.ModuleList([UnaryPotential(dim, dropout, stochastic)])
        self.pp_models = nn.ModuleList([PairwisePotential(dim)])
        self.reduce_potentials = nn.ModuleList([nn.Conv1d(2, 1, 1, bias=False)])

    @property
    def stochastic(self) -> bool:
        return self.un_models[0].stochastic

    @stochastic.setter
    def stochastic(self, value: bool) -> None:
        self.un_models[0].stochastic = bool(value)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        """x: [B, T, D]; padding_mask: optional [B, T] bool, True = padded frame.

        Returns the pooled [B, D] (in x's dtype), and with ``return_weights`` also the
        float32 softmax weights [B, T] (zero on padded frames, each row sums to 1).
        """
        valid = None
        if padding_mask is not None:
            # Padded frames may hold anything (even NaN): zero them so that they
            # cannot leak into the weighted sum through 0 * NaN.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            valid = ~padding_mask
        x_t = x.transpose(1, 2)  # [B, D, T]
        unary = self.un_models[0](x_t).float()  # [B, T]
        pairwise = self.pp_models[0](x_t, valid)  # [B, T] float32
        potentials = torch.stack((unary, pairwise), dim=1)  # [B, 2, T]
        weight = self.reduce_potentials[0].weight.float()
        z = F.conv1d(potentials, weight).squeeze(1)  # [B, T]
        if padding_mask is not None:
            z = z.masked_fill(padding_mask, float("-inf"))
        w = torch.softmax(z, dim=1)
        pooled = torch.bmm(x_t, w.to(x.dtype).unsqueeze(2)).squeeze(2)  # [B, D]
        if return_weights:
            return pooled, w
        return pooled


class Embedder(nn.Module):
    """fc1 -> GELU -> fc2 -> attentive pooling; [B, N, input_dim] -> [B, output_dim].

    Construct with an :class:`EmbedderConfig` or keyword overrides of its fields, e.g.
    ``Embedder(output_dim=1024)``. See the module docstring for the exact pooling and
    the reference quirks.
    """

    def __init__(self, config: EmbedderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = EmbedderConfig(**overrides)
        elif overrides:
            config = EmbedderConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.fc1 = nn.Linear(config.input_dim, config.input_dim)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(config.input_dim, config.output_dim)
        self.fga = AttentivePooling(
            config.output_dim, dropout=config.pooling_dropout, stochastic=config.stochastic_pooling
        )

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    @property
    def stochastic_pooling(self) -> bool:
        return self.fga.stochastic

    def set_stochastic_pooling(self, enabled: bool) -> "Embedder":
        """Reference-compatible always-on pooling dropout (True) or deterministic (False)."""
        self.fga.stochastic = bool(enabled)
        self.config.stochastic_pooling = bool(enabled)
        return self

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **config_overrides: Any) -> "Embedder":
        """An Embedder (eval mode, float32 copies of the weights) whose sizes are read from a
        reference-layout state dict. Raises ValueError naming missing / unexpected tensors and wrong shapes.
        """
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        fc1, fc2 = shapes.get("fc1.weight", ()), shapes.get("fc2.weight", ())
        if len(fc1) != 2 or len(fc2) != 2:
            raise ValueError(f"not a reference Embedder state dict: fc1.weight and fc2.weight must be matrices, "
                             f"found shapes {list(fc1)} and {list(fc2)}")
        problems = state_dict_problems(shapes, reference_state_dict_shapes(fc1[1], fc2[0]))
        if problems:
            raise ValueError("not a reference Embedder state dict: " + "; ".join(problems))
        with torch.device("meta"):
            model = cls(EmbedderConfig(input_dim=fc1[1], output_dim=fc2[0], **config_overrides))
        model.load_state_dict({k: v.detach().to(torch.float32, copy=True) for k, v in state_dict.items()},
                              assign=True)
        return model.eval()

    def forward(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        """features: [B, N, input_dim]; padding_mask: optional [B, N] bool (True = padded; at least one
        real frame per row), on the features' device.

        Returns [B, output_dim], or ``(embedding, weights [B, N])`` with ``return_weights``.
        """
        x = self.fc2(self.gelu(self.fc1(features)))
        return self.fga(x, padding_mask=padding_mask, return_weights=return_weights)
