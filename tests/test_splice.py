"""nodes/splice.py on real ComfyUI CLIP objects (SD1.x, SD2.x, SDXL), in-process, no server.
(The other families: tests/test_families_encode.py.)

The CLIPs are ComfyUI's own classes (`comfy.sd.CLIP` with the `clip_target()` of
`comfy.supported_models.SD15 / SD20 / SDXL`) with narrow, 3-layer text models (real vocab
of 49408 and 77 positions) and seeded weights. The reference for every spliced encode is
classic textual inversion: a second CLIP with the same weights in which one real
single-token word ("zebra") has its input-embedding row overwritten by the vector.
"""
from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path

import pytest
import torch

from tools.comfy_root import import_comfy
from tools.learn_world import init_clip_weights

REPO_ROOT = Path(__file__).resolve().parent.parent

import_comfy(cpu=True)
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402


def _load_splice():
    """nodes/splice.py as a standalone module (the nodes package itself needs comfy_api)."""
    spec = importlib.util.spec_from_file_location("audiotoken_splice_under_test", REPO_ROOT / "nodes" / "splice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


splice = _load_splice()
PromptError = splice.PromptError

PH = "<audio>"
START, END = 49406, 49407
TI_WORD = "zebra"  # one CLIP BPE token; stands in for the placeholder in the reference CLIP
FAMILIES = {
    # family: (supported model, text-encoder widths, pad token per key)
    "sd1": (comfy.supported_models.SD15, {"l": 64}, {"l": END}),
    "sd2": (comfy.supported_models.SD20, {"h": 80}, {"h": 0}),
    "sdxl": (comfy.supported_models.SDXL, {"g": 96, "l": 64}, {"g": 0, "l": END}),
}
ATOL = 1e-5


def _text_config(width: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 4,
            "num_hidden_layers": 3, "vocab_size": 49408, "max_position_embeddings": 77}


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI layers are created with torch.empty: give every weight a seeded value."""
    init_clip_weights(module, seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        assert torch.isfinite(t).all(), name


def build_clip(family: str, seed: int = 0):
    model_cls, widths, _ = FAMILIES[family]
    target = model_cls(dict(model_cls.unet_config)).clip_target()
    options = {"dtype": torch.float32}
    for key, width in widths.items():
        options[f"clip_{key}_model_config"] = _text_config(width)
    clip = comfy.sd.CLIP(target=target, model_options=options)
    _init_weights(clip.cond_stage_model, seed)
    return clip


@pytest.fixture(scope="module")
def clips():
    return {family: build_clip(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def ref_clips(clips):
    """Same weights as `clips`, used for the textual-inversion reference."""
    refs = {}
    for family, clip in clips.items():
        ref = build_clip(family, seed=12345)
        ref.cond_stage_model.load_state_dict(clip.cond_stage_model.state_dict())
        refs[family] = ref
    return refs


def encoder(clip, key):
    return getattr(clip.cond_stage_model, f"clip_{key}").transformer


def ti_token_id(clip) -> int:
    ids = {key: [int(t) for t, _, word in chunks[0] if word != 0]
           for key, chunks in clip.tokenize(TI_WORD, return_word_ids=True).items()}
    assert all(len(v) == 1 for v in ids.values()), ids
    (token,) = {v[0] for v in ids.values()}
    return token


def reference_encode(ref, text: str, vectors: dict[str, torch.Tensor]):
    """Classic textual inversion: overwrite the TI word's embedding row, write the word in the prompt."""
    assert TI_WORD not in text
    token = ti_token_id(ref)
    for key, vec in vectors.items():
        with torch.no_grad():
            encoder(ref, key).get_input_embeddings().weight[token] = vec.to(torch.float32)
    tokens = ref.tokenize(text.replace(PH, TI_WORD))
    return ref.encode_from_tokens_scheduled(tokens)


def random_vectors(family: str, batch: int = 1, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, w, generator=gen) * 0.5 for k, w in sorted(FAMILIES[family][1].items())}


