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


def _placeholder_ids(clip, placeholder: str) -> dict[str, list[int]]:
    """The token ids of the placeholder word for each text encoder."""
    ids = {}
    for key, chunks in clip.tokenize(placeholder, return_word_ids=True).items():
        ids[key] = [int(t) for t, _, word in chunks[0] if word != 0]
        if not ids[key]:
            raise PromptError(f"The placeholder '{placeholder}' tokenizes to nothing; choose a visible word such as <audio>.")
    return ids


def _splice_chunk(chunk: list, run: list[int], vector: torch.Tensor, pad) -> tuple[list, int]:
    """Replace each occurrence of `run` (same word) by one vector entry; pad at the end."""
    out, found, i = [], 0, 0
    n = len(run)
    while i < len(chunk):
        window = chunk[i:i + n]
        if (len(window) == n and all(isinstance(e[0], numbers.Integral) and int(e[0]) == r for e, r in zip(window, run))
                and len({e[2] for e in window}) == 1):
            _, weight, word = window[0]
            out.append((vector, weight, word))
            found += 1
            i += n
        else:
            out.append(chunk[i])
            i += 1
    out.extend([pad] * (len(chunk) - len(out)))
    return out, found


def splice_tokens(clip, text: str, placeholder: str, vectors: dict[str, torch.Tensor]) -> dict:
    """Tokenize `text` and put `vectors[key]` (each [D]) at every placeholder occurrence."""
    problem = check_prompt(text, placeholder)
    if problem:
        raise PromptError(problem)
    expected = text.count(placeholder)
    # Spaces around the placeholder make it a word of its own ("<audio>," would merge with the comma).
    tokens = clip.tokenize(text.replace(placeholder, f" {placeholder} "), return_word_ids=True)
    run_ids = _placeholder_ids(clip, placeholder)
    out = {}
    for key, chunks in tokens.items():
        pad = chunks[0][-1]  # every SD tokenizer pads its chunks to full length with its pad token
        pad = (pad[0], 1.0, 0)
        spliced, found = [], 0
        for chunk in chunks:
            new_chunk, n = _splice_chunk(chunk, run_ids[key], vectors[key], pad)
            spliced.append(new_chunk)
            found += n
        if found != expected:
            raise PromptError(
                f"Found the placeholder '{placeholder}' {found} times in the tokens of text encoder '{key}' "
                f"but {expected} times in the prompt. Keep it a separate word, e.g. 'a photo of {placeholder}, at night'."
            )
        out[key] = spliced
    return out


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
    batch = {int(v.shape[0]) for v in vectors.values()}
    if len(batch) != 1:
        raise PromptError(f"{what} has different batch sizes per text encoder: {sorted(batch)}.")
    items = []
    for b in range(batch.pop()):
        tokens = splice_tokens(clip, text, placeholder, {k: vectors[k][b] for k in widths})
        items.append(clip.encode_from_tokens_scheduled(tokens))
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
