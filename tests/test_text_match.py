"""nodes/text_match.py: the text-match objective (NOT the paper's) on ComfyUI's own text encoders.

SD1.x: a small CLIP-L of ComfyUI's classes (real tokenizer, 64 wide) inside a ComfyBackend, as
training uses it. T5: tools/tiny_text_encoders' Flux.1 CLIP (CLIP-L pooled + T5-XXL sequence),
directly and inside a ComfyBackend with a tiny Flux model. LLM: its Qwen-Image CLIP (chat template). The independent computation encodes both prompts with ComfyUI's own `encode_from_tokens`
(the inference splice path) and aligns the rows by hand from the known token counts.
"""
from __future__ import annotations

import math

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import comfy.model_base  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from audiotoken.nodes.comfy_backend import ComfyBackend  # noqa: E402
from audiotoken.nodes.splice import _stand_in_tokens, splice_tokens  # noqa: E402
from audiotoken.nodes.text_match import ROW_EPS, TextMatchError, align_rows, text_match_loss  # noqa: E402

PH = "<audio>"
PROMPT = f"a photo of {PH}"


def _init_module(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI layers start as torch.empty: seeded values, norms at 1."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        is_norm = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or type(m).__name__.endswith("LayerNorm")
        for name, p in m.named_parameters(recurse=False):
            if is_norm or name == "logit_scale":
                p.fill_(1.0 if name == "weight" else 0.0) if name != "logit_scale" else None
            elif p.dim() >= 2:
                scale = 0.5 if isinstance(m, torch.nn.Embedding) else 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@pytest.fixture(scope="module")
def sd1():
    """(CLIP, ComfyBackend) of a small SD1.5 (CLIP-L 64 wide, one UNet level), built as a loader would."""
    width = 64
    unet = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "context_dim": width,
            "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_resblock": False,
            "use_temporal_attention": False}
    with torch.inference_mode():
        config = comfy.supported_models.SD15(unet)
        config.unet_config.update(num_heads=-1, num_head_channels=16)
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
        _init_module(base, seed=1)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
        text = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 4,
                "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77}
        clip = comfy.sd.CLIP(target=config.clip_target(),
                             model_options={"dtype": torch.float32, "clip_l_model_config": text})
        _init_module(clip.cond_stage_model, seed=2)
        backend = ComfyBackend(model, clip)
    yield clip, backend
    backend.close()


def _label_ids(clip, text: str, key: str) -> list[int]:
    """The tokens of `text` alone, without start/end/pad (word id 0)."""
    return [int(t) for chunk in clip.tokenize(text, return_word_ids=True)[key] for t, _, w in chunk if w != 0]


def _relative(a, b):
    return ((a - b).pow(2).mean(-1) / (b.pow(2).mean(-1) + ROW_EPS))


def _independent_sd1(clip, vector, label):
    """The formula written out for SD1's one stream: "a photo of" is 3 tokens, so the audio word is row 4."""
    with torch.no_grad():
        cond_a, pooled_a = clip.encode_from_tokens(splice_tokens(clip, PROMPT, PH, {"l": vector}), return_pooled=True)
        cond_b, pooled_b = clip.encode_from_tokens(clip.tokenize(f"a photo of {label}"), return_pooled=True)
    a, b = cond_a[0].float(), cond_b[0].float()
    m = len(_label_ids(clip, label, "l"))
    assert len(_label_ids(clip, "a photo of", "l")) == 3 and a.shape[0] == b.shape[0] == 77
    rows = torch.cat([_relative(a[:4], b[:4]),                                    # start, a, photo, of
                      _relative(a[4:5], b[4:4 + m].mean(0, keepdim=True)),         # the audio word vs the label's mean
                      _relative(a[5:78 - m], b[4 + m:77])])                        # shifted by m - 1; the rest fell off
    return (rows.mean() + _relative(pooled_a.float(), pooled_b.float()).mean()) / 2


