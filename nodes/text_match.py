"""The "text match" objective: a cheap training signal for the audio word that is NOT the paper's.

The paper (AudioToken, eq. 2) trains the Embedder through the diffusion model's denoising
loss on (audio, image) pairs. Text match needs neither the diffusion model, nor the VAE,
nor images: it asks the text encoder's output for the prompt with the audio vector in
place of the placeholder to equal its output for the same prompt with the sound's LABEL
written there ("a photo of <audio>" vs "a photo of dog barking"). It teaches the vector to
say what the label says, which is a fast warm start (or a cheap run of its own on large
models), never more than the label: details that only the images show come from the
paper's objective.

Definition, per sample (prompt p, audio vectors v_k, label y) and per text-encoder stream k
(the token keys of the CLIP: 'l', 'g', 't5xxl', 'qwen25_7b', ...):

    A_k = stream k's output rows for p with v_k at the placeholder      (with gradient)
    B_k = stream k's output rows for p with y written at the placeholder (no gradient)

"Output" is what the stream's `encode_token_weights` returns to the family's text-encoder
model (chunks concatenated, prompt weights applied; LLM templates included: the family
cuts them later), rows along the token axis, and its pooled output when it has one. The
label is m_k tokens for stream k (several, usually, for T5 and LLM tokenizers), the
placeholder one. Rows are aligned on the token sequences: rows before the first
placeholder pair 1:1; after the n-th placeholder the label rows are n (m_k - 1) further
on; each placeholder row pairs with the MEAN of its label's m_k rows (m_k: the label tokenized
alone, against the placeholder alone); rows of A past the end of B (CLIP padding that the longer label pushed out of the 77) are left out. The
alignment is checked token by token: a prompt whose tokens around the placeholder change
with the label (a CLIP chunk overflowing into a second one) is refused, never guessed.
With R the aligned row pairs (a_r, b_r) of stream k:

    seq_k    = 1/|R| sum_r  mean((a_r - b_r)^2) / (mean(b_r^2) + 1e-6)
    pooled_k = mean((pa_k - pb_k)^2) / (mean(pb_k^2) + 1e-6)        (streams with a pooled output)
    text_match = mean of all seq_k and pooled_k terms

Each row is measured relative to its target's size, so encoders of any scale (CLIP's
normalised outputs, an LLM's hidden states with a few huge activations) and every stream
weigh alike. The loss is 0 exactly when the vector makes the encoder produce the label's
output, e.g. when the label is one token and v_k is that token's input embedding.
"""
from __future__ import annotations

import re
import weakref
from collections import OrderedDict

import torch
import comfy.sd1_clip

from .splice import _is_token_id, _put_vectors, _stand_in_tokens, embedding_scales, replace_placeholder

__all__ = ["TextMatchError", "align_rows", "label_lengths", "encode_streams", "text_match_loss", "ROW_EPS"]

ROW_EPS = 1e-6  # keeps the relative row error finite for an all-zero target row
_EMBEDDING = "<embedding>"  # a non-integer token entry of the prompt itself (e.g. a textual inversion)


class TextMatchError(ValueError):
    """A prompt / label / text encoder that the text-match objective cannot align; the message says why."""


# -- alignment ------------------------------------------------------------------------------

def _token_ids(chunks, stand_in: int | None = None) -> list:
    """Flat token sequence of one stream: ints, None at the stand-in (the audio word), a marker for other embeddings."""
    out = []
    for chunk in chunks:
        for token, *_ in chunk:
            if _is_token_id(token):
                out.append(None if stand_in is not None and int(token) == stand_in else int(token))
            else:
                out.append(_EMBEDDING)
    return out


