"""AIS / IIS / AIC / FID on constructed cases whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from audiotoken_core.evaluation import (
    activation_statistics, arbitrary_indices, audio_image_score, frechet_distance, image_image_score,
    label_agreement, zero_shot_labels,
)
from audiotoken_core.evaluation.metrics import MetricInputError, frechet_distance_from_statistics, ranking_scores


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


# ------------------------------------------------------------------ arbitrary_indices


def test_arbitrary_indices_are_distinct_exclude_self_and_are_deterministic():
    idx = arbitrary_indices(50, 10, seed=3)
    assert idx.shape == (50, 10) and idx.dtype == torch.long
    for i, row in enumerate(idx.tolist()):
        assert i not in row and len(set(row)) == 10 and all(0 <= j < 50 for j in row)
    assert torch.equal(idx, arbitrary_indices(50, 10, seed=3))
    assert not torch.equal(idx, arbitrary_indices(50, 10, seed=4))
    # the draw does not depend on the global RNG
    torch.manual_seed(123)
    assert torch.equal(idx, arbitrary_indices(50, 10, seed=3))


def test_arbitrary_indices_none_means_all_others_in_order():
    idx = arbitrary_indices(4, None, seed=0)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert torch.equal(arbitrary_indices(4, 3, seed=9), idx)
    assert torch.equal(arbitrary_indices(4, 99, seed=9), idx)


def test_arbitrary_indices_cover_others_uniformly():
    idx = arbitrary_indices(11, 3, seed=0)
    counts = torch.bincount(arbitrary_indices(200, 20, seed=1).flatten(), minlength=200).float()
    assert idx.shape == (11, 3)
    assert counts.mean() == 20 and counts.std() < 8  # each index picked about m times


def test_arbitrary_indices_need_two_examples():
    with pytest.raises(MetricInputError, match="at least 2"):
        arbitrary_indices(1, None, seed=0)


# ------------------------------------------------------------------ IIS / AIS


def test_identical_images_give_iis_100():
    ref = _unit(64, 32, 0)
    assert image_image_score(ref.clone(), ref) == 100.0
    assert image_image_score(ref * 3.0, ref, n_arbitrary=5, seed=1) == 100.0  # scale-free (cosine)


def test_shuffled_pairs_give_about_50():
    gen, ref = _unit(400, 64, 0), _unit(400, 64, 1)
    score = image_image_score(gen, ref)
    assert 45.0 <= score <= 55.0
    assert 45.0 <= image_image_score(gen, ref, n_arbitrary=20, seed=0) <= 55.0


def test_all_ties_count_half():
    same = torch.ones(5, 8)
    assert image_image_score(same, same) == 50.0
    assert audio_image_score(same, same, n_arbitrary=2, seed=0) == 50.0


def test_ais_constructed_case_by_hand():
    # 2-d unit vectors; sims[i, j] = cos(audio_j, image_i) = cos(angle_i - angle_j)
    deg = torch.tensor([0.0, 30.0, 90.0, 180.0]) * math.pi / 180
    audio = torch.stack([deg.cos(), deg.sin()], 1)
    img_deg = torch.tensor([10.0, 75.0, 80.0, 200.0]) * math.pi / 180
    image = torch.stack([img_deg.cos(), img_deg.sin()], 1)
    # image 0 at 10 deg: own audio 0 deg (10 off); others 30 (20 off, lower), 90 (80), 180 (170) -> 3/3
    # image 1 at 75 deg: own 30 (45 off); others 0 (75 off lower), 90 (15 off HIGHER), 180 (105 lower) -> 2/3
    # image 2 at 80 deg: own 90 (10 off); others 0 (80), 30 (50), 180 (100) all lower -> 3/3
    # image 3 at 200 deg: own 180 (20 off); others 0 (160), 30 (170), 90 (110) all lower -> 3/3
    expected = 100 * (1 + 2 / 3 + 1 + 1) / 4
    assert audio_image_score(audio, image) == pytest.approx(expected, abs=1e-12)
    # with one arbitrary audio per image: check against the drawn indices by hand
    idx = arbitrary_indices(4, 1, seed=7)[:, 0].tolist()
    sims = image @ audio.T
    by_hand = sum(float(sims[i, j] < sims[i, i]) for i, j in enumerate(idx)) / 4 * 100
    assert audio_image_score(audio, image, n_arbitrary=1, seed=7) == pytest.approx(by_hand)


def test_ais_is_not_symmetric_in_its_arguments_order_matters():
    # the ranking is per generated image over audios (rows = images)
    audio, image = _unit(30, 16, 0), _unit(30, 16, 1)
    s = ranking_scores(image, audio)
    sims = torch.nn.functional.normalize(image.double(), dim=1) @ torch.nn.functional.normalize(audio.double(), dim=1).T
    manual = torch.tensor([(sims[i, torch.arange(30) != i] < sims[i, i]).double().mean() for i in range(30)])
    assert torch.allclose(s, manual)
    assert audio_image_score(audio, image) == pytest.approx(float(manual.mean() * 100))


@pytest.mark.parametrize("a, b, match", [
    (torch.zeros(3, 4) + 1, torch.ones(4, 4), "one row per example"),
    (torch.ones(1, 4), torch.ones(1, 4), "at least 2"),
    (torch.ones(3, 4), torch.ones(3, 5), "same embedding space"),
    (torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), torch.ones(2, 2), "NaN"),
    (torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.ones(2, 2), "all-zero"),
])
def test_ranking_errors_name_the_fix(a, b, match):
    with pytest.raises(MetricInputError, match=match):
        image_image_score(a, b)
    with pytest.raises(MetricInputError, match=match):
        audio_image_score(b, a)


# ------------------------------------------------------------------ AIC


def _fake_embed(table):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts], dtype=torch.float32)

    embed.calls = calls
    return embed


def test_aic_counts_known_matches_case_and_space_insensitive():
    pred = ["Dog", "cat ", "church  bell", "horse"]
    true = ["dog", "Cat", "Church Bell", "cow"]
    assert label_agreement(pred, true, None) == 75.0


def test_aic_threshold_is_inclusive_at_075():
    # cos((1,0,0,0,0), (3,2,1,1,1)/4) = 0.75 exactly in floating point
    table = {
        "puppy": [1, 0, 0, 0, 0], "dog": [3, 2, 1, 1, 1],              # exactly 0.75 -> agree
        "kitten": [1, 0, 0, 0, 0], "cat": [0.7499, (1 - 0.7499 ** 2) ** 0.5, 0, 0, 0],  # 0.7499 -> disagree
        "car": [0, 1, 0, 0, 0], "engine": [0, 1, 0, 0, 0],              # 1.0 -> agree
    }
    embed = _fake_embed(table)
    assert label_agreement(["puppy", "kitten", "car", "dog"], ["dog", "cat", "engine", "DOG"], embed) == 75.0
    assert len(embed.calls) == 1  # one batched call with the distinct strings that need it
    assert sorted(embed.calls[0]) == ["car", "cat", "dog", "engine", "kitten", "puppy"]
    assert label_agreement(["puppy"], ["dog"], embed, threshold=0.7501) == 0.0
    assert label_agreement(["kitten"], ["cat"], embed, threshold=0.7499 - 1e-9) == 100.0


def test_zero_shot_labels_pick_the_nearest_label():
    labels = ["dog", "cat", "car"]
    text = torch.eye(3, 4)
    images = torch.tensor([[0.1, 0.9, 0.0, 0.2], [2.0, 0.0, 0.1, 0.0], [0.0, 0.0, 5.0, 1.0]])
    assert zero_shot_labels(images, text, labels) == ["cat", "dog", "car"]


# ------------------------------------------------------------------ FID


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _inception_like(n, f, seed, shift=0.0, rank=None):
    """Non-negative, correlated features of Inception pool scale (values ~0..2)."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or f
    basis = torch.randn(rank, f, generator=g, dtype=torch.float64) / rank ** 0.5
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return (z @ basis * 0.3 + 0.4 + shift).clamp_min(0)


