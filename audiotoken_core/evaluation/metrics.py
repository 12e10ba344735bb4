"""The paper's evaluation metrics (AudioToken, Interspeech 2023, section 2.2) in plain torch.

The paper gives the definitions but no code; this module fixes the protocol.

Ranking scores (AIS, IIS)
-------------------------
For every example ``i`` of a set of ``N`` (audio, ground-truth frame, generated image)
triples a similarity ``s(i, j)`` is computed between the generated image ``i`` and the
conditioning item (audio or ground-truth frame) of example ``j``. The per-example score is
the fraction of *arbitrary* other examples ``j`` whose item is LESS similar to image ``i``
than its own item::

    score_i = mean_{j in A(i)} ( [s(i, j) < s(i, i)] + 0.5 * [s(i, j) == s(i, i)] )
    score   = 100 * mean_i score_i          (percent; 50 = chance, 100 = perfect)

- **AIS** (audio-image similarity): ``s(i, j) = cos(wav2clip(audio_j), clip(image_i))``. Wav2CLIP
  was distilled into CLIP ViT-B/32's image space, so the image encoder MUST be CLIP ViT-B/32
  (512-d); any other CLIP gives meaningless numbers even when the widths happen to match.
- **IIS** (image-image similarity): ``s(i, j) = cos(clip(frame_j), clip(image_i))`` with the
  ground-truth frames as the items (any CLIP image encoder; the same one for both sides).
- **Arbitrary samples** ``A(i)``: ``n_arbitrary`` distinct indices ``j != i`` drawn uniformly
  without replacement, independently for each ``i``, from ``torch.Generator().manual_seed(seed)``
  (see :func:`arbitrary_indices`; rows are drawn in order ``i = 0..N-1``, so the draw depends
  only on ``N``, ``n_arbitrary`` and ``seed``). The default ``n_arbitrary=None`` uses ALL other
  examples (``N - 1`` per row) and needs no seed: it is the exact expectation of the random
  protocol and our recommended setting. ``n_arbitrary >= N - 1`` also means "all others".
  The same seed gives the same ``A(i)`` to AIS and IIS.
- **Ties** (``s(i, j)`` equal to ``s(i, i)`` within ``TIE_TOLERANCE`` = 1e-9, cosines computed
  in float64) count as half: a set of identical embeddings scores exactly 50, not 0 or 100.
- **Edge cases**: ``N < 2`` is an error (there is nothing to rank against); so are NaN/inf
  values and all-zero embeddings (their cosine is undefined), mismatched ``N`` or widths.

AIC (audio-image classification agreement)
------------------------------------------
The generated image gets a label (an image classifier, or CLIP zero-shot with
:func:`zero_shot_labels`); it agrees with the audio's label when the two strings are equal
ignoring case and runs of whitespace, or when the cosine of their text embeddings
(``embed_text``, e.g. CLIP's text tower) is ``>= threshold`` (paper: 0.75, inclusive).
AIC = 100 * fraction of agreeing examples.

FID
---
Fréchet distance between Gaussians fitted to Inception-v3 pool features (2048-d, see
``inception.py``) of the generated images and of the ground-truth frames::

    FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr( (S_a^1/2 S_b S_a^1/2)^1/2 )

in float64 with unbiased covariances (``N - 1``, as ``numpy.cov``). The trace term never
forms a non-symmetric matrix square root: when a set has no more samples than features it is
the nuclear norm of ``X_a X_b^T / sqrt((N-1)(M-1))`` (centered features; exact, no square
roots of noisy eigenvalues), otherwise the nuclear norm of ``S_a^1/2 S_b^1/2`` with the PSD
square roots from symmetric eigen-decompositions. Both equal the formula above. FID is biased
upward for small sets; compare numbers only at equal set sizes.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from torch import Tensor

TIE_TOLERANCE = 1e-9
AIC_THRESHOLD = 0.75

__all__ = [
    "AIC_THRESHOLD", "TIE_TOLERANCE", "MetricInputError", "arbitrary_indices", "ranking_scores",
    "audio_image_score", "image_image_score", "zero_shot_labels", "label_agreement",
    "normalize_label", "activation_statistics", "frechet_distance", "frechet_distance_from_statistics",
]


class MetricInputError(ValueError):
    """Inputs a metric cannot be computed from; the message says what to change."""


# --------------------------------------------------------------------------------------------
# arbitrary samples and ranking


def arbitrary_indices(n: int, n_arbitrary: int | None, seed: int) -> torch.LongTensor:
    """``[n, m]`` indices: row ``i`` holds ``m`` distinct indices ``j != i``.

    ``n_arbitrary=None`` (or ``>= n - 1``): all others in increasing order, ``m = n - 1``, no
    randomness. Otherwise ``m = n_arbitrary`` indices per row, drawn uniformly without
    replacement (a ``torch.randperm`` of the ``n - 1`` others per row, rows in order) from
    ``torch.Generator().manual_seed(seed)``: the same ``(n, n_arbitrary, seed)`` always gives
    the same indices, on any device.
    """
    n = int(n)
    if n < 2:
        raise MetricInputError(f"ranking needs at least 2 examples, got {n}: evaluate a set of 2 or more pairs.")
    others = torch.arange(n - 1, dtype=torch.long)
    if n_arbitrary is None or n_arbitrary >= n - 1:
        base = others.unsqueeze(0).expand(n, n - 1)
    else:
        g = torch.Generator().manual_seed(int(seed))
        base = torch.stack([torch.randperm(n - 1, generator=g)[:n_arbitrary] for _ in range(n)])
    rows = torch.arange(n, dtype=torch.long).unsqueeze(1)
    return (base + (base >= rows).long()).contiguous()  # skip i itself


def _check_embeddings(name: str, x: Tensor) -> Tensor:
    """[N, D] -> unit rows in float64; NaN and all-zero rows would give a plausible but wrong score."""
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise MetricInputError(f"{name} contains NaN or infinite values (rows {bad}...): "
                               f"check the model that produced them (e.g. fp16 overflow; use fp32).")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        bad = (norms == 0).nonzero().flatten()[:5].tolist()
        raise MetricInputError(f"{name} has all-zero rows {bad}: their cosine similarity is undefined; "
                               f"check the inputs of those examples (silent audio, blank image).")
    return x / norms.unsqueeze(1)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> tuple[Tensor, Tensor]:
    a = _check_embeddings(name_a, a)
    b = _check_embeddings(name_b, b)
    if a.shape != b.shape:
        raise MetricInputError(f"{name_a} is {tuple(a.shape)} but {name_b} is {tuple(b.shape)}: pass one row per "
                               f"example, in the same order, from encoders of the same embedding space.")
    return a, b


def ranking_scores(query: Tensor, items: Tensor, n_arbitrary: int | None = None, seed: int = 0) -> Tensor:
    """Per-example scores in [0, 1] (float64 ``[N]``): for each ``i`` the fraction of arbitrary
    ``j`` with ``cos(items_j, query_i) < cos(items_i, query_i)``, ties counting half."""
    q, it = _check_pair("query", query, "items", items)
    sims = q @ it.T                                   # [N, N], sims[i, j] = cos(query_i, item_j)
    own = sims.diagonal().unsqueeze(1)                # [N, 1]
    idx = arbitrary_indices(q.shape[0], n_arbitrary, seed)
    other = sims.gather(1, idx)                       # [N, m]
    tie = (other - own).abs() <= TIE_TOLERANCE
    lower = (other < own) & ~tie
    return (lower.double() + 0.5 * tie.double()).mean(dim=1)


def audio_image_score(audio_emb: Tensor, image_emb: Tensor, n_arbitrary: int | None = None, seed: int = 0) -> float:
    """AIS in percent: per generated image ``i``, the fraction of arbitrary audios ``j`` whose
    cosine to image ``i`` is lower than audio ``i``'s (ties count half); mean x 100.

    ``audio_emb``: Wav2CLIP embeddings ``[N, 512]`` of the conditioning audios; ``image_emb``:
    CLIP ViT-B/32 image embeddings ``[N, 512]`` of the generated images (row ``i`` generated
    from audio ``i``). Protocol (arbitrary samples, seed, ties): see the module docstring.
    """
    return float(ranking_scores(image_emb, audio_emb, n_arbitrary, seed).mean() * 100.0)


def image_image_score(generated_emb: Tensor, reference_emb: Tensor, n_arbitrary: int | None = None,
                      seed: int = 0) -> float:
    """IIS in percent: per generated image ``i``, the fraction of arbitrary reference frames
    ``j`` with ``cos(ref_j, gen_i) < cos(ref_i, gen_i)`` (ties count half); mean x 100.

    Both inputs are CLIP image embeddings from the same model, row ``i`` = example ``i``.
    """
    return float(ranking_scores(generated_emb, reference_emb, n_arbitrary, seed).mean() * 100.0)


# --------------------------------------------------------------------------------------------
# AIC


def normalize_label(label: str) -> str:
    """Case-folded, whitespace runs collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", str(label)).strip().casefold()


