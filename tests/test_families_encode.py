"""nodes/splice.py on every text-stream family ComfyUI hosts, in-process, no server.

The CLIPs are tools/tiny_text_encoders.tiny_clip: ComfyUI's own tokenizer and text-encoder
classes per family (SD3.x, Flux.1, Chroma, Wan 2.x, Qwen-Image, HunyuanVideo, Z-Image,
Lumina 2, HiDream) with tiny seeded transformers. The reference for every spliced encode is
classic textual inversion, which never puts a tensor into the tokens: per text encoder, one
real one-token word (chosen here, independently of the splice) has its input-embedding row
overwritten by the vector, the prompt is written with that word, and ComfyUI encodes it with
the family's own post-processing (SD3's pad + concat, Flux's CLIP-L pooled, the LLM template
cuts, HiDream's Llama layers).
"""
from __future__ import annotations

import numbers
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from test_splice import splice  # nodes/splice.py loaded once, standalone
from tools.tiny_text_encoders import TINY_FAMILIES, text_encoders, tiny_clip

PH = "<audio>"
TEXT = f"a photo of {PH}, loud and clear"
TI_WORDS = ("dog", "cat", "cow", "ant", "lamp", "ex", "zz")  # the reference's one-token words

# family: (name in messages, {key: width}, what each key's vector moves)
FAMILIES = {
    "sd3": ("SD3.x", {"l": 768, "g": 1280, "t5xxl": 4096},
            {"l": {"cond", "pooled_output"}, "g": {"cond", "pooled_output"}, "t5xxl": {"cond"}}),
    "flux": ("Flux.1", {"l": 768, "t5xxl": 4096}, {"l": {"pooled_output"}, "t5xxl": {"cond"}}),
    "chroma": ("T5-XXL (Chroma / PixArt)", {"t5xxl": 4096}, {"t5xxl": {"cond"}}),
    "wan": ("Wan 2.x", {"umt5xxl": 4096}, {"umt5xxl": {"cond"}}),
    "qwen_image": ("Qwen-Image", {"qwen25_7b": 112}, {"qwen25_7b": {"cond"}}),
    "hunyuan_video": ("HunyuanVideo", {"l": 768, "llama": 128}, {"l": {"pooled_output"}, "llama": {"cond"}}),
    "z_image": ("Z-Image", {"qwen3_4b": 80}, {"qwen3_4b": {"cond"}}),
    "lumina2": ("Lumina 2", {"gemma2_2b": 2304}, {"gemma2_2b": {"cond"}}),
    "hidream": ("HiDream", {"l": 768, "g": 1280, "t5xxl": 4096, "llama": 128},
                {"l": {"pooled_output"}, "g": {"pooled_output"}, "t5xxl": {"cond"}, "llama": {"conditioning_llama3"}}),
}
LLM_TEMPLATE_FAMILIES = ("qwen_image", "z_image", "hunyuan_video")
LLM_KEYS = {"qwen25_7b", "qwen3_4b", "llama"}
WEIGHTS_IGNORED = {"qwen25_7b", "qwen3_4b"}  # ComfyUI tokenizes these with disable_weights=True
assert tuple(FAMILIES) == TINY_FAMILIES


def vectors_for(family: str, batch: int = 1, seed: int = 7, keys=None) -> dict[str, torch.Tensor]:
    """Random vectors on the scale of the encoders' own word embeddings (std width^-0.5)."""
    gen = torch.Generator().manual_seed(seed)
    widths = FAMILIES[family][1]
    return {k: torch.randn(batch, w, generator=gen) * 2 * w ** -0.5 for k, w in sorted(widths.items())
            if keys is None or k in keys}


def int_ids(chunks) -> list[int]:
    return [int(e[0]) for chunk in chunks for e in chunk if isinstance(e[0], numbers.Integral)]


