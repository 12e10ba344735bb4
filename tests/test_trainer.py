"""The core trainer on a toy diffusion world: fast, CPU only.

The toy backend is a real (tiny) latent-diffusion setup: a "text encoder" that adds a
linear map of the audio vector to a fixed context, a small conv denoiser conditioned on
that context per pixel and on the timestep, the DDPM linear noise schedule with eps or v
targets, a "VAE" that pools images, and label targets from a fixed embedding table.
The audio features of class k are a class prototype plus noise, and the latents of
class k are a class pattern, so the audio carries what the denoiser needs.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from audiotoken_core.encoders import AudioEncoder, EncoderSpec
from audiotoken_core.token_file import load_audiotoken
from audiotoken_core.training import (
    CheckpointError,
    DiffusionBackend,
    Trainer,
    TrainConfig,
    TrainingDivergedError,
    checkpoint_paths,
    classification_loss,
    compute_objective,
    l1_penalty,
    latest_checkpoint,
    new_audiotoken,
    per_sample_timesteps_and_noise,
    sample_timesteps_and_noise,
)

ENCODER = {"kind": "beats", "layers": [1, 2, 3], "hidden_size": 4, "sample_rate": 16000}
F_IN = 12  # 3 layers x hidden 4
N_FRAMES = 6
LATENT = (2, 4, 4)
LABELS = ["dog", "rain", "siren", "piano"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy tensors are tiny: thread-pool overhead would dominate (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyBackend(nn.Module):
    """A frozen toy latent-diffusion model implementing DiffusionBackend.

    The "text encoder" adds a linear map of each key's vector to a fixed context; the
    denoiser reads a clean-latent estimate x0_hat from the conditioning (a linear map of
    the mean context, plus a small conv net of x_t) and returns the eps (or v) that x0_hat
    implies, so a vector that encodes the right class can drive the loss towards zero.
    Its noise schedule keeps alphas_cumprod in [0.1, 0.9] so that no timestep dominates.
    """

    def __init__(self, widths=None, prediction: str = "eps", seed: int = 0, ctx_len: int = 3, ctx_dim: int = 16):
        super().__init__()
        self.widths = dict(widths or {"l": 8})
        self.prediction = prediction
        g = torch.Generator().manual_seed(seed)
        c, h, w = LATENT
        self.text = nn.ModuleDict({k: nn.Linear(d, ctx_dim) for k, d in sorted(self.widths.items())})
        self.register_buffer("context", torch.randn(ctx_len, ctx_dim, generator=g))
        self.film = nn.Linear(ctx_dim, c * h * w)
        self.conv_in = nn.Conv2d(c, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, c, 3, padding=1)
        self.register_buffer("alphas_cumprod", torch.linspace(0.9, 0.1, 1000))
        self.labels = {name: i for i, name in enumerate(LABELS)}
        self.label_table = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(len(LABELS), d, generator=g)) for k, d in self.widths.items()}
        )
        with torch.no_grad():  # deterministic init from `seed`
            for m in list(self.text.values()) + [self.film, self.conv_in, self.conv_out]:
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
        self.requires_grad_(False)
        self.eval()
        self.nan_at_call: int | None = None
        self.calls = 0
        self.text_match_calls = 0
        self.image_calls = 0
        self.vector_dtypes: list[torch.dtype] = []

    def encode_prompt(self, text, placeholder, vectors):
        assert placeholder in text
        b = next(iter(vectors.values())).shape[0]
        ctx = self.context.expand(b, -1, -1)
        for key in sorted(vectors):
            self.vector_dtypes.append(vectors[key].dtype)
            ctx = ctx + self.text[key](vectors[key])[:, None, :]
        return ctx

    def x0_from_cond(self, cond):
        return self.film(cond.mean(1)).view(cond.shape[0], *LATENT)

    def diffusion_loss(self, latents, cond, timesteps, noise):
        self.calls += 1
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        x0_hat = self.x0_from_cond(cond) + 0.1 * self.conv_out(F.silu(self.conv_in(x_t)))
        eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        if self.prediction == "eps":
            pred, target = eps_hat, noise
        else:
            pred = ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat
            target = ab.sqrt() * noise - (1 - ab).sqrt() * latents
        loss = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return loss

    def label_targets(self, labels):
        idx = torch.tensor([self.labels[name] for name in labels])
        return {k: table[idx] for k, table in self.label_table.items()}

    def text_match_loss(self, text, placeholder, vectors, labels):
        """Toy text match: the text encoder's output for the vector vs for the label's table row, [B]."""
        assert placeholder in text
        self.text_match_calls += 1
        targets = self.label_targets(labels)
        terms = [((self.text[k](vectors[k]) - self.text[k](targets[k])) ** 2).mean(-1) for k in sorted(vectors)]
        return torch.stack(terms).mean(0)

    def encode_images(self, images):
        self.image_calls += 1
        return F.avg_pool2d(images, 4)[:, : LATENT[0]] * 2 - 1


class ToyEncoder(AudioEncoder):
    """A frozen 'audio encoder': frames of 160 samples -> 3 layers of width 4."""

    def __init__(self):
        super().__init__(EncoderSpec(kind="beats", layers=(1, 2, 3), hidden_size=4))
        self.proj = nn.Linear(160, 4)
        self.requires_grad_(False).eval()  # as load_audio_encoder returns encoders

    def layer_outputs(self, wave16):
        frames = wave16[:, : (wave16.shape[1] // 160) * 160].reshape(wave16.shape[0], -1, 160)
        h1 = self.proj(frames)
        return {1: h1, 2: torch.tanh(h1), 3: h1 * 0.5}


def make_token(seed=0, widths=None, dropout=0.5):
    return new_audiotoken(widths or {"l": 8}, ENCODER, seed=seed, pooling_dropout=dropout)


@torch.no_grad()
def world(seed: int):
    """Class prototypes (features) and class latents that the toy model can draw from a vector."""
    g = torch.Generator().manual_seed(1000 + seed)
    protos = torch.randn(len(LABELS), N_FRAMES, F_IN, generator=g)
    backend = ToyBackend()
    true_vectors = torch.randn(len(LABELS), 8, generator=g)
    patterns = backend.x0_from_cond(backend.encode_prompt("<audio>", "<audio>", {"l": true_vectors}))
    return protos, patterns


def make_batches(num_batches, batch_size, seed=0):
    protos, patterns = world(0)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        cls = torch.randint(0, len(LABELS), (batch_size,), generator=g)
        features = protos[cls] + 0.1 * torch.randn(batch_size, N_FRAMES, F_IN, generator=g)
        batches.append({"features": features, "latents": patterns[cls], "label": [LABELS[i] for i in cls]})
    return batches


def weights(token):
    return {f"{k}.{n}": t.detach().clone() for k, e in token.embedders.items() for n, t in e.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cfg(**kw):
    base = dict(steps=6, batch_size=2, base_lr=1e-3, scale_lr=False, save_every=0, keep_last=0, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def train(config, data, tmp_path, token=None, backend=None, **kw):
    token = token or make_token()
    trainer = Trainer(config, backend or ToyBackend(), token, kw.pop("encoder", None), data, tmp_path, **kw)
    return trainer, trainer.run()


@torch.no_grad()
def eval_loss(token, backend, batches):
    """A fixed-noise, fixed-t, dropout-free loss over the given batches."""
    token.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(batches):
        vectors = {k: e(batch["features"]) for k, e in token.embedders.items()}
        cond = backend.encode_prompt("a photo of <audio>", "<audio>", vectors)
        t, noise = per_sample_timesteps_and_noise(batch["latents"], 12345, i * 100)
        total += float(backend.diffusion_loss(batch["latents"], cond, t, noise).sum())
        n += batch["latents"].shape[0]
    return total / n


# --------------------------------------------------------------------------- config


def test_config_defaults_lr_scaling_and_round_trip():
    c = TrainConfig()
    assert (c.batch_size, c.grad_accum, c.base_lr, c.scale_lr) == (8, 1, 1e-5, True)
    assert c.betas == (0.9, 0.999) and c.weight_decay == 1e-2 and c.eps == 1e-8
    assert (c.lambda_l1, c.lambda_cl, c.window_seconds, c.save_every, c.precision) == (0.01, 0.0, 5.0, 1000, "fp32")
    assert c.prompt == "a photo of <audio>" and c.lr_schedule == "constant"
    assert c.lr() == pytest.approx(8e-5)
    assert TrainConfig(batch_size=4, grad_accum=4).lr() == pytest.approx(1.6e-4)  # the reference README
    assert TrainConfig(batch_size=4, grad_accum=2).lr(world_size=4) == pytest.approx(1e-5 * 32)
    assert TrainConfig(scale_lr=False, base_lr=3e-4).lr(world_size=8) == pytest.approx(3e-4)
    again = TrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    with pytest.raises(ValueError, match="contains the placeholder"):
        TrainConfig(prompt="a photo of <*>")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_trainer_uses_the_scaled_lr(tmp_path):
    config = TrainConfig(steps=1, batch_size=2, grad_accum=3, base_lr=1e-5)
    trainer = Trainer(config, ToyBackend(), make_token(), None, make_batches(3, 2), tmp_path)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(6e-5) == trainer.lr
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 1e-2 and group["eps"] == 1e-8


# --------------------------------------------------------------------------- objective


def test_objective_terms_equal_independent_computations():
    backend = ToyBackend(widths={"l": 8, "g": 5})
    g = torch.Generator().manual_seed(0)
    vectors = {"l": torch.randn(3, 8, generator=g), "g": torch.randn(3, 5, generator=g)}
    latents = torch.randn(3, *LATENT, generator=g)
    labels = ["dog", "piano", "rain"]
    targets = backend.label_targets(labels)
    cond = backend.encode_prompt("a photo of <audio>", "<audio>", vectors)
    t, noise = sample_timesteps_and_noise(latents, torch.Generator().manual_seed(5))
    terms = compute_objective(backend, latents, cond, vectors, t, noise, lambda_l1=0.01, lambda_cl=0.01,
                              label_targets=targets)
    diffusion = backend.diffusion_loss(latents, cond, t, noise).mean()
    l1 = (vectors["l"].abs().sum() + vectors["g"].abs().sum()) / (3 * 8 + 3 * 5)
    cl = 0.0
    for key in ("l", "g"):
        for i in range(3):
            cos = torch.dot(vectors[key][i], targets[key][i]) / (vectors[key][i].norm() * targets[key][i].norm())
            cl += (1 - cos) ** 2
    cl = cl / 6
    assert torch.allclose(terms.diffusion, diffusion)
    assert torch.allclose(terms.l1, l1) and torch.allclose(l1_penalty(vectors), l1)
    assert torch.allclose(terms.cl, cl, atol=1e-6) and torch.allclose(classification_loss(vectors, targets), cl, atol=1e-6)
    assert torch.allclose(terms.total, diffusion + 0.01 * l1 + 0.01 * cl, atol=1e-6)
    # CL off: no term and no labels needed
    off = compute_objective(backend, latents, cond, vectors, t, noise, lambda_l1=0.01)
    assert float(off.cl) == 0.0 and torch.allclose(off.total, diffusion + 0.01 * l1)


def test_timesteps_cover_ddpm_range_and_do_not_depend_on_batching():
    latents = torch.zeros(400, *LATENT)
    t, noise = per_sample_timesteps_and_noise(latents, seed=1, first_index=0)
    assert t.dtype == torch.long and 0 <= int(t.min()) < 30 and 970 < int(t.max()) <= 999
    assert abs(float(noise.std()) - 1) < 0.05
    t4, n4 = per_sample_timesteps_and_noise(latents[:4], 7, 100)
    t2a, n2a = per_sample_timesteps_and_noise(latents[:2], 7, 100)
    t2b, n2b = per_sample_timesteps_and_noise(latents[:2], 7, 102)
    assert torch.equal(t4, torch.cat([t2a, t2b])) and torch.equal(n4, torch.cat([n2a, n2b]))
    assert not torch.equal(per_sample_timesteps_and_noise(latents[:4], 8, 100)[1], n4)


def test_trainer_first_step_l1_matches_the_embedder_output(tmp_path):
    data = make_batches(1, 2)
    token = make_token(dropout=0.0)
    with torch.no_grad():
        expected = token.embedders["l"](data[0]["features"]).abs().mean()
    trainer, summary = train(cfg(steps=1), data, tmp_path, token=token)
    assert summary.history[0]["l1"] == pytest.approx(float(expected), rel=1e-6)
    assert summary.history[0]["cl"] == 0.0


# --------------------------------------------------------------------------- what trains


def test_only_the_embedder_trains(tmp_path):
    backend, encoder = ToyBackend(), ToyEncoder()
    backend_before = {k: v.clone() for k, v in backend.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    token = make_token()
    before = weights(token)
    g = torch.Generator().manual_seed(0)
    data = [{"wave16": torch.randn(2, 160 * N_FRAMES, generator=g) * 0.1,
             "images": torch.rand(2, 3, 16, 16, generator=g)} for _ in range(3)]
    trainer, summary = train(cfg(steps=3), data, tmp_path, token=token, backend=backend, encoder=encoder)
    assert summary.status == "completed" and summary.step == 3
    after = weights(token)
    assert all(not torch.equal(before[k], after[k]) for k in before if not k.endswith("feature_reduce.bias"))
    assert same(backend_before, backend.state_dict()) and same(encoder_before, encoder.state_dict())
    assert all(p.grad is None for p in list(backend.parameters()) + list(encoder.parameters()))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in token.embedders["l"].parameters()}
    # after the run the token is ready for inference
    assert not token.embedders["l"].training and not encoder.training


def test_data_that_cannot_start_a_new_epoch_is_refused(tmp_path):
    gen = (b for b in make_batches(2, 2))
    with pytest.raises(ValueError, match="one-shot iterator"):
        Trainer(cfg(steps=3), ToyBackend(), make_token(), None, gen, tmp_path).run()


def test_loss_decreases_on_a_learnable_problem(tmp_path):
    backend = ToyBackend()
    token = make_token(dropout=0.0)
    held_out = make_batches(4, 8, seed=99)
    before = eval_loss(token, backend, held_out)
    _, summary = train(cfg(steps=60, batch_size=8, base_lr=3e-3), make_batches(20, 8, seed=1), tmp_path,
                       token=token, backend=backend)
    after = eval_loss(token, backend, held_out)
    assert after < 0.5 * before, (before, after)
    # the learned vectors carry the class: shuffled audio does worse than matched audio
    shuffled = [dict(b, features=b["features"].roll(1, 0)) for b in held_out]
    assert after < eval_loss(token, backend, shuffled)
    assert all(math.isfinite(h["loss"]) for h in summary.history) and len(summary.history) == 60


def split_batches(batches, parts):
    """Each batch cut into `parts` consecutive smaller batches (the same samples, in order)."""
    out = []
    for b in batches:
        n = b["features"].shape[0] // parts
        out += [{k: v[i * n:(i + 1) * n] for k, v in b.items()} for i in range(parts)]
    return out


# Two parameters have a gradient that is zero in exact arithmetic (softmax shift
# invariance): the unary bias b_r always, the unary embed bias while every ReLU unit is
# active. Their gradient is float noise, which AdamW turns into lr-sized steps that depend
# on the summation order; they do not change the Embedder's output. Comparisons across
# summation orders (accumulation, data parallel) therefore check the other weights and
# the outputs.
SHIFT_INVARIANT = ("fga.un_models.0.feature_reduce.bias", "fga.un_models.0.embed.bias")


def assert_equivalent(token_a, token_b, atol=1e-6):
    wa, wb = weights(token_a), weights(token_b)
    for k in wa:
        if not k.endswith(SHIFT_INVARIANT):
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=1e-5), k
    features = make_batches(1, 8, seed=123)[0]["features"]
    token_a.eval(), token_b.eval()
    with torch.no_grad():
        for key in token_a.embedders:
            assert torch.allclose(token_a.embedders[key](features), token_b.embedders[key](features),
                                  atol=atol, rtol=1e-5)


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    big = make_batches(4, 4, seed=2)
    small = split_batches(big, 2)
    kw = dict(scale_lr=True, base_lr=2.5e-4)
    t1, s1 = train(cfg(steps=4, batch_size=4, **kw), big, tmp_path / "a", token=make_token(dropout=0.0))
    t2, s2 = train(cfg(steps=4, batch_size=2, grad_accum=2, **kw), small, tmp_path / "b",
                   token=make_token(dropout=0.0))
    assert t1.lr == t2.lr == pytest.approx(1e-3)
    assert_equivalent(t1.token, t2.token)
    assert [h["loss"] for h in s1.history] == pytest.approx([h["loss"] for h in s2.history], rel=1e-6)
    # the accumulated gradient of the last step is the big batch's gradient
    for p1, p2 in zip(t1.token.embedders["l"].parameters(), t2.token.embedders["l"].parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-7, rtol=1e-5)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    data = make_batches(3, 2)
    a, _ = train(cfg(seed=1), data, tmp_path / "a")
    b, _ = train(cfg(seed=1), data, tmp_path / "b")
    c, _ = train(cfg(seed=2), data, tmp_path / "c")
    assert same(weights(a.token), weights(b.token))
    assert not same(weights(a.token), weights(c.token))


def test_the_host_rng_is_left_alone(tmp_path):
    trainer = Trainer(cfg(steps=2), ToyBackend(), make_token(), None, make_batches(2, 2), tmp_path)
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    trainer.run()
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- checkpoints and resume


class ShuffledBatches:
    """Re-iterable data that reshuffles every epoch with the *global* python RNG."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.shuffle(order)
        return iter([self.batches[i] for i in order])


