"""Put an audio vector into a ComfyUI prompt in place of its placeholder word.

ComfyUI tokenizers return `{key: [chunk, ...]}` (one key per text encoder: `l`, `g`, `t5xxl`,
`umt5xxl`, `llama`, `qwen25_7b`, ...) and every text encoder built on `SDClipModel` splices a
non-integer entry (`{"type": "embedding", "data": vector}`, or a bare tensor) into its input
word embeddings. The placeholder (`<audio>`) is several tokens;
we write a ONE-token stand-in word in its place (chosen per text encoder: `sks` is one CLIP
token but four T5 tokens), let ComfyUI tokenize, chunk, template and pad the prompt as usual,
and replace each stand-in entry by that encoder's vector (keeping its prompt weight). So CLIP
keeps its end token and pooled output where it expects them, and the LLM chat templates of
Qwen-Image, Z-Image and HunyuanVideo wrap the prompt exactly as they would any word.

Prompt weights: CLIP, T5, Gemma-2 (Lumina 2) and Llama (HunyuanVideo, HiDream) tokens keep
`(word:1.2)` weights; ComfyUI's Qwen-Image and Z-Image tokenizers ignore prompt weights (they
tokenize the whole templated text with weight 1, the weight syntax stays as plain text).

A batch of rows (one per clip, window or video frame) goes through the text encoders together,
as consecutive prompt sections of one ComfyUI encode, for the families where tests prove it
equals the per-row encode: SD1.x, SD2.x, SDXL (fixed 77-token CLIP chunks), Flux.1 and T5-only
Chroma / PixArt (T5 without attention masks; the rows of one prompt have the same length);
every other family is encoded row by row. Identical rows (same vectors and weight, e.g. a held
onset segment) are encoded once and gathered.
"""
from __future__ import annotations

import numbers
import re
import weakref

import torch

# Family names for messages only, by the CLIP's token keys; the text encoders and their widths
# are always read from the model itself, so other key sets work too.
FAMILY_NAMES = {
    frozenset({"l"}): "SD1.x",
    frozenset({"h"}): "SD2.x",
    frozenset({"g", "l"}): "SDXL",
    frozenset({"g", "l", "t5xxl"}): "SD3.x",
    frozenset({"l", "t5xxl"}): "Flux.1",
    frozenset({"t5xxl"}): "T5-XXL (Chroma / PixArt)",
    frozenset({"umt5xxl"}): "Wan 2.x",
    frozenset({"qwen25_7b"}): "Qwen-Image",
    frozenset({"l", "llama"}): "HunyuanVideo",
    frozenset({"qwen3_4b"}): "Z-Image",
    frozenset({"gemma2_2b"}): "Lumina 2",
    frozenset({"g", "l", "t5xxl", "llama"}): "HiDream",
}
# Families whose rows may share one encode as prompt sections: no attention masks, no templates,
# and every row of one prompt has the same token count (CLIP's fixed 77-token chunks; T5 padded
# to 256 for Flux.1, unpadded for Chroma / PixArt, whose rows differ only in the vector).
# ComfyUI batches the sections in one forward pass; tests/test_splice.py and
# tests/test_families_encode.py prove the equality with the per-row encode.
SECTION_FAMILIES = (frozenset({"l"}), frozenset({"h"}), frozenset({"g", "l"}), frozenset({"l", "t5xxl"}),
                    frozenset({"t5xxl"}))

# Prompt rows per text-encoder pass: bounds activation memory when long audio gives hundreds of rows.
ROWS_PER_PASS = 64


class PromptError(ValueError):
    """A prompt or CLIP that cannot take the audio vector; the message says what to change."""


def clip_family(keys) -> str:
    """The family name of a CLIP with these token keys, for messages."""
    keys = frozenset(keys)
    return FAMILY_NAMES.get(keys) or f"({', '.join(sorted(keys))})"