def align_rows(prompt: list, labelled: list, label_length: int | None = None,
               ) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """Pair the rows of the prompt with the audio word (`prompt`: token ids, None at each audio
    word) with the rows of the prompt with the label written there (`labelled`).

    Returns (rows_a, rows_b, words): rows_a[i] pairs with rows_b[i]; words holds, per audio word,
    (its row in A, the first row of its label in B, the label's length m). Every token outside
    the audio words must agree; TextMatchError if they do not. `label_length`: the label's m
    (see `label_length`); without it, the smallest m for which the tokens agree, which is only
    reliable when nothing can spill over a chunk end (a prompt holding the word alone).
    """
    words = [i for i, t in enumerate(prompt) if t is None]
    if not words:
        raise TextMatchError("the prompt's tokens hold no audio word: nothing to match")
    lengths = [label_length] if label_length is not None else range(1, len(labelled) - words[0] + 1)
    for m in lengths:
        shift = m - 1
        runs = [labelled[p + n * shift: p + n * shift + m] for n, p in enumerate(words)]
        if any(len(run) != m or run != runs[0] for run in runs):
            continue
        rows_a, rows_b, ok = [], [], True
        seen = 0
        for i, token in enumerate(prompt):
            if token is None:
                seen += 1
                continue
            j = i + seen * shift
            if j >= len(labelled):
                if seen < len(words):  # only rows after the last audio word may fall off the end
                    ok = False
                break
            if labelled[j] != token:
                ok = False
                break
            rows_a.append(i)
            rows_b.append(j)
        if ok and len(prompt) + len(words) * shift >= len(labelled):  # every labelled row is accounted for
            return rows_a, rows_b, [(p, p + n * shift, m) for n, p in enumerate(words)]
    raise TextMatchError(
        "the prompt's tokens around the placeholder change when the label is written in its place (for "
        "CLIP: the prompt with the label no longer fits one 77-token chunk): shorten the prompt or the label")


def _labelled(clip, text: str, placeholder: str, label_text: str, prompt_ids: dict[str, list],
              lengths: dict[str, int] | None = None) -> tuple[dict, dict]:
    """The tokens of `text` with the label where the placeholder is, per key written as splice wrote
    that key's stand-in (with or without a space after it), and each key's `align_rows` result."""
    candidates = [clip.tokenize(replace_placeholder(text, placeholder, label_text, spaced)[0], return_word_ids=True)
                  for spaced in (False, True)]
    tokens, alignments = dict(candidates[0]), {}
    for key, ids in prompt_ids.items():
        error = None
        for candidate in candidates:
            try:
                alignments[key] = align_rows(ids, _token_ids(candidate[key]), None if lengths is None else lengths[key])
            except TextMatchError as e:
                error = e
                continue
            tokens[key] = candidate[key]
            break
        else:
            raise TextMatchError(f"text encoder '{key}': {error}")
    return tokens, alignments


def label_lengths(clip, placeholder: str, label_text: str) -> dict[str, int]:
    """{key: how many tokens the label is for that stream}, from the placeholder alone vs the label
    alone (each wrapped in the stream's start/end tokens or chat template, with no room to overflow)."""
    tokens, ids = _stand_in_tokens(clip, placeholder, placeholder)
    prompt_ids = {key: _token_ids(tokens[key], ids[key]) for key in ids}
    _, alignments = _labelled(clip, placeholder, placeholder, label_text, prompt_ids)
    return {key: alignment[2][0][2] for key, alignment in alignments.items()}


# -- per-stream outputs ---------------------------------------------------------------------

def encode_streams(clip, tokens: dict, keys) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """`clip.encode_from_tokens(tokens)` (ComfyUI's own encode: clip options, layer choice, loading)
    while recording what the text-encoder streams `keys` returned: {key: (rows [T, ...], pooled or None)}.

    Each stream is a `ClipTokenWeightEncoder` that the family's model calls with `tokens[key]`
    itself; its call is recognised by that object's identity, so no family needs a table here.
    """
    by_id = {id(tokens[key]): key for key in keys}
    seen: dict[str, tuple] = {}
    wrapped = []

    def recorder(original):
        def encode_token_weights(token_weight_pairs, *args, **kwargs):
            out = original(token_weight_pairs, *args, **kwargs)
            key = by_id.get(id(token_weight_pairs))
            if key is not None and key not in seen:
                seen[key] = out
            return out
        return encode_token_weights

    for module in clip.cond_stage_model.modules():
        if isinstance(module, comfy.sd1_clip.ClipTokenWeightEncoder) and "encode_token_weights" not in vars(module):
            module.encode_token_weights = recorder(module.encode_token_weights)
            wrapped.append(module)
    try:
        clip.encode_from_tokens(tokens, return_pooled=True)
    finally:
        for module in wrapped:
            del module.encode_token_weights
    missing = sorted(set(keys) - set(seen))
    if missing:
        raise TextMatchError(
            f"the text encoder(s) {missing} of this CLIP were not run on their own tokens, so text match cannot "
            "compare their outputs; train this model with the diffusion objective")
    out = {}
    for key, result in seen.items():
        rows = result[0]
        if rows.shape[0] != 1:
            raise TextMatchError(f"text encoder '{key}' returned {rows.shape[0]} sequences for one prompt")
        pooled = result[1] if len(result) > 1 and torch.is_tensor(result[1]) else None
        out[key] = (rows[0].movedim(-2, 0), None if pooled is None else pooled[0])
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a - b)^2) / (mean(b^2) + ROW_EPS) over all but the first dim (rows) -> [R]."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return (a - b).pow(2).mean(dim=1) / (b.pow(2).mean(dim=1) + ROW_EPS)