class StatefulBatches:
    """Data with state_dict/load_state_dict: iter() continues from the loaded position."""

    def __init__(self, batches):
        self.batches, self.position, self.loaded = batches, 0, False

    def __iter__(self):
        start = self.position if self.loaded else 0
        self.loaded = False
        for i in range(start, len(self.batches)):
            self.position = i + 1
            yield self.batches[i]
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position, self.loaded = int(state["position"]), True


@pytest.mark.parametrize("kind", ["shuffled", "stateful"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kind):
    wrap = ShuffledBatches if kind == "shuffled" else StatefulBatches
    batches = make_batches(4, 2, seed=4)  # 4 batches: the run crosses epochs
    config = cfg(steps=7, grad_accum=1, save_every=2, keep_last=2)  # pooling dropout stays on (0.5)
    random.seed(123)
    full, full_summary = train(config, wrap(batches), tmp_path / "full")

    random.seed(123)
    calls = iter(range(100))
    trainer = Trainer(config, ToyBackend(), make_token(), None, wrap(batches), tmp_path / "part")
    summary = trainer.run(should_stop=lambda: next(calls) >= 5)
    assert summary.status == "stopped" and summary.step == 5 and summary.final is None
    assert summary.checkpoint.endswith("audiotoken-step000005.safetensors")

    random.seed(999)  # a different host state must not matter
    resumed = Trainer(config, ToyBackend(), make_token(seed=77), None, wrap(batches), tmp_path / "part")
    assert resumed.resume(tmp_path / "part") == 5
    rest = resumed.run()
    assert rest.status == "completed" and rest.step == 7
    assert same(weights(full.token), weights(resumed.token))
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full_summary.history]
    # keep_last=2: only the two newest step checkpoints remain, plus the final token
    names = sorted(p.name for p in (tmp_path / "part").iterdir())
    assert names == ["audiotoken-step000006.safetensors", "audiotoken-step000006.state.pt",
                     "audiotoken-step000007.safetensors", "audiotoken-step000007.state.pt",
                     "audiotoken.safetensors"]