def test_statistics_match_numpy():
    x = _inception_like(50, 20, 0)
    mu, cov = activation_statistics(x.float())
    assert mu.dtype == cov.dtype == torch.float64
    assert np.allclose(mu.numpy(), x.float().double().numpy().mean(0))
    assert np.allclose(cov.numpy(), np.cov(x.float().double().numpy(), rowvar=False), atol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    x = _inception_like(300, 2048, 1).float()        # N < F: sample-space path
    assert abs(frechet_distance(x, x)) < 1e-6
    y = _inception_like(1000, 256, 1).float()        # N > F: covariance path
    assert abs(frechet_distance(y, y)) < 1e-6
    mu, cov = activation_statistics(y)
    assert abs(frechet_distance_from_statistics(mu, cov, mu, cov)) < 1e-6


def test_fid_agrees_with_scipy_full_rank():
    a = _inception_like(3000, 512, 2)
    b = _inception_like(2500, 512, 3, shift=0.05)
    ours = frechet_distance(a, b)  # min(N, M) > F: the covariance path
    ref = _scipy_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, abs=1e-3)
    assert ours > 1.0


def test_fid_agrees_with_scipy_2048_rank_deficient():
    # realistic scale: 2048-d Inception-like features, 300 images per set (rank 299 < 2048)
    a = _inception_like(300, 2048, 4)
    b = _inception_like(300, 2048, 5, shift=0.02)
    ours = frechet_distance(a, b)  # N < F: the sample-space path
    assert ours == pytest.approx(_scipy_fid(a.numpy(), b.numpy()), abs=1e-3)


def test_fid_statistics_path_agrees_with_scipy_rank_deficient():
    a = _inception_like(200, 512, 6)
    b = _inception_like(300, 512, 7, shift=0.02)
    ref = _scipy_fid(a.numpy(), b.numpy())
    assert frechet_distance_from_statistics(*activation_statistics(a), *activation_statistics(b)) == pytest.approx(
        ref, abs=1e-3)
    assert frechet_distance(a, b) == pytest.approx(ref, abs=1e-3)


def test_fid_translation_only_has_closed_form():
    x = _inception_like(400, 64, 6)
    shift = torch.linspace(-1, 1, 64, dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), abs=1e-9)
    big = _inception_like(400, 16, 7)  # N > F path too
    s = torch.full((16,), 0.5, dtype=torch.float64)
    assert frechet_distance(big, big + s) == pytest.approx(16 * 0.25, abs=1e-9)


def test_fid_of_scaled_gaussians_has_closed_form():
    # b = c * a  ->  mu_b = c mu_a, S_b = c^2 S_a  ->  FID = (1 - c)^2 (|mu_a|^2 + tr S_a)
    c = 1.7
    for x in (_inception_like(300, 32, 8), _inception_like(20, 32, 9)):  # N > F and N < F paths
        mu, cov = activation_statistics(x)
        expected = (1 - c) ** 2 * float(mu.square().sum() + torch.trace(cov))
        assert frechet_distance(x, c * x) == pytest.approx(expected, rel=1e-9)


def test_fid_errors():
    with pytest.raises(MetricInputError, match="at least 2"):
        frechet_distance(torch.ones(1, 4), torch.ones(5, 4))
    with pytest.raises(MetricInputError, match="NaN"):
        frechet_distance(torch.tensor([[1.0, float("inf")], [0.0, 0.0]]), torch.ones(3, 2))