def text_encoders(clip, keys=None) -> dict:
    """{token key: the text encoder (SDClipModel) that reads those tokens, or None when this CLIP
    ignores them (an SD3 / HiDream CLIP loaded without some of its encoders)}."""
    model = clip.cond_stage_model
    keys = list(keys if keys is not None else _empty_tokens(clip).keys())
    found = {}
    for key in keys:
        # SD1ClipModel(clip_name=k) -> clip_<k>; SD1ClipModel(name=k) and composites -> <k>
        names = [n for n in (f"clip_{key}", key) if hasattr(model, n)]
        if names:
            found[key] = getattr(model, names[0])
        elif getattr(model, "clip_name", key) != key:
            found[key] = None  # a one-encoder model reads only its own key (the SDXL refiner's g)
        else:
            raise PromptError(
                f"This {clip_family(keys)} CLIP ({type(model).__name__}) has no text encoder for its '{key}' tokens, "
                "so AudioToken cannot place the audio vector there. Connect a CLIP from a supported loader "
                "(Load Checkpoint, Load CLIP, DualCLIPLoader, TripleCLIPLoader, QuadrupleCLIPLoader)."
            )
    return found


def clip_widths(clip, keys=None) -> dict[str, int]:
    """Input word-embedding width of each text encoder the CLIP uses, keyed like its tokens."""
    encoders = text_encoders(clip, keys)
    widths = {}
    for key, encoder in encoders.items():
        if encoder is None:
            continue
        embeddings = getattr(getattr(encoder, "transformer", None), "get_input_embeddings", None)
        if not callable(getattr(encoder, "process_tokens", None)) or not callable(embeddings):
            raise PromptError(
                f"The '{key}' text encoder of this {clip_family(encoders)} CLIP ({type(encoder).__name__}) cannot take "
                "a word vector in its prompt, so AudioToken cannot use this CLIP."
            )
        widths[key] = int(embeddings().weight.shape[1])
    return widths


def _word(word: str, flags=0) -> re.Pattern:
    """`word` as a word of its own: not inside another word ("dog" in "hotdog"), but next to
    punctuation and prompt syntax ("(<audio>:1.3)", "<audio>,")."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", flags)


def check_placeholder(placeholder: str) -> str | None:
    """A message saying what is wrong with the placeholder word itself, or None."""
    if not placeholder.strip():
        return "The placeholder is empty: set it to a word such as <audio>."
    if any(c.isspace() for c in placeholder):
        return f"The placeholder '{placeholder}' contains spaces: use one word such as <audio>."
    return None


def check_prompt(text: str, placeholder: str) -> str | None:
    """A message saying what is wrong with the prompt, or None when it is usable."""
    problem = check_placeholder(placeholder)
    if problem:
        return problem
    if not _word(placeholder).search(text):
        return (f"The prompt does not contain the placeholder '{placeholder}' as a word of its own, so the sound "
                f"would be ignored. Write it where the sound belongs, e.g. 'a photo of {placeholder}'.")
    return None


def require_prompt(text: str, placeholder: str) -> None:
    problem = check_prompt(text, placeholder)
    if problem:
        raise PromptError(problem)


def replace_placeholder(text: str, placeholder: str, word: str, spaced: bool = False) -> tuple[str, int]:
    """`text` with every placeholder word replaced by `word`, and how many there were.

    A space goes before `word` unless one is there already, so it starts a word for every
    tokenizer ("(<audio>:1.2)" -> "( sks:1.2)"; BPE LLM tokenizers make " sks" one token and
    "(sks" another); `spaced` also puts one after it.
    """
    def put(match):
        before = "" if match.start() > 0 and text[match.start() - 1].isspace() else " "
        return f"{before}{word}{' ' if spaced else ''}"
    return _word(placeholder).subn(put, text)


# Words that stand in for the placeholder while ComfyUI tokenizes the prompt: per text encoder
# the first one that is ONE token for its tokenizer and not used by the prompt is taken. Their
# meaning does not matter (the vector replaces them); rare ones first, then common short words
# that are one token in most vocabularies (T5's sentencepiece has no `sks`).
_STAND_INS = ("sks", "ohwx", "bbq", "ufo", "tok", "zz", "xx", "ex", "lamp", "vase", "sofa", "cow", "owl", "bee",
              "ant", "cat", "dog", "lion", "tiger")
# tokenizer -> {stand-in word: {key: token id}} (keys where the word is one token): tokenizer-only facts.
_STAND_IN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# tokenizer -> its tokens of the empty prompt (the token keys, templates, start/end/pad tokens).
_EMPTY_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _empty_tokens(clip) -> dict:
    if clip.tokenizer not in _EMPTY_TOKENS:
        _EMPTY_TOKENS[clip.tokenizer] = clip.tokenize("", return_word_ids=True)
    return _EMPTY_TOKENS[clip.tokenizer]


def _is_token_id(token) -> bool:
    return isinstance(token, numbers.Integral)


def _content_ids(chunks) -> list[int]:
    """The token ids of a key's chunks that come from the text (word id > 0; template text
    included), without start, end and pad tokens (word id 0)."""
    return [int(t) for chunk in chunks for t, _, word, *_ in chunk if word != 0 and _is_token_id(t)]


def _inserted(empty: list[int], with_words: list[int]) -> list[int]:
    """The ids `with_words` has in place of `empty`'s (templates, start/end tokens cancel out)."""
    p = 0
    while p < min(len(empty), len(with_words)) and empty[p] == with_words[p]:
        p += 1
    s = 0
    while s < min(len(empty), len(with_words)) - p and empty[-1 - s] == with_words[-1 - s]:
        s += 1
    return with_words[p:len(with_words) - s]


