"""Put an audio vector into a ComfyUI prompt in place of its placeholder word.

ComfyUI tokenizers return `{key: [chunk, ...]}` where each chunk holds exactly the text
encoder's context length of `(token, weight, word_id)` entries, and `SDClipModel` splices
any tensor entry into the input word embeddings. The placeholder (`<audio>`) is several
BPE tokens; we replace that run by ONE tensor entry (keeping its prompt weight) and pad
the chunk at its end, so the end token and the pooled output stay where CLIP expects them.

The prompt is tokenized once per encode; the rows of a batch (one per clip or window) then
go through the text encoder together, as consecutive prompt sections of one ComfyUI encode.
"""
from __future__ import annotations

import numbers
import re
import weakref

import torch

SUPPORTED_FAMILIES = {
    frozenset({"l"}): "SD1.x",
    frozenset({"h"}): "SD2.x",
    frozenset({"g", "l"}): "SDXL",
}

# Prompt rows per text-encoder pass: bounds activation memory when long audio gives hundreds of rows.
ROWS_PER_PASS = 64


class PromptError(ValueError):
    """A prompt or CLIP that cannot take the audio vector; the message says what to change."""


def clip_family(keys) -> str:
    keys = frozenset(keys)
    if keys not in SUPPORTED_FAMILIES:
        raise PromptError(
            f"This CLIP has text encoders {sorted(keys)}; AudioToken supports SD1.x (l), "
            f"SD2.x (h) and SDXL (g + l) checkpoints. Connect the CLIP output of such a checkpoint loader."
        )
    return SUPPORTED_FAMILIES[keys]


def clip_widths(clip, keys=None) -> dict[str, int]:
    """Input word-embedding width of each of the CLIP's text encoders, keyed like its tokens."""
    widths = {}
    for key in keys if keys is not None else clip.tokenize("").keys():
        encoder = getattr(clip.cond_stage_model, f"clip_{key}", None)
        if encoder is None:
            raise PromptError(f"This CLIP has no text encoder 'clip_{key}'; AudioToken cannot use it.")
        widths[key] = int(encoder.transformer.get_input_embeddings().weight.shape[1])
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


def replace_placeholder(text: str, placeholder: str, word: str) -> tuple[str, int]:
    """`text` with every placeholder word replaced by ` word `, and how many there were."""
    return _word(placeholder).subn(lambda _: f" {word} ", text)


# One-token words used to stand in for the placeholder while ComfyUI tokenizes the prompt
# (rare in prompts; the first one that the prompt does not already use is taken).
_STAND_INS = ("sks", "ohwx", "bbq", "ufo", "tok")
# tokenizer -> {stand-in word: {key: token id}}: the ids depend on the tokenizer only.
_STAND_IN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_token_id(token) -> bool:
    return isinstance(token, numbers.Integral)


def _stand_in_ids(clip) -> dict[str, dict[str, int]]:
    """{stand-in word: {key: token id}} for the stand-ins that are one token for every text encoder."""
    if clip.tokenizer not in _STAND_IN_IDS:
        def runs(text):
            return {key: [int(t) for t, _, w in chunks[0] if w != 0 and _is_token_id(t)]
                    for key, chunks in clip.tokenize(text, return_word_ids=True).items()}
        together = runs(" ".join(_STAND_INS))  # one look-up when every stand-in is one token
        if all(len(r) == len(_STAND_INS) for r in together.values()):
            found = {word: {key: r[i] for key, r in together.items()} for i, word in enumerate(_STAND_INS)}
        else:
            found = {}
            for word in _STAND_INS:
                run = runs(word)
                if all(len(r) == 1 for r in run.values()):
                    found[word] = {key: r[0] for key, r in run.items()}
        _STAND_IN_IDS[clip.tokenizer] = found
    return _STAND_IN_IDS[clip.tokenizer]


def splice_tokens(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor]) -> dict:
    """Tokenize `text` and put `vectors[key]` (each [D]) at every placeholder occurrence."""
    return _put_vectors(*_stand_in_tokens(clip, text, placeholder), vectors)