def one_token_word(clip, key: str, text: str) -> tuple[str, int]:
    """A word of TI_WORDS that is ONE token of `key` after a space and not in `text`, and its id."""
    empty = Counter(int_ids(clip.tokenize("")[key]))
    for word in TI_WORDS:
        if word in text:
            continue
        added = Counter(int_ids(clip.tokenize(f" {word}")[key])) - empty
        if sum(added.values()) == 1:
            return word, next(iter(added))
    raise AssertionError(f"no one-token reference word for '{key}'")


@contextmanager
def embedding_rows(clip, rows: dict[str, tuple[int, torch.Tensor]]):
    """Temporarily overwrite one input-embedding row per text encoder (the tiny CLIPs are shared)."""
    encoders = text_encoders(clip)
    saved = {}
    try:
        with torch.no_grad():
            for key, (token, vector) in rows.items():
                weight = encoders[key].transformer.get_input_embeddings().weight
                saved[key] = (weight, token, weight[token].clone())
                weight[token] = vector.to(weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for weight, token, row in saved.values():
                weight[token] = row


def textual_inversion(clip, text: str, vectors: dict[str, torch.Tensor]) -> list:
    """The reference CONDITIONING: each key's prompt written with its own one-token word whose
    embedding row holds that key's vector; ComfyUI's plain encode."""
    tokens, rows = {}, {}
    for key in clip.tokenize("").keys():
        word, token = one_token_word(clip, key, text)
        tokens[key] = clip.tokenize(text.replace(PH, word), return_word_ids=True)[key]
        rows[key] = (token, vectors[key])
    with embedding_rows(clip, rows):
        return clip.encode_from_tokens_scheduled(tokens)


def outputs(conditioning) -> dict[str, torch.Tensor]:
    """cond and every tensor extra of a one-entry CONDITIONING."""
    assert len(conditioning) == 1
    cond, extras = conditioning[0]
    return {"cond": cond, **{k: v for k, v in extras.items() if torch.is_tensor(v)}}


def assert_same(got: dict, want: dict, atol=1e-5):
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=atol, rtol=0, msg=name)


def vector_entries(tokens: dict, key: str) -> list:
    """(vector, weight, word id) of each vector entry."""
    return [(splice.entry_vector(e[0]), *e[1:]) for chunk in tokens[key] for e in chunk
            if splice.entry_vector(e[0]) is not None]


# -- the CLIPs: keys, widths, pooled outputs, read from the model --------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_widths_and_family_from_the_model(family):
    name, widths, _ = FAMILIES[family]
    clip = tiny_clip(family)
    assert splice.clip_widths(clip) == widths
    assert splice.clip_family(clip.tokenize("").keys()) == name


# -- equal to textual inversion, row by row ------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_equals_textual_inversion(family):
    clip = tiny_clip(family)
    vectors = vectors_for(family, batch=2)
    got = outputs(splice.encode_with_vectors(clip, TEXT, PH, vectors, "test"))
    want = outputs(textual_inversion(clip, TEXT, {k: v[1] for k, v in vectors.items()}))
    assert_same({k: v[1:2] for k, v in got.items()}, want)  # row 1 of a batch: rows are not mixed
    assert not torch.allclose(got["cond"][0], got["cond"][1], atol=1e-4)  # the rows' vectors differ


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_vector_moves_exactly_its_outputs(family):
    """Same vectors: bitwise the same CONDITIONING. A new vector for one stream moves exactly
    the outputs that stream feeds (Flux / HunyuanVideo / HiDream: CLIP-L only the pooled output)."""
    clip = tiny_clip(family)
    base = vectors_for(family)
    first = outputs(splice.encode_with_vectors(clip, TEXT, PH, base, "test"))
    again = outputs(splice.encode_with_vectors(clip, TEXT, PH, {k: v.clone() for k, v in base.items()}, "test"))
    assert all(torch.equal(first[n], again[n]) for n in first)
    for key, moved in FAMILIES[family][2].items():
        new = {**base, key: vectors_for(family, seed=99, keys={key})[key]}
        out = outputs(splice.encode_with_vectors(clip, TEXT, PH, new, "test"))
        changed = {n for n in first if not torch.equal(first[n], out[n])}
        assert changed == moved, (key, changed)
        for n in moved:
            assert (out[n] - first[n]).abs().max() > 1e-4, (key, n)