def test_checkpoint_files_load_weights_only_and_carry_metadata(tmp_path):
    config = cfg(steps=4, save_every=2, keep_last=0, lambda_cl=0.01)
    trainer, summary = train(config, make_batches(2, 2), tmp_path)
    token_path, state_path = checkpoint_paths(tmp_path, "audiotoken", 2)
    assert token_path.is_file() and state_path.is_file()
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"] and len(state["history"]) == 2
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert TrainConfig.from_dict(state["config"]) == config
    token = load_audiotoken(token_path)
    assert token.training_info["step"] == 2 and token.training_info["completed"] is False
    assert token.training_info["config"]["lambda_cl"] == 0.01
    final = load_audiotoken(summary.final)
    assert final.training_info["completed"] is True and final.training_info["step"] == 4
    assert same(weights(final), weights(trainer.token))
    with safe_open(summary.final, "pt") as f:
        assert json.loads(f.metadata()["training"])["lr"] == pytest.approx(1e-3)
    assert latest_checkpoint(tmp_path) == checkpoint_paths(tmp_path, "audiotoken", 4)[1]
    assert summary.history[-1]["cl"] > 0


def test_resume_refuses_an_incompatible_checkpoint(tmp_path):
    train(cfg(steps=2), make_batches(2, 2), tmp_path)
    other = Trainer(cfg(steps=4, batch_size=1), ToyBackend(), make_token(), None, make_batches(2, 1), tmp_path / "x")
    with pytest.raises(CheckpointError, match="batch_size was 2, now 1"):
        other.resume(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        other.resume(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        other.resume(tmp_path / "empty")
    sdxl = Trainer(cfg(steps=4), ToyBackend(widths={"l": 8, "g": 5}), make_token(widths={"l": 8, "g": 5}), None,
                   make_batches(2, 2), tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"holds Embedders \{'l': 8\}.*needs \{'g': 5, 'l': 8\}.*model family"):
        sdxl.resume(tmp_path / "audiotoken-step000002.safetensors")
    other_encoder = AudioEncoder(EncoderSpec(kind="beats", layers=(1, 2), hidden_size=4))
    narrow = Trainer(cfg(steps=4), ToyBackend(), new_audiotoken({"l": 8}, other_encoder.spec), other_encoder,
                     make_batches(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match=r"trained on beats layers \[1, 2, 3\].*Load the encoder the token was"):
        narrow.resume(tmp_path / "audiotoken-step000002.safetensors")
    (tmp_path / "audiotoken-step000002.state.pt").unlink()
    with pytest.raises(CheckpointError, match="step000002.state.pt does not exist"):
        other.resume(tmp_path / "audiotoken-step000002.safetensors")
    t = Trainer(cfg(steps=4), ToyBackend(), make_token(), None, make_batches(2, 2), tmp_path / "y")
    t.run(should_stop=lambda: t.step >= 1)
    changed = Trainer(cfg(steps=4, base_lr=5e-4), ToyBackend(), make_token(), None, make_batches(2, 2), tmp_path / "y")
    with pytest.warns(UserWarning, match="base_lr"):
        changed.resume(tmp_path / "y")
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    backend = ToyBackend()
    backend.nan_at_call = 5  # the 5th forward (step 5) returns NaN
    trainer = Trainer(cfg(steps=10, save_every=2, keep_last=0), backend, make_token(), None, make_batches(3, 2),
                      tmp_path)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 5.*step000004.*Lower the learning rate") as info:
        trainer.run()
    assert info.value.step == 5 and math.isnan(info.value.parts["loss"])
    assert info.value.checkpoint.endswith("audiotoken-step000004.safetensors")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"audiotoken-step00000{s}{ext}" for s in (2, 4) for ext in (".safetensors", ".state.pt")]
    saved = load_audiotoken(info.value.checkpoint)
    assert same(weights(saved), weights(trainer.token))  # the bad update was not applied
    assert all(torch.isfinite(t).all() for t in weights(saved).values())
    assert len(trainer.history) == 4


# --------------------------------------------------------------------------- precision


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights(tmp_path):
    backend = ToyBackend()
    token = make_token()
    before = weights(token)
    trainer, summary = train(cfg(steps=3, precision="bf16"), make_batches(3, 2), tmp_path, token=token,
                             backend=backend)
    assert set(backend.vector_dtypes) == {torch.bfloat16}  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in token.embedders["l"].parameters())
    assert not same(before, weights(token))
    assert all(math.isfinite(h["loss"]) for h in summary.history)
    assert all(p.dtype == torch.float32 for p in load_audiotoken(summary.final).parameters())


def test_fp16_uses_a_gradient_scaler(tmp_path):
    trainer, summary = train(cfg(steps=3, precision="fp16"), make_batches(3, 2), tmp_path)
    assert trainer.scaler is not None
    state = torch.load(summary.state, weights_only=True)
    assert state["scaler"]["scale"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.token.embedders["l"].parameters())


def test_should_stop_saves_a_checkpoint_and_returns(tmp_path):
    progress = []
    trainer = Trainer(cfg(steps=50, save_every=1000), ToyBackend(), make_token(), None, make_batches(2, 2), tmp_path)
    summary = trainer.run(progress=lambda step, info: progress.append((step, info["loss"])),
                          should_stop=lambda: len(progress) >= 3)
    assert summary.status == "stopped" and summary.step == 3 and [p[0] for p in progress] == [1, 2, 3]
    assert summary.final is None
    assert load_audiotoken(summary.checkpoint).training_info["step"] == 3
    assert torch.load(summary.state, weights_only=True)["step"] == 3


def test_the_protocol_is_satisfied_by_the_toy_backend():
    assert isinstance(ToyBackend(), DiffusionBackend)


class Cancelled(Exception):
    """Stands for ComfyUI's InterruptProcessingException (an Exception raised from inside the model)."""


def interrupt_at(backend, call):
    """Make the backend's ``call``-th diffusion_loss raise Cancelled, as a Cancel inside the UNet does."""
    original = backend.diffusion_loss

    def diffusion_loss(*args):
        if backend.calls + 1 == call:
            backend.calls += 1
            raise Cancelled
        return original(*args)

    backend.diffusion_loss = diffusion_loss
    return backend


@pytest.mark.parametrize("grad_accum, call, kept", [(1, 4, 3), (2, 6, 2)])
def test_an_exception_inside_a_step_keeps_the_last_completed_step(tmp_path, grad_accum, call, kept):
    """Three batches per epoch: the interrupted step opened a new epoch (reshuffled with the global RNG)."""
    data = ShuffledBatches(make_batches(3, 2, seed=4))
    config = cfg(steps=6, grad_accum=grad_accum, save_every=1000)  # no periodic checkpoint before the end
    random.seed(5)
    full, full_summary = train(config, data, tmp_path / "full")

    random.seed(5)
    trainer = Trainer(config, interrupt_at(ToyBackend(), call), make_token(), None, data, tmp_path / "part")
    with pytest.raises(Cancelled):
        trainer.run()
    names = sorted(p.name for p in (tmp_path / "part").iterdir())
    assert names == [f"audiotoken-step{kept:06d}.safetensors", f"audiotoken-step{kept:06d}.state.pt"]
    assert load_audiotoken(tmp_path / "part" / names[0]).training_info["step"] == kept

    random.seed(999)
    resumed = Trainer(config, ToyBackend(), make_token(seed=77), None, data, tmp_path / "part")
    assert resumed.resume(tmp_path / "part") == kept
    rest = resumed.run()
    assert rest.step == 6 and same(weights(resumed.token), weights(full.token))
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full_summary.history]