def cond_and_pooled(conditioning):
    assert len(conditioning) == 1
    cond, extras = conditioning[0]
    return cond, extras["pooled_output"]


def assert_same_conditioning(got, want, atol=ATOL):
    cond, pooled = cond_and_pooled(got)
    want_cond, want_pooled = cond_and_pooled(want)
    assert cond.shape == want_cond.shape
    assert pooled.shape == want_pooled.shape
    torch.testing.assert_close(cond, want_cond, atol=atol, rtol=0)
    torch.testing.assert_close(pooled, want_pooled, atol=atol, rtol=0)


def is_int(token) -> bool:
    return isinstance(token, numbers.Integral)


def assert_chunk_layout(chunk, pad: int) -> int:
    """77 entries: start, content (no end token inside), end, then only pads. Returns the end index."""
    assert len(chunk) == 77
    assert is_int(chunk[0][0]) and int(chunk[0][0]) == START
    first_end = next(i for i, e in enumerate(chunk) if is_int(e[0]) and int(e[0]) == END)
    for entry in chunk[1:first_end]:
        assert not (is_int(entry[0]) and int(entry[0]) in (START, END)), entry
    for entry in chunk[first_end + 1:]:
        assert is_int(entry[0]) and int(entry[0]) == pad and entry[1] == 1.0, (first_end, entry)
    return first_end


def vector_entries(tokens: dict, key: str) -> list:
    """(chunk, position, (vector, weight, word id)) of each vector entry."""
    return [(c, i, (splice.entry_vector(e[0]), *e[1:])) for c, chunk in enumerate(tokens[key]) for i, e in enumerate(chunk)
            if splice.entry_vector(e[0]) is not None]