def _escape_label(label: str) -> str:
    """A label as literal prompt text: ComfyUI reads "(...)" as prompt weights."""
    return re.sub(r"([()\\])", r"\\\1", str(label).strip())


def sample_loss(a: dict, b: dict, alignments: dict) -> torch.Tensor:
    """The text-match loss of one sample from the two encodes' stream outputs and each key's row alignment."""
    terms = []
    for key in sorted(alignments):
        (rows_a, pooled_a), (rows_b, pooled_b) = a[key], b[key]
        index_a, index_b, words = alignments[key]
        got = [rows_a[index_a]] + [rows_a[p:p + 1] for p, _, _ in words]
        want = [rows_b[index_b]] + [rows_b[q:q + m].float().mean(dim=0, keepdim=True) for _, q, m in words]
        terms.append(_relative_error(torch.cat(got), torch.cat(want).to(rows_a.device)).mean())
        if pooled_a is not None and pooled_b is not None:
            terms.append(_relative_error(pooled_a[None], pooled_b[None].to(pooled_a.device))[0])
    return torch.stack(terms).mean()


def _check_rows(outputs: dict, ids: dict[str, list], what: str) -> None:
    for key, seq in ids.items():
        if outputs[key][0].shape[0] != len(seq):
            raise TextMatchError(f"text encoder '{key}' gave {outputs[key][0].shape[0]} rows for the {len(seq)} tokens "
                                 f"of the {what}; text match cannot align them")


# clip -> {(text, placeholder, label): (alignments, target outputs)}: the frozen text encoders give
# the labelled prompt the same outputs every step, so each is encoded once (the LRU bounds memory).
_LABEL_TARGETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LABEL_TARGETS_SIZE = 64


def _label_target(clip, text: str, placeholder: str, label: str, ids: dict, ids_a: dict) -> tuple[dict, dict]:
    """The row alignment and the (no-grad) stream outputs of `text` with `label` in the placeholder's place."""
    cache = _LABEL_TARGETS.setdefault(clip, OrderedDict())
    key = (text, placeholder, label)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    label_text = _escape_label(label)
    lengths = label_lengths(clip, placeholder, label_text)
    labelled, alignments = _labelled(clip, text, placeholder, label_text, ids_a, lengths)
    with torch.no_grad():
        target = encode_streams(clip, labelled, ids)
    _check_rows(target, {k: _token_ids(labelled[k]) for k in ids}, f"prompt with the label '{label}'")
    cache[key] = alignments, target
    while len(cache) > _LABEL_TARGETS_SIZE:
        cache.popitem(last=False)
    return cache[key]


def text_match_loss(clip, prompt_tokens: tuple[dict, dict], text: str, placeholder: str,
                    vectors: dict[str, torch.Tensor], labels: list[str]) -> torch.Tensor:
    """Per-sample text-match loss [B] (see the module docstring), differentiable w.r.t. `vectors`.

    `clip`: an autograd-safe ComfyUI CLIP (the training backend's private copy); `prompt_tokens`:
    `splice._stand_in_tokens(clip, text, placeholder)` (the tokens with one-token stand-in
    words, and their id per key); `vectors`: {key: [B, D]}; `labels`: B label texts.
    """
    tokens, ids = prompt_tokens
    batch = int(next(iter(vectors.values())).shape[0])
    if len(labels) != batch:
        raise TextMatchError(f"text match needs one label per sample: got {len(labels)} labels for {batch} samples")
    ids_a = {key: _token_ids(tokens[key], ids[key]) for key in ids}
    scales = embedding_scales(clip, ids)
    losses = []
    for row, label in enumerate(labels):
        if not str(label).strip():
            raise TextMatchError("text match needs the sound's label: a training item has an empty label; give "
                                 "every item a label (subfolder name or labels CSV)")
        alignments, target = _label_target(clip, text, placeholder, str(label), ids, ids_a)
        audio = encode_streams(clip, _put_vectors(tokens, ids, {k: v[row] for k, v in vectors.items()}, scales), ids)
        _check_rows(audio, ids_a, "prompt with the audio word")
        losses.append(sample_loss(audio, target, alignments))
    device = next(iter(vectors.values())).device
    return torch.stack([loss.to(device) for loss in losses])
