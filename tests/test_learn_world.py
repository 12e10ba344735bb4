"""The learnability world (tools/learn_world.py): a text-to-image model that follows its text,
sound classes that a random small BEATs separates, and determinism."""
from __future__ import annotations

import time

import pytest
import torch

from tools import learn_world as lw

HELDOUT_SAMPLE_SEED = 5_000_000  # ComfyUI noise seeds never used anywhere in training


@pytest.fixture(scope="module")
def world():
    t0 = time.time()
    w = lw.build_world(seed=0)
    print(f"\nworld built in {time.time() - t0:.1f} s (training {w.train_log['seconds']:.1f} s)")
    return w


def test_sounds_are_seeded_and_splits_disjoint():
    a = lw.make_sound(3, 7)
    assert a.shape == (80000,) and a.dtype == torch.float32 and a.abs().max() <= 1.0
    assert torch.equal(a, lw.make_sound(3, 7))
    assert not torch.equal(a, lw.make_sound(3, 8))
    assert lw.make_sound(0, 1, seconds=2.0).shape == (32000,)
    assert not set(lw.sound_seeds("train", 1000)) & set(lw.sound_seeds("heldout", 1000))
    data = lw.paired_data("train", 2, seconds=1.0)
    assert data["wave16"].shape == (8, 16000) and data["latents"].shape == (8, 4, 8, 8)
    assert data["label"] == [w for w in lw.WORDS for _ in range(2)]
    assert torch.equal(lw.classify_latent(data["latents"]), data["class_id"])


def test_class_patterns_are_distinct():
    pats = lw.class_patterns()
    assert pats.shape == (lw.K, 4, 8, 8)
    gram = pats.flatten(1) @ pats.flatten(1).T
    assert torch.equal(gram, 256 * torch.eye(lw.K))  # orthogonal, equal norm
    for k in range(lw.K):
        assert lw.classify_latent(lw.class_latent(k) + 0.5 * torch.randn(4, 8, 8)) == k


def test_text_draws_its_class(world):
    t0 = time.time()
    acc = world.text_accuracy(seed=HELDOUT_SAMPLE_SEED, per_class=16)
    print(f"text accuracy {acc:.3f} ({time.time() - t0:.1f} s for {16 * lw.K} samples)")
    assert acc >= 0.95
    z = world.sample(world.encode(world.prompt(2)), seed=HELDOUT_SAMPLE_SEED + 99)
    assert z.shape == (4, 8, 8) and lw.classify_latent(z) == 2


def test_matched_text_denoises_better_than_shuffled(world):
    ids = list(range(lw.K)) * 2
    matched = world.denoising_loss(world.context([world.prompt(k) for k in ids]), ids, seed=1)
    shuffled = world.denoising_loss(world.context([world.prompt((k + 1) % lw.K) for k in ids]), ids, seed=1)
    empty = world.denoising_loss(world.encode(""), ids, seed=1)
    print(f"eps-MSE matched {matched:.4f} empty {empty:.4f} shuffled {shuffled:.4f}")
    assert matched < 0.5 * shuffled and matched < empty
    # a list of CONDITIONINGs is the same as the stacked context
    conds = [world.encode(world.prompt(k)) for k in ids]
    assert world.denoising_loss(conds, ids, seed=1) == pytest.approx(matched, rel=1e-5)


def test_gradients_reach_the_conditioning_through_the_frozen_model(world):
    ctx = world.context([world.prompt(0)]).requires_grad_(True)
    x0 = lw.class_latent(0)[None]
    mse, _ = lw._x0_mse(world.model.model, x0, ctx, torch.tensor([500.0]), torch.randn(1, 4, 8, 8))
    mse.sum().backward()
    assert torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in world.model.model.parameters())


def test_world_is_deterministic(world, tmp_path):
    short = lw.TrainConfig(steps=10)
    a, b, c = (lw.build_world(seed=s, config=short) for s in (0, 0, 1))
    assert a.train_log["losses"] == b.train_log["losses"] != c.train_log["losses"]
    cond = a.encode(a.prompt(1))
    assert torch.equal(a.sample_many(cond, 3, 4), b.sample_many(b.encode(b.prompt(1)), 3, 4))
    assert a.denoising_loss(cond, [1], seed=2) == b.denoising_loss(cond, [1], seed=2)
    # the trained world too: same sampling seed, same samples
    cond = world.encode(world.prompt(3))
    assert torch.equal(world.sample_many(cond, 11, 4), world.sample_many(cond, 11, 4))
    # cache_dir: the second build loads the stored weights and matches the first
    first = lw.build_world(seed=0, config=short, cache_dir=tmp_path)
    second = lw.build_world(seed=0, config=short, cache_dir=tmp_path)
    assert not first.train_log["cached"] and second.train_log["cached"]
    assert first.train_log["losses"] == a.train_log["losses"]
    assert second.denoising_loss(cond, [3], seed=2) == first.denoising_loss(cond, [3], seed=2)