def test_alignment_of_multi_token_labels_and_repeated_words():
    S, E, P = 100, 101, 0
    # CLIP-like, padded: [start a photo of <w> , x end pad...] vs the 3-token label 7 8 9
    prompt = [S, 1, 2, 3, None, 4, 5, E, P, P]
    labelled = [S, 1, 2, 3, 7, 8, 9, 4, 5, E]
    rows_a, rows_b, words = align_rows(prompt, labelled)
    assert words == [(4, 4, 3)]
    assert list(zip(rows_a, rows_b)) == [(0, 0), (1, 1), (2, 2), (3, 3), (5, 7), (6, 8), (7, 9)]  # pads fell off
    # SD1: pad == end; two audio words; unpadded (T5-like) sequence lengths differ by 2 (m - 1)
    prompt = [S, None, 1, None, E, E, E, E]
    labelled = [S, 7, 8, 1, 7, 8, E, E]
    assert align_rows(prompt, labelled) == ([0, 2, 4, 5], [0, 3, 6, 7], [(1, 1, 2), (3, 4, 2)])
    assert align_rows([1, None, 2, E], [1, 7, 8, 2, E]) == ([0, 2, 3], [0, 3, 4], [(1, 1, 2)])
    # a label whose last token equals the next prompt token still aligns on its real length
    assert align_rows([S, None, 5, E], [S, 7, 5, 5, E]) == ([0, 2, 3], [0, 3, 4], [(1, 1, 2)])
    # with the label's length known (tokenized alone): a run spilling into a second chunk is refused, not guessed
    prompt, labelled = [S, 1, None, E, E, E], [S, 1, 7, 8, E, S, 9, E, E, E, E, E]
    assert align_rows(prompt, labelled)[2] == [(2, 2, 7)]  # the smallest consistent length swallows the chunk end
    with pytest.raises(TextMatchError, match="no longer fits one 77-token chunk"):
        align_rows(prompt, labelled, label_length=3)
    with pytest.raises(TextMatchError, match="no longer fits one 77-token chunk"):
        align_rows([S, 1, None, E, P], [S, 2, 7, E, P])
    with pytest.raises(TextMatchError, match="no audio word"):
        align_rows([S, 1, E], [S, 1, E])


def test_sd1_loss_equals_the_formula_for_one_and_several_label_tokens(sd1):
    clip, backend = sd1
    gen = torch.Generator().manual_seed(0)
    vectors = {"l": torch.randn(3, 64, generator=gen) * 0.5}
    labels = ["dog", "a dog barking loudly", "(rain):1.5"]  # 1 token, several, prompt syntax kept literal
    assert len(_label_ids(clip, "dog", "l")) == 1 and len(_label_ids(clip, labels[1], "l")) == 4
    got = backend.text_match_loss(PROMPT, PH, vectors, labels)
    assert got.shape == (3,)
    want = [_independent_sd1(clip, vectors["l"][0], "dog"), _independent_sd1(clip, vectors["l"][1], labels[1]),
            _independent_sd1(clip, vectors["l"][2], r"\(rain\):1.5")]
    torch.testing.assert_close(got.detach(), torch.stack(want), rtol=1e-5, atol=1e-7)
    assert all(v > 1e-3 for v in got.tolist())


def test_sd1_loss_is_zero_for_the_labels_own_embedding_and_moves_the_vector(sd1):
    clip, backend = sd1
    (dog,) = _label_ids(clip, "dog", "l")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    exact = {"l": table[dog].detach().clone()[None]}
    assert float(backend.text_match_loss(PROMPT, PH, exact, ["dog"])[0]) < 1e-10
    cat = {"l": table[_label_ids(clip, "cat", "l")[0]].detach().clone()[None]}
    assert float(backend.text_match_loss(PROMPT, PH, cat, ["dog"])[0]) > 1e-3

    # gradients reach the vector and agree with a central finite difference along a random direction
    gen = torch.Generator().manual_seed(1)
    v = (torch.randn(1, 64, generator=gen) * 0.5).requires_grad_(True)
    loss = backend.text_match_loss(PROMPT, PH, {"l": v}, ["dog barking"]).sum()
    loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and float(v.grad.norm()) > 0
    d = torch.randn(1, 64, generator=gen)
    h = 1e-2
    with torch.no_grad():
        plus = backend.text_match_loss(PROMPT, PH, {"l": v + h * d}, ["dog barking"]).sum()
        minus = backend.text_match_loss(PROMPT, PH, {"l": v - h * d}, ["dog barking"]).sum()
    assert float((plus - minus) / (2 * h)) == pytest.approx(float((v.grad * d).sum()), rel=2e-2, abs=1e-5)
    # under ComfyUI's inference mode (inside a node) the backend still records gradients
    with torch.inference_mode():
        under = backend.text_match_loss(PROMPT, PH, {"l": v}, ["dog barking"])
    assert under.requires_grad