# -- the placeholder inside LLM chat templates ---------------------------------------------

@pytest.mark.parametrize("family", LLM_TEMPLATE_FAMILIES)
# (a space before each placeholder: the splice writes its stand-in after a space, as the reference does here)
@pytest.mark.parametrize("text", [f" {PH} barking at night", f"a dog and {PH}. then ( {PH})! {PH}"])
def test_placeholder_inside_llm_template(family, text):
    clip = tiny_clip(family)
    vectors = vectors_for(family)
    one = {k: v[0] for k, v in vectors.items()}
    tokens = splice.splice_tokens(clip, text, PH, one)
    empty = clip.tokenize("")
    for key in tokens:
        entries = vector_entries(tokens, key)
        assert len(entries) == text.count(PH)
        assert all(torch.equal(e[0], one[key]) for e in entries)
        if key in LLM_KEYS:  # the chat template is ComfyUI's: same first and last ids as the empty prompt's
            ids = [int(e[0]) for chunk in tokens[key] for e in chunk if splice.entry_vector(e[0]) is None]
            empty_ids = int_ids(empty[key])
            assert len(ids) > len(empty_ids) >= 5
            assert ids[:3] == empty_ids[:3] and ids[-1] == empty_ids[-1]
    got = outputs(splice.encode_with_vectors(clip, text, PH, vectors, "test"))
    assert_same(got, outputs(textual_inversion(clip, text, one)))


# -- prompt weights ------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prompt_weight_on_the_vector_or_ignored_by_llm(family):
    """CLIP, T5, Gemma-2 and Llama tokens keep `(word:1.5)` weights; ComfyUI's Qwen-Image and
    Z-Image tokenizers ignore prompt weights (the vector gets weight 1)."""
    clip = tiny_clip(family)
    one = {k: v[0] for k, v in vectors_for(family).items()}
    tokens = splice.splice_tokens(clip, f"a photo of ({PH}:1.5) at night", PH, one)
    for key in tokens:
        (entry,) = vector_entries(tokens, key)
        assert entry[1] == pytest.approx(1.0 if key in WEIGHTS_IGNORED else 1.5), key


# -- refused tokens and CLIPs ----------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_token_of_another_family_is_refused(family):
    name, widths, _ = FAMILIES[family]
    sd1_token = {"l": torch.randn(1, 768)}  # an SD1.x AudioToken
    with pytest.raises(splice.PromptError) as err:
        splice.encode_with_vectors(tiny_clip(family), TEXT, PH, sd1_token, "AudioToken 'x'")
    msg = str(err.value)
    need = ", ".join(f"{k}={w}" for k, w in sorted(widths.items()))
    assert msg.startswith("AudioToken 'x' has vectors for text encoders [l=768] (made for SD1.x)")
    assert f"this {name} CLIP needs [{need}]" in msg
    assert f"Use an AudioToken trained for {name}: train one with this CLIP's checkpoint" in msg


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrong_width_is_refused(family):
    name, widths, _ = FAMILIES[family]
    key = sorted(widths)[-1]
    vectors = {**vectors_for(family), key: torch.randn(1, widths[key] + 8)}
    with pytest.raises(splice.PromptError) as err:
        splice.encode_with_vectors(tiny_clip(family), TEXT, PH, vectors, "AudioToken 'x'")
    msg = str(err.value)
    assert f"{widths[key] + 8}-wide vectors for text encoder '{key}'" in msg
    assert f"this {name} CLIP embeds words in {widths[key]} dimensions" in msg


class _Tokenizer:
    """Any weak-referenceable object: the splice caches tokenizer facts per tokenizer."""


class _FakeClip:
    def __init__(self, model, keys):
        self.cond_stage_model, self.tokenizer, self._keys = model, _Tokenizer(), keys

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {k: [[(1, 1.0, 0)]] for k in self._keys}