# -- the CLIPs themselves -----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_clip_families_and_widths(clips, family):
    clip = clips[family]
    widths = FAMILIES[family][1]
    assert set(clip.tokenize("").keys()) == set(widths)
    assert splice.clip_family(widths) == {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[family]
    assert splice.clip_widths(clip) == widths
    for key, pad in FAMILIES[family][2].items():
        empty = clip.tokenize("")[key][0]
        assert int(empty[0][0]) == START and int(empty[1][0]) == END and int(empty[-1][0]) == pad


# -- 1. equal to textual inversion -------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_equals_textual_inversion(clips, ref_clips, family):
    vectors = random_vectors(family)
    text = f"a photo of {PH} in the rain"
    got = splice.encode_with_vectors(clips[family], text, PH, vectors, "test")
    want = reference_encode(ref_clips[family], text, {k: v[0] for k, v in vectors.items()})
    assert_same_conditioning(got, want)
    # the vector matters: another vector gives another conditioning
    other = splice.encode_with_vectors(clips[family], text, PH, random_vectors(family, seed=8), "test")
    assert not torch.allclose(cond_and_pooled(other)[0], cond_and_pooled(got)[0], atol=1e-3)


def test_sdxl_uses_both_vectors(clips):
    clip = clips["sdxl"]
    text = f"the sound of {PH}"
    base = random_vectors("sdxl")
    new = random_vectors("sdxl", seed=9)
    cond, pooled = cond_and_pooled(splice.encode_with_vectors(clip, text, PH, base, "test"))
    width_l = FAMILIES["sdxl"][1]["l"]
    assert cond.shape == (1, 77, width_l + FAMILIES["sdxl"][1]["g"])

    cond_l, pooled_l = cond_and_pooled(splice.encode_with_vectors(clip, text, PH, {**base, "l": new["l"]}, "test"))
    assert not torch.allclose(cond_l[..., :width_l], cond[..., :width_l], atol=1e-3)
    torch.testing.assert_close(cond_l[..., width_l:], cond[..., width_l:], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled_l, pooled, atol=ATOL, rtol=0)  # pooled comes from clip_g

    cond_g, pooled_g = cond_and_pooled(splice.encode_with_vectors(clip, text, PH, {**base, "g": new["g"]}, "test"))
    torch.testing.assert_close(cond_g[..., :width_l], cond[..., :width_l], atol=ATOL, rtol=0)
    assert not torch.allclose(cond_g[..., width_l:], cond[..., width_l:], atol=1e-3)
    assert not torch.allclose(pooled_g, pooled, atol=1e-3)


# -- 2. several placeholders, weights, punctuation, chunk boundaries ----------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_several_placeholders_weights_and_punctuation(clips, ref_clips, family):
    clip = clips[family]
    vectors = random_vectors(family)
    text = f"{PH}, a (dog:1.2) and ({PH}:1.3) then {PH}. at last (loud {PH})"
    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    want = reference_encode(ref_clips[family], text, {k: v[0] for k, v in vectors.items()})
    assert_same_conditioning(got, want)

    tokens = splice.splice_tokens(clip, text, PH, {k: v[0] for k, v in vectors.items()})
    for key, pad in FAMILIES[family][2].items():
        entries = vector_entries(tokens, key)
        assert [e[1] for _, _, e in entries] == pytest.approx([1.0, 1.3, 1.0, 1.1])
        for _, _, e in entries:
            assert torch.equal(e[0], vectors[key][0])
        for chunk in tokens[key]:
            assert_chunk_layout(chunk, pad)


@pytest.mark.parametrize("text", [f"a {PH}, at night", f"a photo of {PH}.", f"{PH},{PH}.", f"x {PH}!?"])
def test_adjacent_punctuation_still_splices(clips, ref_clips, text):
    vectors = random_vectors("sd1")
    got = splice.encode_with_vectors(clips["sd1"], text, PH, vectors, "test")
    want = reference_encode(ref_clips["sd1"], text, {"l": vectors["l"][0]})
    assert_same_conditioning(got, want)
    tokens = splice.splice_tokens(clips["sd1"], text, PH, {"l": vectors["l"][0]})
    assert len(vector_entries(tokens, "l")) == text.count(PH)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_weight_stays_on_the_vector(clips, family):
    clip = clips[family]
    vectors = random_vectors(family)
    one = {k: v[0] for k, v in vectors.items()}
    weighted = splice.splice_tokens(clip, f"a photo of ({PH}:1.3)", PH, one)
    plain = splice.splice_tokens(clip, f"a photo of ({PH}:1.0)", PH, one)
    for key in FAMILIES[family][1]:
        (w_entry,) = vector_entries(weighted, key)
        (p_entry,) = vector_entries(plain, key)
        assert w_entry[2][1] == pytest.approx(1.3) and p_entry[2][1] == 1.0
        assert w_entry[:2] == p_entry[:2]  # same position
    cond_w = cond_and_pooled(clip.encode_from_tokens_scheduled(weighted))[0]
    cond_p = cond_and_pooled(clip.encode_from_tokens_scheduled(plain))[0]
    assert not torch.allclose(cond_w, cond_p, atol=1e-3)


# Prompts where the placeholder (3 BPE tokens) starts at content positions 70..79; a chunk
# holds 75 content tokens, so n = 73 and 74 make the raw placeholder straddle two chunks.
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [70, 72, 73, 74, 75, 76, 79])
def test_placeholder_at_chunk_boundary(clips, ref_clips, family, n):
    clip = clips[family]
    text = " ".join(["red"] * n) + f" {PH} at night, " + " ".join(["blue"] * 10)
    vectors = random_vectors(family)
    one = {k: v[0] for k, v in vectors.items()}
    tokens = splice.splice_tokens(clip, text, PH, one)
    for key, pad in FAMILIES[family][2].items():
        assert len(tokens[key]) == 2
        for chunk in tokens[key]:
            assert_chunk_layout(chunk, pad)
        entries = vector_entries(tokens, key)
        assert len(entries) == 1  # one piece, one entry
        chunk_index, position, _ = entries[0]
        # where a one-token word would be: content position n + 1 (chunk 0 holds 75 content tokens)
        assert (chunk_index, position) == ((0, n + 1) if n + 1 <= 75 else (1, n + 1 - 75))

    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    want = reference_encode(ref_clips[family], text, one)
    assert_same_conditioning(got, want)
    cond, pooled = cond_and_pooled(got)
    assert cond.shape[1] == 2 * 77
    if family == "sd1":  # SD1: cond is the last layer, pooled the unprojected output at the first end token
        first_end = assert_chunk_layout(tokens["l"][0], END)
        torch.testing.assert_close(pooled[0], cond[0, first_end], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_weighted_group_at_chunk_boundary(clips, ref_clips, family):
    clip = clips[family]
    text = " ".join(["red"] * 73) + f" (loud {PH}:1.2) at night"
    vectors = random_vectors(family)
    one = {k: v[0] for k, v in vectors.items()}
    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    want = reference_encode(ref_clips[family], text, one)
    assert_same_conditioning(got, want)
    tokens = splice.splice_tokens(clip, text, PH, one)
    for key, pad in FAMILIES[family][2].items():
        for chunk in tokens[key]:
            assert_chunk_layout(chunk, pad)
        ((_, _, entry),) = vector_entries(tokens, key)
        assert entry[1] == pytest.approx(1.2)


# -- 3. batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_batch_rows_equal_single_items(clips, family):
    clip = clips[family]
    text = f"a ({PH}:1.1) in a cave"
    vectors = random_vectors(family, batch=3)
    cond, pooled = cond_and_pooled(splice.encode_with_vectors(clip, text, PH, vectors, "test"))
    assert cond.shape[0] == 3 and pooled.shape[0] == 3
    for b in range(3):
        item = splice.encode_with_vectors(clip, text, PH, {k: v[b:b + 1] for k, v in vectors.items()}, "test")
        c, p = cond_and_pooled(item)
        torch.testing.assert_close(cond[b:b + 1], c, atol=ATOL, rtol=0)
        torch.testing.assert_close(pooled[b:b + 1], p, atol=ATOL, rtol=0)
    assert not torch.allclose(cond[0], cond[1], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text, rows_per_pass", [
    (f"a ({PH}:1.1) in a cave", 2),  # weighted: ComfyUI adds its empty-prompt row to the pass
    (" ".join(["red"] * 80) + f" {PH} at night", 64),  # two chunks per row
])
def test_batch_is_encoded_in_few_passes_equal_to_row_by_row(clips, family, text, rows_per_pass, monkeypatch):
    """Long audio gives hundreds of rows: they share text-encoder passes, with the results of
    encoding each row on its own (ComfyUI's plain encode of the spliced tokens)."""
    clip = clips[family]
    vectors = random_vectors(family, batch=5, seed=11)
    rows = [{k: v[b] for k, v in vectors.items()} for b in range(5)]
    want = [clip.encode_from_tokens_scheduled(splice.splice_tokens(clip, text, PH, row)) for row in rows]
    monkeypatch.setattr(splice, "ROWS_PER_PASS", rows_per_pass)
    passes = {key: 0 for key in FAMILIES[family][1]}
    hooks = [getattr(clip.cond_stage_model, f"clip_{key}").register_forward_hook(
        lambda *_, key=key: passes.__setitem__(key, passes[key] + 1)) for key in passes]
    try:
        cond, pooled = cond_and_pooled(splice.encode_with_vectors(clip, text, PH, vectors, "test"))
    finally:
        for h in hooks:
            h.remove()
    assert passes == {key: -(-5 // rows_per_pass) for key in passes}
    assert cond.shape[0] == 5 and pooled.shape[0] == 5
    for b, item in enumerate(want):
        c, p = cond_and_pooled(item)
        torch.testing.assert_close(cond[b:b + 1], c, atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled[b:b + 1], p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_is_tokenized_once_per_encode(family, monkeypatch):
    clip = build_clip(family)
    calls = []
    tokenize = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda text, **kw: calls.append(text) or tokenize(text, **kw))
    vectors = random_vectors(family, batch=3)
    splice.encode_with_vectors(clip, f"a photo of {PH}, loud", PH, vectors, "test")
    assert len(calls) <= 3, calls  # the first encode also looks up the token keys and the stand-in words
    calls.clear()
    for text in (f"a photo of {PH}, loud", f"sks {PH} in the rain"):
        splice.encode_with_vectors(clip, text, PH, vectors, "test")
        assert len(calls) == 1, calls
        calls.clear()


# -- 4. errors ----------------------------------------------------------------------------

def test_error_missing_placeholder(clips):
    with pytest.raises(PromptError) as err:
        splice.encode_with_vectors(clips["sd1"], "a photo of a dog", PH, random_vectors("sd1"), "test")
    msg = str(err.value)
    assert PH in msg and "does not contain" in msg and f"a photo of {PH}" in msg


@pytest.mark.parametrize("clip_family, token_family, expected", [
    ("sd2", "sd1", ["l=64] (made for SD1.x)", "SD2.x CLIP needs [h=80]", "Use an AudioToken trained for SD2.x"]),
    ("sdxl", "sd1", ["SDXL CLIP needs [g=96, l=64]", "Use an AudioToken trained for SDXL: train one with this CLIP's "
                     "checkpoint, or connect the CLIP of an SD1.x checkpoint"]),
    # an SDXL token's `l` half was made for SDXL's UNet: refused, not used alone
    ("sd1", "sdxl", ["[g=96, l=64] (made for SDXL)", "SD1.x CLIP needs [l=64]",
                     "Use an AudioToken trained for SD1.x: train one with this CLIP's checkpoint, or connect the "
                     "CLIP of an SDXL checkpoint"]),
])
def test_error_token_for_another_family(clips, clip_family, token_family, expected):
    with pytest.raises(PromptError) as err:
        splice.encode_with_vectors(clips[clip_family], f"a {PH}", PH, random_vectors(token_family), "My token")
    msg = str(err.value)
    assert msg.startswith("My token has vectors for text encoders")
    for part in expected:
        assert part in msg, (part, msg)


def test_error_right_key_wrong_width(clips):
    vectors = {"h": torch.randn(1, 64)}
    with pytest.raises(PromptError) as err:
        splice.encode_with_vectors(clips["sd2"], f"a {PH}", PH, vectors, "My token")
    msg = str(err.value)
    assert "64-wide" in msg and "'h'" in msg and "80 dimensions" in msg
    assert "Use an AudioToken trained for SD2.x" in msg


@pytest.mark.parametrize("placeholder, fix", [("<my audio>", "use one word"), ("", "set it to a word"),
                                              ("   ", "set it to a word")])
def test_error_bad_placeholder(clips, placeholder, fix):
    with pytest.raises(PromptError) as err:
        splice.encode_with_vectors(clips["sd1"], f"a photo of {placeholder}", placeholder, random_vectors("sd1"), "t")
    assert fix in str(err.value)
    assert splice.check_prompt(f"a photo of {placeholder}", placeholder) == str(err.value)


def test_check_prompt_accepts_good_prompt():
    assert splice.check_prompt(f"a photo of {PH}", PH) is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("placeholder, text, reference", [
    ("dog", "a hotdog next to a dog", f"a hotdog next to a {TI_WORD}"),
    ("dog", "dogs, (dog:1.2) and dog. no underdog", f"dogs, ({TI_WORD}:1.2) and {TI_WORD}. no underdog"),
    (PH, f"a ({PH}:1.3), {PH}, not audio", f"a ({TI_WORD}:1.3), {TI_WORD}, not audio"),
])
def test_placeholder_is_matched_as_a_word_only(clips, ref_clips, family, placeholder, text, reference):
    """A placeholder inside another word ("dog" in "hotdog") is that word, not the sound."""
    vectors = random_vectors(family)
    one = {k: v[0] for k, v in vectors.items()}
    got = splice.encode_with_vectors(clips[family], text, placeholder, vectors, "test")
    want = reference_encode(ref_clips[family], reference.replace(TI_WORD, PH), one)
    assert_same_conditioning(got, want)
    tokens = splice.splice_tokens(clips[family], text, placeholder, one)
    for key in FAMILIES[family][1]:
        assert len(vector_entries(tokens, key)) == reference.count(TI_WORD)


def test_placeholder_only_inside_other_words_is_missing(clips):
    msg = splice.check_prompt("a hotdog with dogs", "dog")
    assert "does not contain the placeholder 'dog' as a word of its own" in msg
    with pytest.raises(PromptError, match="as a word of its own"):
        splice.encode_with_vectors(clips["sd1"], "a hotdog with dogs", "dog", random_vectors("sd1"), "t")


def test_family_names_are_for_messages_only():
    assert splice.clip_family({"l", "t5xxl"}) == "Flux.1"
    assert splice.clip_family({"umt5xxl"}) == "Wan 2.x"
    assert splice.clip_family({"x", "y"}) == "(x, y)"  # unknown key sets still work, by their keys


# -- 5. token structure -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", [
    f"a photo of {PH}",
    " ".join(["red"] * 10) + f" {PH} " + " ".join(["blue"] * 100) + f" ({PH}:0.8) " + " ".join(["green"] * 30),
    " ".join(["red"] * 160) + f" {PH}",
])
def test_token_structure_matches_comfyui(clips, family, text):
    clip = clips[family]
    vectors = random_vectors(family)
    tokens = splice.splice_tokens(clip, text, PH, {k: v[0] for k, v in vectors.items()})
    own = clip.tokenize(text, return_word_ids=True)
    assert set(tokens) == set(own)
    for key, pad in FAMILIES[family][2].items():
        assert len(tokens[key]) == len(own[key])
        for chunk in tokens[key]:
            assert_chunk_layout(chunk, pad)
        assert len(vector_entries(tokens, key)) == text.count(PH)
        # every other entry is ComfyUI's own, in order
        own_ids = [int(e[0]) for chunk in own[key] for e in chunk[1:] if int(e[0]) not in (START, END, pad)]
        ours = [e[0] for chunk in tokens[key] for e in chunk[1:] if not (is_int(e[0]) and int(e[0]) in (START, END, pad))]
        placeholder_ids = [int(e[0]) for e in clip.tokenize(PH, return_word_ids=True)[key][0] if e[2] != 0]
        expected = []
        i = 0
        while i < len(own_ids):
            if own_ids[i:i + len(placeholder_ids)] == placeholder_ids:
                expected.append("VECTOR")
                i += len(placeholder_ids)
            else:
                expected.append(own_ids[i])
                i += 1
        assert ["VECTOR" if splice.entry_vector(t) is not None else int(t) for t in ours] == expected
    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    assert cond_and_pooled(got)[0].shape[1] == 77 * len(own[next(iter(own))])