def test_bad_labels_are_refused(sd1):
    _, backend = sd1
    v = {"l": torch.zeros(2, 64)}
    with pytest.raises(TextMatchError, match="one label per sample: got 1 labels for 2"):
        backend.text_match_loss(PROMPT, PH, v, ["dog"])
    with pytest.raises(TextMatchError, match="empty label"):
        backend.text_match_loss(PROMPT, PH, v, ["dog", "  "])
    long_prompt = " ".join(["word"] * 70) + f" {PH}"
    with pytest.raises(TextMatchError, match="shorten the prompt or the label"):
        backend.text_match_loss(long_prompt, PH, v, ["dog", "a very long label that spills over the chunk"])


# -- a T5 family: Flux.1 (CLIP-L pooled + T5-XXL sequence) --------------------------------------

@pytest.fixture(scope="module")
def flux():
    from tools.tiny_text_encoders import tiny_clip

    return tiny_clip("flux")


def _streams(clip, tokens):
    """Each stream's own encode_token_weights, called directly: {key: (rows [T, D], pooled or None)}."""
    clip.cond_stage_model.reset_clip_options()
    clip.load_model()
    model = clip.cond_stage_model
    out = {}
    for key, encoder in (("l", model.clip_l), ("t5xxl", model.t5xxl)):
        result = encoder.encode_token_weights(tokens[key])
        out[key] = (result[0][0].float(), None if result[1] is None else result[1][0].float())
    return out


def _t5_ids(clip, text):
    """T5 tokens of `text` without the padding (pad id 0)."""
    return [int(t) for chunk in clip.tokenize(text, return_word_ids=True)["t5xxl"] for t, *_ in chunk if int(t) != 0]


def _independent_flux(clip, vectors, label):
    """The formula for Flux's two streams. T5 has no start token: "a photo of" is rows 0..k-1, the word
    row k, and the tokenizer pads with pad 0 (to 256 for Flux); CLIP-L as in SD1 (word at row 4), plus its pooled output."""
    with torch.no_grad():
        spliced = splice_tokens(clip, PROMPT, PH, vectors)
        a = _streams(clip, spliced)
        b = _streams(clip, clip.tokenize(f"a photo of {label}"))
        cond_a, pooled = clip.encode_from_tokens(spliced, return_pooled=True)  # Flux's cond: T5; pooled: CLIP-L's
    torch.testing.assert_close(a["t5xxl"][0], cond_a[0].float())
    torch.testing.assert_close(a["l"][1], pooled[0].float())
    m_l = len(_label_ids(clip, label, "l"))
    prefix = _t5_ids(clip, "a photo of")[:-1]  # without the end token: the rows before the word
    m_t5 = len(_t5_ids(clip, f"a photo of {label}")) - len(prefix) - 1
    k = len(prefix)
    assert _t5_ids(clip, f"a photo of {label}")[:k] == prefix
    (la, pa), (lb, pb) = a["l"], b["l"]
    (ta, _), (tb, _) = a["t5xxl"], b["t5xxl"]
    n = ta.shape[0]
    assert tb.shape[0] == n > len(_t5_ids(clip, f"a photo of {label}"))  # padded to the tokenizer's min_length
    seq_l = torch.cat([_relative(la[:4], lb[:4]), _relative(la[4:5], lb[4:4 + m_l].mean(0, keepdim=True)),
                       _relative(la[5:78 - m_l], lb[4 + m_l:77])]).mean()
    seq_t5 = torch.cat([_relative(ta[:k], tb[:k]), _relative(ta[k:k + 1], tb[k:k + m_t5].mean(0, keepdim=True)),
                        _relative(ta[k + 1:n + 1 - m_t5], tb[k + m_t5:n])]).mean()
    return (seq_l + _relative(pa, pb) + seq_t5) / 3, m_l, m_t5


def test_flux_t5_loss_equals_the_formula_and_is_zero_for_the_labels_embeddings(flux):
    from tools.tiny_text_encoders import text_encoders

    clip = flux
    gen = torch.Generator().manual_seed(3)
    vectors = {"l": torch.randn(2, 768, generator=gen) * 0.02, "t5xxl": torch.randn(2, 4096, generator=gen)}
    labels = ["dog", "a siren wailing in the rain"]
    with torch.no_grad():
        got = text_match_loss(clip, _stand_in_tokens(clip, PROMPT, PH), PROMPT, PH, vectors, labels)
    want = [_independent_flux(clip, {k: v[i] for k, v in vectors.items()}, label) for i, label in enumerate(labels)]
    assert want[1][2] > 2 and want[1][1] > 2  # several tokens in both streams
    torch.testing.assert_close(got, torch.stack([w[0] for w in want]), rtol=1e-5, atol=1e-7)

    # "dog" is one token for both tokenizers: its own input embeddings give exactly the label's outputs
    assert want[0][1] == want[0][2] == 1
    encoders = text_encoders(clip)
    ids = {"l": _label_ids(clip, "dog", "l")[0], "t5xxl": _t5_ids(clip, "dog")[0]}
    exact = {k: encoders[k].transformer.get_input_embeddings().weight[i].detach().clone()[None] for k, i in ids.items()}
    with torch.no_grad():
        zero = text_match_loss(clip, _stand_in_tokens(clip, PROMPT, PH), PROMPT, PH, exact, ["dog"])
    assert float(zero[0]) < 1e-10