def test_encoder_that_cannot_take_a_vector_is_refused_by_name():
    model = torch.nn.Module()
    model.t5xxl = torch.nn.Linear(2, 2)  # no process_tokens / transformer
    with pytest.raises(splice.PromptError, match="'t5xxl' text encoder of this T5-XXL .* \\(Linear\\) cannot take"):
        splice.clip_widths(_FakeClip(model, ["t5xxl"]))
    with pytest.raises(splice.PromptError, match="has no text encoder for its 'mystery' tokens"):
        splice.clip_widths(_FakeClip(torch.nn.Module(), ["mystery"]))


def test_placeholder_beyond_what_an_encoder_reads_is_refused():
    """HiDream's T5 reads the first 128 tokens only: a placeholder after them would be lost."""
    text = " ".join(["red"] * 150) + f" {PH}"
    with pytest.raises(splice.PromptError) as err:
        splice.encode_with_vectors(tiny_clip("hidream"), text, PH, vectors_for("hidream"), "test")
    msg = str(err.value)
    assert "'t5xxl' text encoder of this HiDream CLIP sees the placeholder '<audio>' 0 times" in msg
    assert "prompt has it 1 times" in msg


def test_sd3_clip_without_t5_uses_only_its_clips():
    """An SD3 CLIP loaded without T5 (ComfyUI: sd3_clip(t5=False)) tokenizes t5xxl too but ignores it:
    a full SD3.x token works and its T5 vector changes nothing; an (l, g) token works too."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip as sd3_clip
    from tools.tiny_text_encoders import MODEL_CONFIGS, init_weights

    target = comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(t5=False))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, **MODEL_CONFIGS})
    init_weights(clip.cond_stage_model, 3)
    assert splice.clip_widths(clip) == {"l": 768, "g": 1280}
    full = vectors_for("sd3")
    got = outputs(splice.encode_with_vectors(clip, TEXT, PH, full, "test"))
    other_t5 = outputs(splice.encode_with_vectors(clip, TEXT, PH, {**full, "t5xxl": -full["t5xxl"]}, "test"))
    clips_only = outputs(splice.encode_with_vectors(clip, TEXT, PH, {k: full[k] for k in ("l", "g")}, "test"))
    assert got["cond"].shape == (1, 77, 4096)
    for name in got:
        assert torch.equal(got[name], other_t5[name]) and torch.equal(got[name], clips_only[name])
    with pytest.raises(splice.PromptError, match="SD3.x CLIP needs \\[g=1280, l=768\\]"):
        splice.encode_with_vectors(clip, TEXT, PH, {"t5xxl": full["t5xxl"]}, "test")


@pytest.mark.parametrize("family", ["sd3", "flux", "hunyuan_video"])
def test_family_post_processing_by_hand(family):
    """The streams combine as the family table says: SD3 = (CLIP-L ++ CLIP-G, padded to 4096)
    then the T5 tokens, pooled CLIP-L ++ CLIP-G; Flux = T5 tokens, pooled CLIP-L; HunyuanVideo =
    the Llama tokens after the template, pooled CLIP-L."""
    clip = tiny_clip(family)
    vectors = vectors_for(family)
    tokens = splice.splice_tokens(clip, TEXT, PH, {k: v[0] for k, v in vectors.items()})
    streams = {key: encoder.encode_token_weights(tokens[key]) for key, encoder in text_encoders(clip).items()}
    got = outputs(splice.encode_with_vectors(clip, TEXT, PH, vectors, "test"))
    if family == "sd3":
        (l_out, l_pooled), (g_out, g_pooled), (t5_out, _) = streams["l"], streams["g"], streams["t5xxl"]
        clips = torch.cat([l_out, g_out], dim=-1)
        want_cond = torch.cat([torch.nn.functional.pad(clips, (0, 4096 - clips.shape[-1])), t5_out], dim=1)
        want_pooled = torch.cat([l_pooled, g_pooled], dim=-1)
    elif family == "flux":
        want_cond, want_pooled = streams["t5xxl"][0], streams["l"][1]
    else:
        llama_out = streams["llama"][0]
        want_cond, want_pooled = llama_out[:, -got["cond"].shape[1]:], streams["l"][1]
        assert llama_out.shape[1] > got["cond"].shape[1]  # the system template was cut off
    torch.testing.assert_close(got["cond"], want_cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["pooled_output"], want_pooled, atol=1e-5, rtol=0)


def test_vectors_get_the_factor_the_encoder_gives_its_word_rows(monkeypatch):
    """ComfyUI 0.33 scales Gemma's word rows inside the embedding module (x sqrt(width)) and splices
    embedding entries after it; 0.3.75 scaled after the splice. A vector is a word row either way:
    the splice gives it the module's own factor, and refuses a module that is not a plain scaling."""
    clip = tiny_clip("flux")
    table = text_encoders(clip)["t5xxl"].transformer.get_input_embeddings()
    lookup = type(table).forward
    tokens, ids = splice._stand_in_tokens(clip, TEXT, PH)
    assert splice.embedding_scales(clip, ids) == pytest.approx({"l": 1.0, "t5xxl": 1.0})

    monkeypatch.setattr(table, "forward", lambda *a, **k: lookup(table, *a, **k) * 48.0, raising=False)
    scales = splice.embedding_scales(clip, ids)
    assert scales["t5xxl"] == pytest.approx(48.0) and scales["l"] == pytest.approx(1.0)
    vector = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    rows = splice._put_vectors(tokens, ids, {"l": torch.zeros(768), "t5xxl": vector}, scales)
    placed = [splice.entry_vector(t) for chunk in rows["t5xxl"] for t, *_ in chunk if not splice._is_token_id(t)]
    assert len(placed) == 1 and torch.allclose(placed[0], vector * 48.0)

    monkeypatch.setattr(table, "forward", lambda *a, **k: lookup(table, *a, **k) + 1.0, raising=False)
    with pytest.raises(splice.PromptError, match="t5xxl"):
        splice.embedding_scales(clip, ids)