def test_a_raising_progress_callback_keeps_the_step_it_reported(tmp_path):
    def progress(step, info):
        if step == 2:
            raise Cancelled

    trainer = Trainer(cfg(steps=5), ToyBackend(), make_token(), None, make_batches(3, 2), tmp_path)
    with pytest.raises(Cancelled):
        trainer.run(progress=progress)
    assert load_audiotoken(checkpoint_paths(tmp_path, "audiotoken", 2)[0]).training_info["step"] == 2


def test_build_and_resume_under_inference_mode_match_the_uninterrupted_run(tmp_path):
    """ComfyUI runs nodes under torch.inference_mode(): the trainer must still train and resume."""
    data = make_batches(3, 2)
    config = cfg(steps=5)
    full, _ = train(config, data, tmp_path / "full")
    part = Trainer(config, ToyBackend(), make_token(), None, data, tmp_path / "part")
    part.run(should_stop=lambda: part.step >= 2)

    backend = ToyBackend()  # a backend keeps its own tensors usable by autograd (ComfyBackend copies its models)
    with torch.inference_mode():
        token = make_token(seed=77)
        resumed = Trainer(config, backend, token, None, make_batches(3, 2), tmp_path / "part")
        assert resumed.resume(tmp_path / "part") == 2
        resumed.run()
    assert not any(p.is_inference() for e in token.embedders.values() for p in e.parameters())
    state = [t for s in resumed.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert state and not any(t.is_inference() for t in state)
    assert same(weights(token), weights(full.token))


# --------------------------------------------------------------------------- text match (not the paper's objective)


def test_objective_settings_are_validated():
    assert TrainConfig().objective == "diffusion" and TrainConfig().warm_start_steps == 0  # the paper's by default
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="clip")
    with pytest.raises(ValueError, match="set it to 0"):
        TrainConfig(objective="text_match", warm_start_steps=5)
    with pytest.raises(ValueError, match="must be below steps"):
        TrainConfig(steps=10, warm_start_steps=10)
    with pytest.raises(ValueError, match="warm_start_steps must be an int >= 0"):
        TrainConfig(warm_start_steps=-1)
    warm = TrainConfig(steps=10, warm_start_steps=4)
    assert [warm.objective_at(s) for s in (0, 3, 4, 9)] == ["text_match", "text_match", "diffusion", "diffusion"]
    assert warm.needs_images and not TrainConfig(objective="text_match").needs_images
    assert TrainConfig.from_dict(warm.to_dict()) == warm


