"""Put an audio vector into a ComfyUI prompt in place of its placeholder word.

ComfyUI tokenizers return `{key: [chunk, ...]}` where each chunk holds exactly the text
encoder's context length of `(token, weight, word_id)` entries, and `SDClipModel` splices
any tensor entry into the input word embeddings. The placeholder (`<audio>`) is several
BPE tokens; we replace that run by ONE tensor entry (keeping its prompt weight) and pad
the chunk at its end, so the end token and the pooled output stay where CLIP expects them.
"""
from __future__ import annotations

import numbers

import torch

SUPPORTED_FAMILIES = {
    frozenset({"l"}): "SD1.x",
    frozenset({"h"}): "SD2.x",
    frozenset({"g", "l"}): "SDXL",
}


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


def clip_widths(clip) -> dict[str, int]:
    """Input word-embedding width of each of the CLIP's text encoders, keyed like its tokens."""
    widths = {}
    for key in clip.tokenize("").keys():
        encoder = getattr(clip.cond_stage_model, f"clip_{key}", None)
        if encoder is None:
            raise PromptError(f"This CLIP has no text encoder 'clip_{key}'; AudioToken cannot use it.")
        widths[key] = int(encoder.transformer.get_input_embeddings().weight.shape[1])
    return widths


def check_prompt(text: str, placeholder: str) -> str | None:
    """A message saying what is wrong with the prompt, or None when it is usable."""
    if not placeholder.strip():
        return "The placeholder is empty: set it to a word such as <audio>."
    if any(c.isspace() for c in placeholder):
        return f"The placeholder '{placeholder}' contains spaces: use one word such as <audio>."
    if placeholder not in text:
        return (f"The prompt does not contain the placeholder '{placeholder}', so the sound would be ignored. "
                f"Write it where the sound belongs, e.g. 'a photo of {placeholder}'.")
    return None


# One-token words used to stand in for the placeholder while ComfyUI tokenizes the prompt
# (rare in prompts; the first one that the prompt does not already use is taken).
_STAND_INS = ("sks", "ohwx", "bbq", "ufo", "tok")


def _is_token_id(token) -> bool:
    return isinstance(token, numbers.Integral)


def _stand_in_ids(clip, word: str) -> dict[str, int] | None:
    """The token id of `word` for each text encoder, or None where it is not exactly one token."""
    ids = {}
    for key, chunks in clip.tokenize(word, return_word_ids=True).items():
        run = [int(t) for t, _, w in chunks[0] if w != 0 and _is_token_id(t)]
        if len(run) != 1:
            return None
        ids[key] = run[0]
    return ids


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
    problem = check_prompt(text, placeholder)
    if problem:
        raise PromptError(problem)
    expected = text.count(placeholder)
    for word in _STAND_INS:
        ids = _stand_in_ids(clip, word)
        if ids is None:
            continue
        # Spaces around the stand-in make it a word of its own ("<audio>," -> " sks ,").
        tokens = clip.tokenize(text.replace(placeholder, f" {word} "), return_word_ids=True)
        counts = {key: sum(1 for chunk in chunks for t, _, _ in chunk if _is_token_id(t) and int(t) == ids[key])
                  for key, chunks in tokens.items()}
        if any(n > expected for n in counts.values()):
            continue  # the prompt itself uses this word: take the next stand-in
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
    """ComfyUI silently drops an embedding of the wrong width: refuse it with a clear message."""
    family = clip_family(widths)
    missing = sorted(set(widths) - set(vectors))
    if missing:
        have = ", ".join(f"{k}={v.shape[-1]}" for k, v in sorted(vectors.items()))
        need = ", ".join(f"{k}={w}" for k, w in sorted(widths.items()))
        raise PromptError(
            f"{what} has vectors for text encoders [{have}] but this {family} CLIP needs [{need}]. "
            f"Use an AudioToken trained for {family} (or train one with the AudioToken training node)."
        )
    for key, width in widths.items():
        got = int(vectors[key].shape[-1])
        if got != width:
            raise PromptError(
                f"{what} gives {got}-wide vectors for text encoder '{key}', but this {family} CLIP "
                f"embeds words in {width} dimensions. Use an AudioToken trained for {family}."
            )


def encode_with_vectors(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor], what: str) -> list:
    """CONDITIONING for a batch: item b uses `vectors[key][b]`; conds are concatenated on batch."""
    widths = clip_widths(clip)
    check_vector_widths(vectors, widths, what)
    if any(v.dim() != 2 for v in vectors.values()):
        raise PromptError(f"{what} must hold [batch, width] vectors; got shapes "
                          f"{ {k: tuple(v.shape) for k, v in vectors.items()} }.")
    batch = {int(v.shape[0]) for v in vectors.values()}
    if len(batch) != 1:
        raise PromptError(f"{what} has different batch sizes per text encoder: {sorted(batch)}.")
    tokens, ids = _stand_in_tokens(clip, text, placeholder)
    items = []
    for b in range(batch.pop()):
        items.append(clip.encode_from_tokens_scheduled(_put_vectors(tokens, ids, {k: vectors[k][b] for k in widths})))
    return _concat_conditioning(items)


def _concat_conditioning(items: list[list]) -> list:
    """Join per-item CONDITIONING lists ([[cond, extras], ...]) into one batched list."""
    if len(items) == 1:
        return items[0]
    joined = []
    for entries in zip(*items):
        cond = torch.cat([e[0] for e in entries], dim=0)
        extras = dict(entries[0][1])
        for name, value in entries[0][1].items():
            if torch.is_tensor(value) and all(torch.is_tensor(e[1].get(name)) for e in entries):
                extras[name] = torch.cat([e[1][name] for e in entries], dim=0)
        joined.append([cond, extras])
    return joined