# -- batched passes for T5 families ----------------------------------------------------------

@pytest.mark.parametrize("family", ["flux", "chroma"])
@pytest.mark.parametrize("text", [TEXT, f"a ({PH}:1.3) and a dog"])
def test_t5_family_rows_share_one_pass_equal_to_row_by_row(family, text):
    """Flux.1 (CLIP-L + T5 padded to 256) and Chroma (T5, unpadded, no attention mask): the rows of
    one prompt have equal token counts, so ComfyUI encodes them as sections of one batched pass;
    each row equals its own encode (ComfyUI's plain encode of that row's spliced tokens)."""
    clip = tiny_clip(family)
    vectors = vectors_for(family, batch=3, seed=13)
    factors = torch.tensor([1.0, 1.4, 0.7])
    passes = Counter()
    hooks = [encoder.register_forward_hook(lambda *_, key=key: passes.update([key]))
             for key, encoder in text_encoders(clip).items()]
    try:
        got = outputs(splice.encode_with_vectors(clip, text, PH, vectors, "test", row_weights=factors))
    finally:
        for hook in hooks:
            hook.remove()
    assert dict(passes) == {key: 1 for key in FAMILIES[family][1]}
    tokens, ids = splice._stand_in_tokens(clip, text, PH)
    scales = splice.embedding_scales(clip, ids)
    for b in range(3):
        row = splice._put_vectors(tokens, ids, {k: v[b] for k, v in vectors.items()}, scales, float(factors[b]))
        want = outputs(clip.encode_from_tokens_scheduled(row))
        # fp32 rounding only: ComfyUI's own encode of ONE prompt as 1 row vs 2 sections differs by
        # up to 1.7e-5 on these 4096-wide T5 outputs (|x| up to about 4): batched matmuls round differently.
        assert_same({k: v[b:b + 1] for k, v in got.items()}, want, atol=5e-5)
    assert not torch.allclose(got["cond"][0], got["cond"][1], atol=1e-4)