def text_batches(num_batches, batch_size, seed=0):
    """Features and labels only: no latents, no images."""
    return [{"features": b["features"], "label": b["label"]} for b in make_batches(num_batches, batch_size, seed)]


@torch.no_grad()
def eval_text_match(token, backend, batches):
    token.eval()
    losses = [backend.text_match_loss("a photo of <audio>", "<audio>",
                                      {k: e(b["features"]) for k, e in token.embedders.items()}, b["label"])
              for b in batches]
    return float(torch.cat(losses).mean())


def test_text_match_alone_learns_without_images_or_the_diffusion_model(tmp_path):
    backend = ToyBackend()
    token = make_token(dropout=0.0)
    held_out = text_batches(4, 8, seed=99)
    before = eval_text_match(token, backend, held_out)
    backend.text_match_calls = 0
    config = cfg(steps=40, batch_size=8, base_lr=1e-2, lambda_l1=0.0, objective="text_match")
    _, summary = train(config, text_batches(10, 8, seed=1), tmp_path, token=token, backend=backend)
    assert backend.calls == 0 and backend.image_calls == 0 and backend.text_match_calls == 40
    after = eval_text_match(token, backend, held_out)
    assert after < 0.3 * before, (before, after)
    shuffled = [dict(b, label=b["label"][1:] + b["label"][:1]) for b in held_out]
    assert after < 0.5 * eval_text_match(token, backend, shuffled)  # the vector says the sound's own label
    assert all(h["diffusion"] == 0.0 and h["text_match"] > 0 for h in summary.history)
    first = summary.history[0]
    assert first["loss"] == pytest.approx(first["text_match"] + 0.0 * first["l1"])
    assert load_audiotoken(summary.final).training_info["config"]["objective"] == "text_match"