def _stand_in_tokens(clip, text: str, placeholder: str) -> tuple[dict, dict[str, int]]:
    """The prompt tokenized with the placeholder written as a one-token stand-in word, and its ids.

    The placeholder is several BPE tokens but the vector is ONE word embedding. With a one-token
    stand-in, ComfyUI chunks, ends and pads the prompt exactly as for a one-token word (classic
    textual inversion): a placeholder at a chunk boundary stays in one piece, every chunk keeps
    its length, its end token and its encoder's own pad token.
    """
    require_prompt(text, placeholder)
    for word, ids in _stand_in_ids(clip).items():
        if _word(word, re.IGNORECASE).search(text):
            continue  # the prompt itself uses this word
        # Spaces around the stand-in make it a word of its own ("<audio>," -> " sks ,").
        replaced, expected = replace_placeholder(text, placeholder, word)
        tokens = clip.tokenize(replaced, return_word_ids=True)
        counts = {key: sum(1 for chunk in chunks for t, _, _ in chunk if _is_token_id(t) and int(t) == ids[key])
                  for key, chunks in tokens.items()}
        if any(n > expected for n in counts.values()):
            continue  # a word of the prompt contains the stand-in's token: take the next stand-in
        missing = sorted(key for key, n in counts.items() if n != expected)
        if missing:
            raise PromptError(
                f"Found the placeholder '{placeholder}' {counts[missing[0]]} times in the tokens of text encoder "
                f"'{missing[0]}' but {expected} times in the prompt. Keep it a separate word, "
                f"e.g. 'a photo of {placeholder}, at night'."
            )
        return tokens, ids
    raise PromptError(
        f"The prompt already uses every stand-in word {list(_STAND_INS)} that AudioToken needs while it "
        f"places '{placeholder}'; remove one of them from the prompt."
    )


def _put_vectors(tokens: dict, ids: dict[str, int], vectors: dict[str, torch.Tensor]) -> dict:
    """Replace each stand-in entry by the vector of its text encoder, keeping weight and word id."""
    return {
        key: [[(vectors[key], weight, w) if _is_token_id(t) and int(t) == ids[key] else (t, weight, w)
               for t, weight, w in chunk] for chunk in chunks]
        for key, chunks in tokens.items()
    }


def check_vector_widths(vectors: dict[str, torch.Tensor], widths: dict[str, int], what: str) -> None:
    """ComfyUI silently drops an embedding of the wrong width, and a token made for another
    model family would be used by halves: refuse both with a message naming the fix."""
    family = clip_family(widths)
    if set(vectors) != set(widths):
        have = ", ".join(f"{k}={v.shape[-1]}" for k, v in sorted(vectors.items()))
        need = ", ".join(f"{k}={w}" for k, w in sorted(widths.items()))
        made_for = SUPPORTED_FAMILIES.get(frozenset(vectors))
        other = f", or connect the CLIP of an {made_for} checkpoint" if made_for else ""
        raise PromptError(
            f"{what} has vectors for text encoders [{have}]{f' (made for {made_for})' if made_for else ''} "
            f"but this {family} CLIP needs [{need}]. Use an AudioToken trained for {family}{other}."
        )
    for key, width in widths.items():
        got = int(vectors[key].shape[-1])
        if got != width:
            raise PromptError(
                f"{what} gives {got}-wide vectors for text encoder '{key}', but this {family} CLIP "
                f"embeds words in {width} dimensions. Use an AudioToken trained for {family}."
            )


def encode_with_vectors(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor], what: str) -> list:
    """CONDITIONING for a batch: row b uses `vectors[key][b]` ([B, D] each, one B for all keys)."""
    tokens, ids = _stand_in_tokens(clip, text, placeholder)
    check_vector_widths(vectors, clip_widths(clip, tokens.keys()), what)
    batch = int(next(iter(vectors.values())).shape[0])
    rows = [_put_vectors(tokens, ids, {k: v[b] for k, v in vectors.items()}) for b in range(batch)]
    return encode_token_rows(clip, rows)


def encode_token_rows(clip, rows: list[dict]) -> list:
    """CONDITIONING with one batch row per token dict of `rows` (each as from `clip.tokenize`).

    Up to ROWS_PER_PASS rows go through the text encoder together, as consecutive sections of
    one `encode_from_tokens` call, which ComfyUI runs as one batched forward pass. Where that
    layout does not hold (scheduled CLIP hooks, a different chunk count per text encoder) each
    row is encoded on its own, as ComfyUI's CLIPTextEncode would.
    """
    step = len(next(iter(rows[0].values())))  # chunks per row
    scheduled = getattr(clip.patcher, "forced_hooks", None) is not None and getattr(clip, "use_clip_schedule", False)
    if len(rows) == 1 or scheduled or any(len(c) != step for row in rows for c in row.values()):
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
    handles = [getattr(clip.cond_stage_model, f"clip_{key}").register_forward_hook(
        lambda module, args, out, key=key: outputs.__setitem__(key, out)) for key in merged]
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