def test_chunk_count_follows_the_one_token_word(clips, ref_clips):
    """73 words + the 3-token placeholder overflow one chunk in ComfyUI's own tokenize, but the
    vector is ONE token: like the textual-inversion word, the prompt fits one chunk."""
    clip = clips["sd1"]
    text = " ".join(["red"] * 73) + f" {PH}"
    vectors = random_vectors("sd1")
    assert len(clip.tokenize(text)["l"]) == 2
    tokens = splice.splice_tokens(clip, text, PH, {"l": vectors["l"][0]})
    assert len(tokens["l"]) == 1
    assert assert_chunk_layout(tokens["l"][0], END) == 75
    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    assert_same_conditioning(got, reference_encode(ref_clips["sd1"], text, {"l": vectors["l"][0]}))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_using_rare_words_is_left_alone(clips, ref_clips, family):
    """Words the splice may use internally (e.g. 'sks', 'ohwx') stay ordinary words of the prompt."""
    clip = clips[family]
    text = f"sks ohwx photo of {PH}, sks style"
    vectors = random_vectors(family)
    got = splice.encode_with_vectors(clip, text, PH, vectors, "test")
    want = reference_encode(ref_clips[family], text, {k: v[0] for k, v in vectors.items()})
    assert_same_conditioning(got, want)
    tokens = splice.splice_tokens(clip, text, PH, {k: v[0] for k, v in vectors.items()})
    own = clip.tokenize(text.replace(PH, ""))
    for key, pad in FAMILIES[family][2].items():
        specials = (START, END, pad)
        ids = [int(t) for t, _, _ in tokens[key][0] if is_int(t) and int(t) not in specials]
        assert ids == [int(t) for t, _ in own[key][0] if int(t) not in specials]
        assert len(ids) == 7  # sks ohwx photo of , sks style: the prompt's own words are all there
        assert len(vector_entries(tokens, key)) == 1