def test_text_match_loss_parts_add_up_with_l1_and_cl(tmp_path):
    data = text_batches(1, 2)
    token = make_token(dropout=0.0)
    backend = ToyBackend()
    with torch.no_grad():
        vectors = {"l": token.embedders["l"](data[0]["features"])}
        match = backend.text_match_loss("a photo of <audio>", "<audio>", vectors, data[0]["label"]).mean()
        cl = classification_loss(vectors, backend.label_targets(data[0]["label"]))
        l1 = vectors["l"].abs().mean()
    _, summary = train(cfg(steps=1, objective="text_match", lambda_cl=0.5), data, tmp_path, token=token, backend=backend)
    h = summary.history[0]
    assert h["text_match"] == pytest.approx(float(match), rel=1e-5) and h["l1"] == pytest.approx(float(l1), rel=1e-5)
    assert h["cl"] == pytest.approx(float(cl), rel=1e-5)
    assert h["loss"] == pytest.approx(float(match + 0.01 * l1 + 0.5 * cl), rel=1e-5)


def test_a_backend_without_text_match_is_refused(tmp_path):
    class DiffusionOnly:
        widths, prediction = {"l": 8}, "eps"

    with pytest.raises(ValueError, match="needs a backend with text_match_loss; DiffusionOnly"):
        Trainer(cfg(objective="text_match"), DiffusionOnly(), make_token(), None, text_batches(2, 2), tmp_path)
    data = [{"features": b["features"]} for b in text_batches(2, 2)]
    with pytest.raises(ValueError, match="needs the sound's label"):
        Trainer(cfg(objective="text_match"), ToyBackend(), make_token(), None, data, tmp_path).run()