def test_random_beats_separates_the_sound_classes(tmp_path):
    from audiotoken_core.encoders import load_audio_encoder
    from tools.placeholder_beats import write_placeholder_beats

    encoder = load_audio_encoder(write_placeholder_beats(tmp_path / "beats.pt", seed=0, **lw.BEATS_SMALL))
    assert encoder.spec.feature_dim == 192
    t0 = time.time()
    train = lw.paired_data("train", 4)
    test = lw.paired_data("heldout", 6)
    x_train = lw.pooled_features(encoder, train["wave16"])
    x_test = lw.pooled_features(encoder, test["wave16"])
    acc = lw.nearest_centroid_accuracy(x_train, train["class_id"], x_test, test["class_id"])
    print(f"nearest-centroid accuracy on held-out sounds {acc:.3f} ({time.time() - t0:.1f} s)")
    assert acc >= 0.9


# --------------------------------------------------------------------------- the flow world


@pytest.fixture(scope="module")
def flow_world(tmp_path_factory):
    """Built once per session: test_learnability.py finds the trained UNet in the same session cache."""
    t0 = time.time()
    w = lw.build_world(seed=0, prediction="flow", cache_dir=flow_world_cache(tmp_path_factory))
    print(f"\nflow world ready in {time.time() - t0:.1f} s (cached: {w.train_log['cached']})")
    return w


def flow_world_cache(tmp_path_factory):
    """One folder per test session for the flow world's trained UNet (shared by the test files)."""
    return tmp_path_factory.getbasetemp() / "learn_world_flow_cache"


def test_flow_world_is_comfyui_rectified_flow_and_follows_its_text(flow_world):
    import comfy.model_sampling

    ms = flow_world.model.model.model_sampling
    assert flow_world.prediction == "flow"
    assert isinstance(ms, comfy.model_sampling.CONST) and isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert ms.shift == lw.FLOW_SHIFT == 3.0
    # the shifted schedule: sigma(t) = 3 t / (1 + 2 t) at t = (i + 1) / 1000
    t = torch.tensor([0.001, 0.5, 1.0])
    assert torch.allclose(ms.sigmas[[0, 499, 999]], 3 * t / (1 + 2 * t))
    acc = flow_world.text_accuracy(seed=HELDOUT_SAMPLE_SEED, per_class=16)
    ids = list(range(lw.K)) * 2
    matched = flow_world.denoising_loss(flow_world.context([flow_world.prompt(k) for k in ids]), ids, seed=1,
                                        target="flow")
    shuffled = flow_world.denoising_loss(flow_world.context([flow_world.prompt((k + 1) % lw.K) for k in ids]), ids,
                                         seed=1, target="flow")
    print(f"flow world text accuracy {acc:.3f}; velocity-MSE matched {matched:.4f} shuffled {shuffled:.4f}")
    assert acc >= 0.95
    assert matched < 0.5 * shuffled


def test_flow_loss_is_the_velocity_mse_of_the_raw_unet(flow_world):
    """denoising_loss(target="flow") against an independent computation: x_t = (1 - s) x0 + s eps,
    velocity target eps - x0, the raw UNet's output at timestep 1000 s."""
    ids = [0, 1, 2, 3, 2]
    ctx = flow_world.context([flow_world.prompt(k) for k in ids])
    got = flow_world.denoising_loss(ctx, ids, seed=4, repeats=1, target="flow")
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (len(ids),), generator=g)
    eps = torch.randn(len(ids), *lw.LATENT_SHAPE, generator=g)
    s = ((t + 1) / 1000 * 3 / (1 + 2 * (t + 1) / 1000)).view(-1, 1, 1, 1)
    x0 = lw.class_patterns()[ids]
    with torch.no_grad():
        velocity = flow_world.model.model.diffusion_model(((1 - s) * x0 + s * eps), timesteps=1000 * s.flatten(),
                                                          context=ctx)
    expected = float(((velocity - (eps - x0)) ** 2).mean())
    assert got == pytest.approx(expected, rel=1e-4)
    # eps-MSE of the same prediction: eps_hat - eps = (1 - s)(x0 - x0_hat) / s, x0_hat = x_t - s v
    x0_hat = (1 - s) * x0 + s * eps - s * velocity
    eps_expected = float(((((1 - s) / s) * (x0_hat - x0)) ** 2).mean())
    assert flow_world.denoising_loss(ctx, ids, seed=4, repeats=1, target="eps") == pytest.approx(eps_expected, rel=1e-4)


def test_world_prediction_and_target_are_checked():
    with pytest.raises(ValueError, match="prediction must be one of"):
        lw.TrainConfig(prediction="x0")
    with pytest.raises(ValueError, match="contradicts config.prediction"):
        lw.build_world(prediction="flow", config=lw.TrainConfig(prediction="v"))
    sigma = torch.tensor([0.5])
    with pytest.raises(ValueError, match=r"one of \('flow', 'eps', 'x0'\) for a 'flow' model"):
        lw._target_weight("v", sigma, "flow")
    with pytest.raises(ValueError, match=r"one of \('eps', 'v', 'x0'\) for a 'v' model"):
        lw._target_weight("flow", sigma, "v")
    assert float(lw._target_weight("flow", sigma, "flow")) == 4.0
    assert float(lw._target_weight("eps", sigma, "flow")) == 1.0
    assert float(lw._target_weight("v", sigma, "v")) == 5.0