def zero_shot_labels(image_emb: Tensor, label_text_emb: Tensor, labels: Sequence[str]) -> list[str]:
    """CLIP zero-shot classification: for each image the label whose text embedding has the
    highest cosine (first label on exact ties). ``label_text_emb[k]`` embeds ``labels[k]``
    (e.g. the prompt ``"a photo of <label>"``) with the text tower of the image encoder's CLIP."""
    labels = list(labels)
    img = _check_embeddings("image_emb", image_emb)
    txt = _check_embeddings("label_text_emb", label_text_emb)
    best = (img @ txt.T).argmax(dim=1).tolist()
    return [labels[k] for k in best]


def label_agreement(predicted: Sequence[str], true: Sequence[str],
                    embed_text: Callable[[list[str]], Tensor] | None, threshold: float = AIC_THRESHOLD) -> float:
    """AIC in percent: example ``i`` agrees when ``predicted[i]`` equals ``true[i]`` ignoring case
    and whitespace runs, or when ``cos(embed_text([p]), embed_text([t])) >= threshold``
    (inclusive; the paper's CLIP match uses 0.75). ``embed_text=None``: exact matches only.

    ``embed_text(list_of_strings) -> [K, D]`` is called once with the distinct (normalised)
    strings that need it; it decides any prompt template itself.
    """
    predicted, true = [str(p) for p in predicted], [str(t) for t in true]
    pred_n = [normalize_label(p) for p in predicted]
    true_n = [normalize_label(t) for t in true]
    agree = [p == t for p, t in zip(pred_n, true_n, strict=True)]
    pending = [i for i, a in enumerate(agree) if not a]
    if pending and embed_text is not None:
        texts = sorted({pred_n[i] for i in pending} | {true_n[i] for i in pending})
        emb = _check_embeddings("embed_text output", embed_text(list(texts)))
        row = {t: k for k, t in enumerate(texts)}
        for i in pending:
            cos = float(emb[row[pred_n[i]]] @ emb[row[true_n[i]]])
            agree[i] = cos >= threshold
    return 100.0 * sum(agree) / len(agree)


