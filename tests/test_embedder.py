"""The Embedder: reference layout, pooling maths, modes, masking and numerical safety."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from audiotoken_core.embedder import (
    REFERENCE_STATE_DICT_NAMES,
    Embedder,
    EmbedderConfig,
    reference_state_dict_shapes,
    state_dict_problems,
)

# The reference FGAEmbedder state dict for 2304 -> 768, written out independently.
REFERENCE_768 = [
    ("fc1.weight", (2304, 2304)),
    ("fc1.bias", (2304,)),
    ("fc2.weight", (768, 2304)),
    ("fc2.bias", (768,)),
    ("fga.un_models.0.embed.weight", (768, 768, 1)),
    ("fga.un_models.0.embed.bias", (768,)),
    ("fga.un_models.0.feature_reduce.weight", (1, 768, 1)),
    ("fga.un_models.0.feature_reduce.bias", (1,)),
    ("fga.pp_models.0.embed_X.weight", (768, 768, 1)),
    ("fga.pp_models.0.embed_X.bias", (768,)),
    ("fga.pp_models.0.embed_Y.weight", (768, 768, 1)),
    ("fga.pp_models.0.embed_Y.bias", (768,)),
    ("fga.reduce_potentials.0.weight", (1, 2, 1)),
]

F_IN, D_OUT = 12, 8


def small(seed: int = 0, **kw) -> Embedder:
    torch.manual_seed(seed)
    model = Embedder(EmbedderConfig(input_dim=F_IN, output_dim=D_OUT, **kw))
    # Non-trivial mixing weights so that both potentials matter.
    with torch.no_grad():
        model.fga.reduce_potentials[0].weight.copy_(torch.tensor([[[1.7], [-2.3]]]))
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- layout


def test_parameter_counts_match_paper():
    assert n_params(Embedder()) == 8_853_507
    assert n_params(Embedder(output_dim=1024)) == 10_820_867


def test_state_dict_names_and_shapes_equal_reference():
    sd = Embedder().state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == REFERENCE_768
    assert list(REFERENCE_STATE_DICT_NAMES) == [n for n, _ in REFERENCE_768]
    assert reference_state_dict_shapes(2304, 768) == dict(REFERENCE_768)
    assert state_dict_problems(dict(REFERENCE_768), reference_state_dict_shapes(2304, 768)) == []


def test_state_dict_problems_name_missing_unexpected_and_shapes():
    shapes = dict(REFERENCE_768)
    del shapes["fga.pp_models.0.embed_Y.bias"]
    shapes["fga.pp_models.0.margin_X.weight"] = (1, 1, 1)
    shapes["fc2.bias"] = (1024,)
    text = "; ".join(state_dict_problems(shapes, reference_state_dict_shapes(2304, 768)))
    assert "missing 1 tensor(s): 'fga.pp_models.0.embed_Y.bias'" in text
    assert "unexpected 1 tensor(s): 'fga.pp_models.0.margin_X.weight'" in text
    assert "fc2.bias: expected shape [768], found [1024]" in text


def test_config_round_trip_and_validation():
    cfg = EmbedderConfig(input_dim=10, output_dim=4, stochastic_pooling=True, pooling_dropout=0.25)
    assert EmbedderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {
        "input_dim": 10, "output_dim": 4, "stochastic_pooling": True, "pooling_dropout": 0.25,
    }
    for bad in ({"input_dim": 0}, {"output_dim": -1}, {"pooling_dropout": 1.0}, {"input_dim": 2.5}):
        with pytest.raises(ValueError):
            EmbedderConfig(**bad)
    with pytest.raises(ValueError, match="unknown EmbedderConfig field"):
        EmbedderConfig.from_dict({"input_dim": 4, "hidden": 3})


def test_from_state_dict_infers_sizes():
    src = small(3)
    rebuilt = Embedder.from_state_dict(src.state_dict())
    assert (rebuilt.input_dim, rebuilt.output_dim) == (F_IN, D_OUT)
    x = torch.randn(2, 5, F_IN)
    assert torch.equal(src.eval()(x), rebuilt.eval()(x))
    assert not rebuilt.training and rebuilt.fc1.weight.data_ptr() != src.fc1.weight.data_ptr()  # a copy
    bad = dict(src.state_dict())
    bad.pop("fc1.bias")
    with pytest.raises(ValueError, match="missing 1 tensor"):
        Embedder.from_state_dict(bad)
    bad.pop("fc2.weight")
    with pytest.raises(ValueError, match=r"fc1.weight and fc2.weight must be matrices, found shapes \[12, 12\] and \[\]"):
        Embedder.from_state_dict(bad)


# ----------------------------------------------------------------------------- maths


def explicit_forward(model: Embedder, feats: torch.Tensor):
    """The paper's formulas written out frame by frame (float64, no dropout)."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    W1, b1, W2, b2 = p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"]
    We, be = p["fga.un_models.0.embed.weight"][:, :, 0], p["fga.un_models.0.embed.bias"]
    wr, br = p["fga.un_models.0.feature_reduce.weight"][0, :, 0], p["fga.un_models.0.feature_reduce.bias"][0]
    WX, bX = p["fga.pp_models.0.embed_X.weight"][:, :, 0], p["fga.pp_models.0.embed_X.bias"]
    WY, bY = p["fga.pp_models.0.embed_Y.weight"][:, :, 0], p["fga.pp_models.0.embed_Y.bias"]
    a, b = p["fga.reduce_potentials.0.weight"][0, :, 0].tolist()
    outs, weights = [], []
    for f in feats.double():
        h = torch.einsum("ij,tj->ti", W1, f) + b1
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        X = torch.einsum("ij,tj->ti", W2, h) + b2
        T = X.shape[0]
        z = []
        for t in range(T):
            u = float(wr @ torch.relu(We @ X[t] + be) + br)
            xe = WX @ X[t] + bX
            cos_sum = 0.0
            for s in range(T):
                ye = WY @ X[s] + bY
                cos_sum += float(xe @ ye) / (max(float(xe.norm()), 1e-12) * max(float(ye.norm()), 1e-12))
            z.append(a * u + b * cos_sum / T)
        m = max(z)
        e = [math.exp(v - m) for v in z]
        w = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
        outs.append((w[:, None] * X).sum(0))
        weights.append(w)
    return torch.stack(outs), torch.stack(weights)