# -- 5. per-row weights and identical rows (video frames) ------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_row_weight_multiplies_the_audio_word_weight(clips, family):
    """Row weight 1.5 on '(<audio>:1.2)' encodes as '(<audio>:1.8)' would, row by row."""
    clip = clips[family]
    vectors = random_vectors(family, batch=3, seed=5)
    factors = torch.tensor([1.5, 1.0, 0.5])
    got = splice.encode_with_vectors(clip, f"a ({PH}:1.2) at dawn", PH, vectors, "test", row_weights=factors)
    cond, pooled = cond_and_pooled(got)
    for b, written in enumerate(("1.8", "1.2", "0.6")):
        want = splice.encode_with_vectors(clip, f"a ({PH}:{written}) at dawn", PH,
                                          {k: v[b:b + 1] for k, v in vectors.items()}, "test")
        want_cond, want_pooled = cond_and_pooled(want)
        torch.testing.assert_close(cond[b:b + 1], want_cond, atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled[b:b + 1], want_pooled, atol=1e-6, rtol=0)
    plain = cond_and_pooled(splice.encode_with_vectors(clip, f"a ({PH}:1.2) at dawn", PH, vectors, "test"))[0]
    torch.testing.assert_close(plain[1], cond[1], atol=1e-6, rtol=0)  # row 1 (factor 1) is the plain encode
    assert (plain[0] - cond[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_identical_rows_are_encoded_once(clips, family, monkeypatch):
    """Rows with the same vectors and weight (a held segment) pass the text encoders once; the
    result equals encoding every row on its own."""
    clip = clips[family]
    base = random_vectors(family, batch=3, seed=21)
    pick = [0, 1, 0, 0, 2, 1, 2]
    vectors = {k: v[pick] for k, v in base.items()}
    factors = torch.tensor([1.0, 1.0, 1.0, 1.3, 1.0, 1.0, 1.0])  # row 3: same vectors, other weight
    seen = []
    key = min(FAMILIES[family][1])
    hook = getattr(clip.cond_stage_model, f"clip_{key}").register_forward_hook(
        lambda module, args, out: seen.append(out[0].shape[0]))
    try:
        cond, pooled = cond_and_pooled(splice.encode_with_vectors(clip, f"a {PH} at dawn", PH, vectors, "test",
                                                                  row_weights=factors))
    finally:
        hook.remove()
    assert seen == [4 + 1]  # 4 distinct rows in one pass (+ ComfyUI's empty row for the weights)
    assert cond.shape[0] == 7 and pooled.shape[0] == 7
    for b in range(7):
        one = {k: v[b:b + 1] for k, v in vectors.items()}
        want_cond, want_pooled = cond_and_pooled(splice.encode_with_vectors(
            clip, f"a {PH} at dawn", PH, one, "test", row_weights=factors[b:b + 1]))
        torch.testing.assert_close(cond[b:b + 1], want_cond, atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled[b:b + 1], want_pooled, atol=1e-6, rtol=0)
    assert torch.equal(cond[0], cond[2]) and torch.equal(cond[4], cond[6]) and torch.equal(pooled[1], pooled[5])
    assert not torch.allclose(cond[0], cond[3], atol=1e-4)


def test_row_weights_are_checked(clips):
    vectors = random_vectors("sd1", batch=2)
    with pytest.raises(PromptError, match="has 2 rows but 3 row weights: give one weight per row"):
        splice.encode_with_vectors(clips["sd1"], f"a {PH}", PH, vectors, "test", row_weights=torch.ones(3))
    with pytest.raises(PromptError, match="row weight that is not a finite number"):
        splice.encode_with_vectors(clips["sd1"], f"a {PH}", PH, vectors, "test",
                                   row_weights=torch.tensor([1.0, float("nan")]))