# --------------------------------------------------------------------------------------------
# FID


def _check_features(name: str, x: Tensor) -> Tensor:
    if x.shape[0] < 2:
        raise MetricInputError(f"{name} has {x.shape[0]} rows: a covariance needs at least 2 images "
                               f"(FID is only meaningful for hundreds or more).")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise MetricInputError(f"{name} contains NaN or infinite values: check the images and the feature "
                               f"model (run it in fp32).")
    return x


def activation_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (divided by ``N - 1``, like ``numpy.cov``)
    of ``[N, F]`` features, in float64."""
    x = _check_features("features", features)
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mu, (cov + cov.T) / 2


def _psd_sqrt(cov: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((cov + cov.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_statistics(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """FID from precomputed statistics (e.g. cached reference statistics), float64."""
    mu_a, mu_b = (torch.as_tensor(m).detach().double().cpu() for m in (mu_a, mu_b))
    cov_a, cov_b = (torch.as_tensor(c).detach().double().cpu() for c in (cov_a, cov_b))
    cross = torch.linalg.svdvals(_psd_sqrt(cov_a) @ _psd_sqrt(cov_b)).sum()
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(value)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FID between two sets of features ``[N, F]`` and ``[M, F]`` (float64; see module docstring)."""
    a = _check_features("features_a", features_a)
    b = _check_features("features_b", features_b)
    n, m, f = a.shape[0], b.shape[0], a.shape[1]
    if min(n, m) > f:
        return frechet_distance_from_statistics(*activation_statistics(a), *activation_statistics(b))
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    xa, xb = a - mu_a, b - mu_b
    tr_a = xa.square().sum() / (n - 1)
    tr_b = xb.square().sum() / (m - 1)
    # eig(S_a S_b) = sigma(X_a X_b^T)^2 / ((n-1)(m-1)) for the non-zero part
    cross = torch.linalg.svdvals(xa @ xb.T).sum() / ((n - 1) * (m - 1)) ** 0.5
    value = (mu_a - mu_b).square().sum() + tr_a + tr_b - 2 * cross
    return float(value)