def reference_layout_forward(model: Embedder, feats: torch.Tensor):
    """The reference code's tensor operations (channels-first convs, F.normalize dim=1,
    S.mean(dim=2), cat [unary, pairwise], bias-free conv, softmax dim=1, bmm)."""
    m = model
    x = m.fc2(F.gelu(m.fc1(feats)))
    xt = x.transpose(1, 2)
    un, pp = m.fga.un_models[0], m.fga.pp_models[0]
    u = un.feature_reduce(F.relu(un.embed(xt))).squeeze(1)
    xn, yn = F.normalize(pp.embed_X(xt)), F.normalize(pp.embed_Y(xt))
    pw = xn.transpose(1, 2).bmm(yn).mean(dim=2)
    pot = torch.cat([u.unsqueeze(1), pw.unsqueeze(1)], dim=1)
    z = m.fga.reduce_potentials[0](pot).squeeze(1)
    w = F.softmax(z, dim=1).unsqueeze(2)
    return torch.bmm(xt, w).squeeze(2)


def test_pooling_equals_explicit_formulas():
    model = small(1).double().eval()
    feats = torch.randn(3, 6, F_IN, dtype=torch.float64)
    out, w = model(feats, return_weights=True)
    ref_out, ref_w = explicit_forward(model, feats)
    assert out.shape == (3, D_OUT)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


def test_pooling_equals_reference_tensor_layout():
    model = small(2).eval()
    feats = torch.randn(2, 9, F_IN)
    with torch.no_grad():
        torch.testing.assert_close(model(feats), reference_layout_forward(model, feats))


def test_softmax_weights_sum_to_one():
    model = small(4).eval()
    _, w = model(torch.randn(4, 11, F_IN), return_weights=True)
    assert w.shape == (4, 11)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4))