def test_warm_start_switches_at_its_step_and_resumes_across_the_switch(tmp_path):
    batches = make_batches(3, 2, seed=4)
    config = cfg(steps=6, warm_start_steps=3, save_every=1, keep_last=0)
    backend = ToyBackend()
    random.seed(0)
    full, summary = train(config, ShuffledBatches(batches), tmp_path / "full", backend=backend)
    phases = ["text_match" if h["text_match"] > 0 and h["diffusion"] == 0 else
              "diffusion" if h["diffusion"] > 0 and h["text_match"] == 0 else "?" for h in summary.history]
    assert phases == ["text_match"] * 3 + ["diffusion"] * 3
    assert backend.text_match_calls == 3 and backend.calls == 3

    for stop in (2, 4):  # stopped before and after the switch
        random.seed(0)
        part = Trainer(config, ToyBackend(), make_token(), None, ShuffledBatches(batches), tmp_path / f"p{stop}")
        part.run(should_stop=lambda part=part, stop=stop: part.step >= stop)
        random.seed(999)
        resumed_backend = ToyBackend()
        resumed = Trainer(config, resumed_backend, make_token(seed=77), None, ShuffledBatches(batches),
                          tmp_path / f"p{stop}")
        assert resumed.resume(tmp_path / f"p{stop}") == stop
        rest = resumed.run()
        assert resumed_backend.text_match_calls == max(0, 3 - stop) and resumed_backend.calls == 6 - max(3, stop)
        assert [h["loss"] for h in rest.history] == [h["loss"] for h in summary.history], stop
        assert same(weights(resumed.token), weights(full.token)), stop