def _stand_in_ids(clip) -> dict[str, dict[str, int]]:
    """{stand-in word: {key: token id}} for the keys whose tokenizer makes the word ONE token
    (written after a space, as replace_placeholder writes it; LLM chat templates included)."""
    if clip.tokenizer not in _STAND_IN_IDS:
        def runs(text):
            tokens = clip.tokenize(text, return_word_ids=True)
            return {key: _inserted(_content_ids(empty[key]), _content_ids(chunks)) for key, chunks in tokens.items()}
        empty = _empty_tokens(clip)
        found = {word: {} for word in _STAND_INS}
        together = runs(" " + " ".join(_STAND_INS))  # one look-up for keys where every stand-in is one token
        for key, run in together.items():
            if len(run) == len(_STAND_INS):
                for word, token in zip(_STAND_INS, run):
                    found[word][key] = token
        other_keys = [key for key, run in together.items() if len(run) != len(_STAND_INS)]
        if other_keys:
            for word in _STAND_INS:
                run = runs(" " + word)
                for key in other_keys:
                    if len(run[key]) == 1:
                        found[word][key] = run[key][0]
        _STAND_IN_IDS[clip.tokenizer] = {word: ids for word, ids in found.items() if ids}
    return _STAND_IN_IDS[clip.tokenizer]


def splice_tokens(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor]) -> dict:
    """Tokenize `text` and put `vectors[key]` (each [D]) at every placeholder occurrence."""
    tokens, ids = _stand_in_tokens(clip, text, placeholder)
    return _put_vectors(tokens, ids, vectors, embedding_scales(clip, ids))


def _count(chunks, token: int) -> int:
    return sum(1 for chunk in chunks for t, *_ in chunk if _is_token_id(t) and int(t) == token)