# ----------------------------------------------------------------------------- modes


def test_deterministic_eval_is_repeatable_and_train_uses_dropout():
    model = small(5)
    feats = torch.randn(2, 10, F_IN)
    model.eval()
    assert torch.equal(model(feats), model(feats))
    model.train()
    torch.manual_seed(0)
    a = model(feats)
    b = model(feats)
    assert not torch.allclose(a, b)


def test_stochastic_pooling_is_random_in_eval():
    model = small(6, stochastic_pooling=True).eval()
    feats = torch.randn(2, 10, F_IN)
    outs = torch.stack([model(feats) for _ in range(8)])
    assert bool(torch.isfinite(outs).all())
    assert not torch.allclose(outs[0], outs[1])
    # Switching the quirk off makes eval deterministic again, and back.
    model.set_stochastic_pooling(False)
    assert not model.stochastic_pooling and not model.config.stochastic_pooling
    assert torch.equal(model(feats), model(feats))
    model.set_stochastic_pooling(True)
    assert not torch.equal(model(feats), model(feats))


def test_stochastic_pooling_with_p0_equals_deterministic():
    det = small(7).eval()
    sto = small(7, stochastic_pooling=True, pooling_dropout=0.0).eval()
    feats = torch.randn(2, 5, F_IN)
    assert torch.equal(det(feats), sto(feats))


# ----------------------------------------------------------------------------- masking


def test_padding_mask_equals_unpadded_prefix():
    model = small(8).eval()
    lengths = [7, 4, 1]
    clips = [torch.randn(n, F_IN) for n in lengths]
    batch = torch.full((3, 7, F_IN), float("nan"))  # garbage (even NaN) in padding
    mask = torch.ones(3, 7, dtype=torch.bool)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
        mask[i, : len(c)] = False
    out, w = model(batch, padding_mask=mask, return_weights=True)
    assert bool(torch.isfinite(out).all())
    assert bool((w[mask] == 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    for i, c in enumerate(clips):
        torch.testing.assert_close(out[i], model(c[None])[0], rtol=1e-5, atol=1e-6)


def test_padding_mask_anywhere_equals_selected_frames():
    model = small(9).eval()
    feats = torch.randn(1, 8, F_IN)
    mask = torch.tensor([[True, False, False, True, False, True, False, True]])
    torch.testing.assert_close(model(feats, padding_mask=mask), model(feats[:, ~mask[0]]))
    assert torch.equal(model(feats, padding_mask=torch.zeros(1, 8, dtype=torch.bool)), model(feats))


# ----------------------------------------------------------------------------- numerics


def test_no_nan_on_zero_input_and_zero_weights():
    model = small(11).eval()
    assert bool(torch.isfinite(model(torch.zeros(2, 6, F_IN))).all())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every embedding is exactly zero: cosines must be 0, not NaN
    out, w = model(torch.zeros(2, 6, F_IN), return_weights=True)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(w).all())
    torch.testing.assert_close(w, torch.full((2, 6), 1 / 6))
    big = small(12).eval()
    assert bool(torch.isfinite(big(torch.full((1, 4, F_IN), 1e6))).all())


def test_half_precision_is_finite():
    model = small(13).eval().to(torch.bfloat16)
    out = model(torch.randn(2, 6, F_IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_gradients_reach_every_parameter():
    model = small(14).train()
    feats = torch.randn(3, 6, F_IN)
    out = model(feats)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        if name == "fga.un_models.0.feature_reduce.bias":
            # Quirk: a constant shift of every logit; the softmax cancels it.
            assert float(p.grad.abs().max()) < 1e-5, name
        else:
            assert float(p.grad.abs().max()) > 0, name


def test_embedder_is_exported_at_package_level():
    import audiotoken_core

    assert audiotoken_core.Embedder is Embedder
    assert sum(p.numel() for p in audiotoken_core.Embedder(audiotoken_core.EmbedderConfig(2304, 768)).parameters()) == 8_853_507