def test_trainer_with_text_match_on_comfyui_lowers_the_loss_without_the_diffusion_model(sd1, tmp_path, monkeypatch):
    from audiotoken.audiotoken_core.training import Trainer, TrainConfig, new_audiotoken

    _, backend = sd1

    def unused(*args, **kwargs):
        raise AssertionError("text match must not run the diffusion model or the VAE")

    monkeypatch.setattr(backend, "diffusion_loss", unused)
    monkeypatch.setattr(backend, "encode_images", unused)
    encoder = {"kind": "beats", "layers": [1], "hidden_size": 8, "sample_rate": 16000}
    token = new_audiotoken(backend.widths, encoder, seed=0, pooling_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = {"features": torch.randn(2, 5, 8, generator=gen), "label": ["dog barking", "rain"]}
    config = TrainConfig(steps=5, batch_size=2, base_lr=3e-2, scale_lr=False, lambda_l1=0.0, save_every=0,
                         objective="text_match", prompt=PROMPT, placeholder=PH)
    with torch.inference_mode():  # as inside the training node
        summary = Trainer(config, backend, token, None, [batch], tmp_path).run()
    losses = [h["text_match"] for h in summary.history]
    assert summary.status == "completed" and all(h["diffusion"] == 0.0 for h in summary.history)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses


def test_an_llm_family_inside_its_chat_template_is_zero_exactly_for_the_labels_embedding():
    """Qwen-Image wraps the prompt in a chat template (system prompt before, end-of-turn after)."""
    from tools.tiny_text_encoders import text_encoders, tiny_clip

    clip = tiny_clip("qwen_image")
    (key,) = clip.tokenize("x").keys()

    def ids(text):
        return [int(t) for chunk in clip.tokenize(text, return_word_ids=True)[key] for t, *_ in chunk]

    with_dog, without = ids("a photo of dog"), ids("a photo of")
    assert len(with_dog) == len(without) + 1 and len(without) > 20  # " dog" is one token; the template is long
    dog = next(t for i, t in enumerate(with_dog) if i >= len(without) or t != without[i])
    table = text_encoders(clip)[key].transformer.get_input_embeddings().weight
    tokens = _stand_in_tokens(clip, PROMPT, PH)
    with torch.no_grad():
        exact = text_match_loss(clip, tokens, PROMPT, PH, {key: table[dog].clone()[None]}, ["dog"])
        other = text_match_loss(clip, tokens, PROMPT, PH, {key: table[dog].clone()[None]}, ["dog barking"])
    assert float(exact[0]) < 1e-10 and float(other[0]) > 1e-4


def test_gradients_reach_both_flux_vectors_through_the_training_copy(flux):
    """ComfyBackend's private, autograd-safe copy of the Flux CLIP: the T5 and CLIP-L vectors both learn."""
    from tools.placeholder_dit import tiny_model

    with torch.inference_mode():  # as a loader node would build them
        backend = ComfyBackend(tiny_model("flux", context_dim=4096, pooled_dim=768), flux, guidance=3.5)
    try:
        gen = torch.Generator().manual_seed(4)
        vectors = {"l": (torch.randn(1, 768, generator=gen) * 0.02).requires_grad_(True),
                   "t5xxl": torch.randn(1, 4096, generator=gen).requires_grad_(True)}
        loss = backend.text_match_loss(PROMPT, PH, vectors, ["a siren wailing"])
        with torch.no_grad():
            direct = text_match_loss(flux, _stand_in_tokens(flux, PROMPT, PH), PROMPT, PH, vectors, ["a siren wailing"])
        torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=1e-7)  # the copy computes the same loss
        loss.sum().backward()
        for key, v in vectors.items():
            assert v.grad is not None and torch.isfinite(v.grad).all() and float(v.grad.abs().sum()) > 0, key
    finally:
        backend.close()