def _stand_in_tokens(clip, text: str, placeholder: str, keys=None) -> tuple[dict, dict[str, int]]:
    """The prompt tokenized with the placeholder written as one-token stand-in words, and their
    ids per key ({key: id}) for the text encoders the CLIP uses (`keys`, default all it uses).

    The placeholder is several tokens but the vector is ONE word embedding. With a one-token
    stand-in, ComfyUI chunks, ends, pads and templates the prompt exactly as for a one-token
    word (classic textual inversion): a placeholder at a chunk boundary stays in one piece and
    every chunk keeps its length, its end token and its encoder's own pad token.

    Each key's tokens are those of `clip.tokenize` of the prompt with that key's stand-in word,
    checked to hold that word's token exactly once per placeholder. Usually one word serves
    every key (one tokenize call); T5 / sentencepiece keys may need another word.
    """
    require_prompt(text, placeholder)
    if keys is None:
        keys = clip_widths(clip).keys()
    table = _stand_in_ids(clip)
    tokens, ids, seen = None, {}, {}
    for word in _STAND_INS:
        if _word(word, re.IGNORECASE).search(text):
            continue  # the prompt itself uses this word
        for spaced in (False, True):
            todo = [key for key in keys if key not in ids and key in table.get(word, {})]
            if not todo:
                break
            replaced, expected = replace_placeholder(text, placeholder, word, spaced)
            tokenized = clip.tokenize(replaced, return_word_ids=True)
            if tokens is None:
                tokens = dict(tokenized)
            for key in todo:
                count = _count(tokenized[key], table[word][key])
                if count == expected:
                    tokens[key], ids[key] = tokenized[key], table[word][key]
                else:
                    seen.setdefault(key, count)
        if all(key in ids for key in keys):
            return tokens, ids
    missing = [key for key in keys if key not in ids]
    family = clip_family(_empty_tokens(clip).keys())
    key = missing[0]
    if key in seen:
        raise PromptError(
            f"The '{key}' text encoder of this {family} CLIP sees the placeholder '{placeholder}' {seen[key]} times but "
            f"the prompt has it {_word(placeholder).subn('', text)[1]} times. Keep it a separate word, e.g. "
            f"'a photo of {placeholder}, at night', and the prompt short enough for that text encoder."
        )
    usable = [word for word in _STAND_INS if key in table.get(word, {})]
    if not usable:
        raise PromptError(
            f"None of AudioToken's stand-in words {list(_STAND_INS)} is one token for the '{key}' tokenizer of this "
            f"{family} CLIP, so AudioToken cannot place the audio vector in its prompts."
        )
    raise PromptError(
        f"AudioToken found no free one-token stand-in word for the '{key}' text encoder of this {family} CLIP: "
        f"the prompt already uses each of {usable}; remove one of them from the prompt."
    )


def vector_entry(vector: torch.Tensor) -> dict:
    return {"type": "embedding", "data": vector}


def entry_vector(token):
    """The vector of a token entry made by _put_vectors, or None for any other entry."""
    if isinstance(token, dict) and token.get("type") == "embedding" and torch.is_tensor(token.get("data")):
        return token["data"]
    return None


def embedding_scales(clip, ids: dict[str, int]) -> dict[str, float]:
    """{key: factor} that each text encoder's input-embedding module applies to its table rows.

    A vector is a word-embedding ROW (what textual inversion edits, what label initialisation
    reads), but ComfyUI splices an embedding entry AFTER that module. ComfyUI 0.33 scales Gemma's
    rows inside the module (x sqrt(width)); 0.3.75 scaled after the splice. The vector gets the
    module's own factor, so it means the same on both. Probed on the stand-in word's row."""
    scales = {}
    for key, encoder in text_encoders(clip, ids.keys()).items():
        if encoder is None:
            continue
        table = encoder.transformer.get_input_embeddings()
        with torch.no_grad():
            row = table.weight[ids[key]].float()
            out = table(torch.tensor([[ids[key]]], device=table.weight.device), out_dtype=torch.float32)[0, 0].to(row.device)
            scale = float(out.norm() / row.norm())
            if not torch.allclose(out, row * scale, rtol=1e-3, atol=1e-6):
                raise PromptError(f"The '{key}' text encoder of this {clip_family(ids.keys())} CLIP transforms its word "
                                  "embeddings in a way AudioToken cannot follow, so it cannot use this CLIP.")
        scales[key] = scale
    return scales


def _put_vectors(tokens: dict, ids: dict[str, int], vectors: dict[str, torch.Tensor],
                 scales: dict[str, float], weight_factor: float = 1.0) -> dict:
    """Replace each stand-in entry by the vector of its text encoder, keeping weight and word id.
    Keys without a vector or stand-in (encoders the CLIP does not use) stay as tokenized.

    The entry is `{"type": "embedding", "data": vector}` (which every SDClipModel splices like a
    bare tensor): family code that compares entries with token ids (HunyuanVideo's template cut
    `tok_pairs[i][0] == 271`) then compares a dict, never a tensor. `scales`: `embedding_scales`
    of the CLIP (each vector is a word-embedding row; it gets the factor the encoder gives its rows).
    `weight_factor` multiplies the vector entries' prompt weight ((<audio>:1.2) x 1.5 -> 1.8).
    """
    vectors = {k: v * scales[k] if scales.get(k, 1.0) != 1.0 else v for k, v in vectors.items()}
    return {
        key: [[(vector_entry(vectors[key]), weight * weight_factor, *rest) if _is_token_id(t) and int(t) == ids[key] else (t, weight, *rest)
               for t, weight, *rest in chunk] for chunk in chunks]
        if key in ids and key in vectors else chunks
        for key, chunks in tokens.items()
    }


def check_vector_widths(vectors: dict[str, torch.Tensor], widths: dict[str, int], what: str,
                        token_keys=None) -> None:
    """ComfyUI silently drops an embedding of the wrong width, and a token made for another
    model family would be used by halves: refuse both with a message naming the fix.

    `widths`: the encoders the CLIP uses; `token_keys`: all its token keys (default: widths')
    -- a token may carry vectors for keys the CLIP has but ignores (SD3 loaded without CLIP-G).
    """
    family = clip_family(token_keys if token_keys is not None else widths)
    allowed = set(token_keys if token_keys is not None else widths)
    if not set(widths) <= set(vectors) or not set(vectors) <= allowed:
        have = ", ".join(f"{k}={v.shape[-1]}" for k, v in sorted(vectors.items()))
        need = ", ".join(f"{k}={w}" for k, w in sorted(widths.items()))
        made_for = FAMILY_NAMES.get(frozenset(vectors))
        other = f", or connect the CLIP of an {made_for} checkpoint" if made_for else ""
        raise PromptError(
            f"{what} has vectors for text encoders [{have}]{f' (made for {made_for})' if made_for else ''} "
            f"but this {family} CLIP needs [{need}]. Use an AudioToken trained for {family}: train one with this "
            f"CLIP's checkpoint{other}."
        )
    for key, width in widths.items():
        got = int(vectors[key].shape[-1])
        if got != width:
            raise PromptError(
                f"{what} gives {got}-wide vectors for text encoder '{key}', but this {family} CLIP "
                f"embeds words in {width} dimensions. Use an AudioToken trained for {family}: train one with this "
                f"CLIP's checkpoint."
            )


def encode_with_vectors(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor], what: str,
                        row_weights: torch.Tensor | None = None) -> list:
    """CONDITIONING for a batch: row b uses `vectors[key][b]` ([B, D] each, one B for all keys).

    `row_weights` [B] (optional) multiplies the audio word's own prompt weight in row b, applied
    the way ComfyUI applies token weights. Rows with equal vectors and weight are encoded once
    (a timeline holds one vector over a whole segment) and copied into place.
    """
    widths = clip_widths(clip)
    tokens, ids = _stand_in_tokens(clip, text, placeholder, widths.keys())
    check_vector_widths(vectors, widths, what, tokens.keys())
    batch = int(next(iter(vectors.values())).shape[0])
    factors = _row_weights(row_weights, batch, what)
    scales = embedding_scales(clip, ids)
    seen, order, distinct = {}, [], []  # content -> its distinct index; each row's; the first row of each
    for b in range(batch):
        content = (factors[b], *(vectors[k][b].detach().cpu().float().numpy().tobytes() for k in sorted(widths)))
        if content not in seen:
            seen[content] = len(distinct)
            distinct.append(b)
        order.append(seen[content])
    rows = [_put_vectors(tokens, ids, {k: vectors[k][b] for k in widths}, scales, factors[b]) for b in distinct]
    conditioning = encode_token_rows(clip, rows)
    if len(distinct) == batch:
        return conditioning
    return _gather_rows(conditioning, torch.tensor(order), len(distinct))


def _row_weights(row_weights, batch: int, what: str) -> list[float]:
    if row_weights is None:
        return [1.0] * batch
    weights = torch.as_tensor(row_weights, dtype=torch.float64).flatten()
    if weights.numel() != batch:
        raise PromptError(f"{what} has {batch} rows but {weights.numel()} row weights: give one weight per row.")
    if not bool(torch.isfinite(weights).all()):
        raise PromptError(f"{what} has a row weight that is not a finite number: give finite weights (1 = plain).")
    return [float(w) for w in weights]


def _gather_rows(conditioning: list, order: torch.Tensor, distinct: int) -> list:
    """Each entry's tensors with one row per distinct prompt row, spread to one row per input row."""
    def spread(value):
        return value[order.to(value.device)] if torch.is_tensor(value) and value.shape[:1] == (distinct,) else value
    return [[spread(cond), {name: spread(value) for name, value in extras.items()}] for cond, extras in conditioning]


def encode_token_rows(clip, rows: list[dict]) -> list:
    """CONDITIONING with one batch row per token dict of `rows` (each as from `clip.tokenize`).

    For SECTION_FAMILIES up to ROWS_PER_PASS rows go through the text
    encoders together, as consecutive sections of one `encode_from_tokens` call, which ComfyUI
    runs as one batched forward pass. Every other family (attention masks, LLM templates cut
    after the encode), scheduled CLIP hooks and rows with a different chunk
    count per text encoder are encoded row by row, as ComfyUI's CLIPTextEncode would.
    """
    step = len(next(iter(rows[0].values())))  # chunks per row
    scheduled = getattr(clip.patcher, "forced_hooks", None) is not None and getattr(clip, "use_clip_schedule", False)
    if (len(rows) == 1 or scheduled or frozenset(rows[0]) not in SECTION_FAMILIES
            or any(len(c) != step for row in rows for c in row.values())):
        return _concat_conditioning([clip.encode_from_tokens_scheduled(row) for row in rows])
    parts = []
    for start in range(0, len(rows), ROWS_PER_PASS):
        group = rows[start:start + ROWS_PER_PASS]
        part = _encode_sections(clip, group, step)
        parts.append(part or _concat_conditioning([clip.encode_from_tokens_scheduled(row) for row in group]))
    return _concat_conditioning(parts)


def _encode_sections(clip, rows: list[dict], step: int) -> list | None:
    """`rows` as consecutive prompt sections of ONE encode call; None when the output does not
    split into rows the way the per-row encode would give them.

    ComfyUI concatenates the sections' conds along the tokens and returns the pooled output of
    the first section only; a forward hook on each text encoder keeps its pooled output of every
    section (row b starts at section b * step).
    """
    n = len(rows)
    merged = {key: [chunk for row in rows for chunk in row[key]] for key in rows[0]}
    outputs = {}
    encoders = text_encoders(clip, merged.keys())
    handles = [encoders[key].register_forward_hook(lambda module, args, out, key=key: outputs.__setitem__(key, out))
               for key in merged if encoders[key] is not None]
    try:
        out = clip.encode_from_tokens(merged, return_pooled=True, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
    cond, first = out.pop("cond"), out.pop("pooled_output", None)
    if cond.shape[0] != 1 or cond.shape[1] % n or any(torch.is_tensor(v) for v in out.values()):
        return None
    pooled = None
    for full in (o[1] for o in outputs.values() if isinstance(o, (tuple, list)) and len(o) > 1):
        if first is None or not torch.is_tensor(full) or full.shape[0] < n * step or full.shape[1:] != first.shape[1:]:
            continue
        rows_pooled = full[0:n * step:step].to(first.device)
        if torch.equal(rows_pooled[:1], first):  # the text encoder whose pooled output ComfyUI returned
            pooled = rows_pooled
    if first is not None and pooled is None:
        return None
    return [[cond.reshape(n, cond.shape[1] // n, cond.shape[2]), {"pooled_output": pooled, **out}]]


def _concat_conditioning(items: list[list]) -> list:
    """Join CONDITIONING lists of the same layout ([[cond, extras], ...]) along the batch."""
    if len(items) == 1:
        return items[0]
    joined = []
    for entries in zip(*items):
        extras = dict(entries[0][1])
        for name, value in entries[0][1].items():
            if torch.is_tensor(value) and all(torch.is_tensor(e[1].get(name)) for e in entries):
                extras[name] = torch.cat([e[1][name] for e in entries], dim=0)
        joined.append([torch.cat([e[0] for e in entries], dim=0), extras])
    return joined
