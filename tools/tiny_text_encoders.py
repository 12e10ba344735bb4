"""Tiny in-process ComfyUI CLIPs (text encoders) for every text-stream family, for tests.

`tiny_clip(family, seed)` returns a `comfy.sd.CLIP` built from ComfyUI's OWN tokenizer and
text-encoder classes for that family (the classes `comfy.sd.load_text_encoder_state_dicts`
picks), with the real vocabularies but 1-4 layer transformers with small heads/ffn, and
weights initialised deterministically from `seed` (ComfyUI creates its layers with
torch.empty). Each text encoder is seeded from (seed, its key), so the T5 of "flux" equals
the T5 of "sd3" for the same seed -- they even share the weight tensors (memory, build time):
never modify a tiny CLIP's weights in place without restoring them. fp32 by default (ComfyUI
itself would pick fp16 on CPU). Building all nine takes about 10-20 s the first time in a
process (mostly the seeded 32k x 4096 T5 and 49k x 1280 CLIP-G embedding tables), then
each family is cached.

Final widths (cond = CONDITIONING tensor, pooled = "pooled_output"); these stay fixed:

  family         token keys (width)                                  cond [1, T, D]         pooled
  sd3            l (768), g (1280), t5xxl (4096)                      D 4096, T = 77 + T5    2048 (l ++ g)
                                                                       (l ++ g padded, then
                                                                       the T5 tokens)
  flux           l (768), t5xxl (4096)                                D 4096 (T5)            768 (clip_l)
  chroma         t5xxl (4096)                                         D 4096                 None
  wan            umt5xxl (4096)                                       D 4096                 None
  qwen_image     qwen25_7b (112; real 3584)                           D 112                  None
  hunyuan_video  l (768), llama (128; real 4096)                      D 128                  768 (clip_l)
  z_image        qwen3_4b (80; real 2560)                             D 80                   None
  lumina2        gemma2_2b (2304)                                     D 2304                 None
  hidream        l (768), g (1280), t5xxl (4096), llama (128;         D 4096 (T5, 128 tok)   2048 (l ++ g)
                 real 4096)                                           + "conditioning_llama3"
                                                                       [1, 4 layers, T, 128]

Narrow widths: the LLMs' vocabularies are huge (Qwen2.5-7B 152k x 3584 would be 2 GB), so
their width is the real one / 32; the pack must read widths from the model anyway. The
real widths are kept where the vocabulary is small or the code needs them (SD3 pads
l ++ g to 4096 and concatenates T5 tokens, so T5 must be 4096).

Tokenizers that ComfyUI does not ship: umT5 (Wan) and Gemma-2 (Lumina 2) read a
sentencepiece model from the checkpoint file. Here a small one (about 490 pieces, byte
fallback, the real special ids: umT5 pad 0 / eos 1 / unk 2; Gemma pad 0 / eos 1 / bos 2 /
unk 3) is trained on first use with the `sentencepiece` package (which ComfyUI requires)
on a built-in English word list (`spiece_model("umt5" | "gemma")`, passed to ComfyUI as
tokenizer_data["spiece_model"]); its vocabulary size is the model's vocab_size.

Known quirk of ComfyUI 0.3.75 with the installed transformers: its LlamaTokenizerFast
(HunyuanVideo, HiDream `llama`) drops spaces and newlines ("barking" -> "b", "arking"); the
tiny CLIPs inherit it (upstream ComfyUI has its own BPE tokenizer for Llama).

Qwen-Image's text encoder class also builds a fixed-size Qwen2.5-VL vision tower (32 layers
of 1280, about 2.5 GB); it is dropped right after construction (text-only prompts never use
it), so image-edit prompts cannot be encoded with the tiny Qwen-Image CLIP.
"""
from __future__ import annotations

import functools
import io
import zlib

import torch

from tools.comfy_root import import_comfy

TINY_FAMILIES = ("sd3", "flux", "chroma", "wan", "qwen_image", "hunyuan_video", "z_image", "lumina2", "hidream")

# ComfyUI reads "<model_name>_model_config" from model_options and overrides the encoder's
# JSON/dataclass config with it; model_name is set by each encoder class (clip_l, t5xxl,
# llama) or by SD1ClipModel(name=...) (umt5xxl, qwen25_7b, qwen3_4b, gemma2_2b).
_CLIP = {"intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}  # 3: SD3 reads layer -2
_T5 = {"d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2}
_LLM = {"intermediate_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1}  # head_dim is fixed at 128/256
MODEL_CONFIGS = {
    "clip_l_model_config": dict(_CLIP, hidden_size=768),
    "clip_g_model_config": dict(_CLIP, hidden_size=1280, projection_dim=1280),
    "t5xxl_model_config": dict(_T5, d_model=4096),
    "umt5xxl_model_config": dict(_T5, d_model=4096),  # vocab_size: the sentencepiece model's
    "llama_model_config": dict(_LLM, hidden_size=128, num_hidden_layers=4),  # HunyuanVideo reads layer -3
    "qwen25_7b_model_config": dict(_LLM, hidden_size=112, num_hidden_layers=2),
    "qwen3_4b_model_config": dict(_LLM, hidden_size=80, num_hidden_layers=3),  # Z-Image reads layer -2
    "gemma2_2b_model_config": dict(_LLM, hidden_size=2304, num_hidden_layers=3),  # vocab: sentencepiece's
}

_WORDS = (
    "a an the of in on at to with and or for from by under over near behind above below into "
    "photo picture image painting drawing render video scene view shot close up portrait landscape "
    "dog cat bird horse cow sheep lion tiger bear wolf fox duck owl frog bee fly fish whale "
    "car truck train plane boat ship bus bike motorcycle engine siren horn bell drum guitar piano "
    "violin trumpet flute saxophone organ choir singer crowd baby child man woman people person "
    "rain storm thunder wind fire water river sea ocean wave beach forest tree grass field "
    "mountain snow ice sky cloud sun moon night day morning evening street city road bridge "
    "house room kitchen church stadium concert party market station airport farm park garden "
    "red green blue yellow black white orange purple brown gray dark bright loud quiet soft "
    "old young small big large tall long short happy sad beautiful high quality resolution "
    "detailed sharp realistic cinematic style light shadow color sound noise music song voice "
    "is are was be has have playing singing barking running flying falling burning crying "
    "describe detailing following aspects main content theme objects actions background "
    "camera angle movement user assistant system prompt text image video the best of").split()


def _corpus() -> list[str]:
    """Deterministic English-like sentences (word lists shuffled by a fixed generator)."""
    g = torch.Generator().manual_seed(1234)
    lines = []
    for _ in range(3000):
        idx = torch.randint(len(_WORDS), (int(torch.randint(4, 14, (1,), generator=g)),), generator=g)
        lines.append(" ".join(_WORDS[i] for i in idx.tolist()) + ".")
    lines.append("0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ( ) < > [ ] { } - _ / \\ ' \" * & % $ # @ + =")
    return lines


@functools.lru_cache(maxsize=None)
def spiece_model(kind: str) -> bytes:
    """A small serialized sentencepiece model with umT5's ("umt5") or Gemma's ("gemma") special ids."""
    import sentencepiece

    ids = {"umt5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
           "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)}[kind]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=out, vocab_size=1000, model_type="unigram",
        byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2, **ids)
    return out.getvalue()


def _spiece_vocab_size(data: bytes) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=data).get_piece_size()


def _recipes():
    """family -> (TE model class, tokenizer class, tokenizer_data): what ComfyUI builds for it."""
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.hidream as hidream
    import comfy.text_encoders.hunyuan_video as hunyuan_video
    import comfy.text_encoders.lumina2 as lumina2
    import comfy.text_encoders.pixart_t5 as pixart_t5
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.sd3_clip as sd3_clip
    import comfy.text_encoders.wan as wan
    import comfy.text_encoders.z_image as z_image

    return {
        "sd3": (sd3_clip.sd3_clip(), sd3_clip.SD3Tokenizer, {}),
        "flux": (flux.flux_clip(), flux.FluxTokenizer, {}),
        "chroma": (pixart_t5.pixart_te(), pixart_t5.PixArtTokenizer, {}),  # CLIPType.CHROMA
        "wan": (wan.te(), wan.WanT5Tokenizer, {"spiece_model": spiece_model("umt5")}),
        "qwen_image": (qwen_image.te(), qwen_image.QwenImageTokenizer, {}),
        "hunyuan_video": (hunyuan_video.hunyuan_video_clip(), hunyuan_video.HunyuanVideoTokenizer, {}),
        "z_image": (z_image.te(), z_image.ZImageTokenizer, {}),
        "lumina2": (lumina2.te(), lumina2.LuminaTokenizer, {"spiece_model": spiece_model("gemma")}),
        "hidream": (hidream.hidream_clip(), hidream.HiDreamTokenizer, {}),
    }


def text_encoders(clip) -> dict[str, torch.nn.Module]:
    """{token key: the SDClipModel serving it} of a CLIP (attribute clip_<key> or <key>)."""
    model = clip.cond_stage_model
    found = {}
    for key in clip.tokenize("").keys():
        encoder = getattr(model, f"clip_{key}", None) or getattr(model, key, None)
        found[key] = encoder
    return found


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights: norms identity (weight 1, or 0 for Gemma's (1 + w) RMSNorm), biases 0,
    embedding rows N(0, 1/width), matrices N(0, 1/fan_in); parameters in name order."""
    g = torch.Generator().manual_seed(seed)
    norms = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("Norm"):
            norms[name] = 0.0 if getattr(m, "add", False) else 1.0
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if name.endswith("logit_scale") or p.numel() == 0:
                continue
            if owner in norms:
                p.fill_(norms[owner] if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


@functools.lru_cache(maxsize=None)
def tiny_clip(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The tiny CLIP of `family` (one of TINY_FAMILIES); cached per process: do not modify it
    (clone() it to add patches or hooks)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown family '{family}': use one of {list(TINY_FAMILIES)}.")
    import_comfy(cpu=True)
    import comfy.sd
    import comfy.supported_models_base

    te_class, tokenizer_class, tokenizer_data = _recipes()[family]
    options = {"dtype": dtype, "initial_device": torch.device("cpu"), "load_device": torch.device("cpu"),
               "offload_device": torch.device("cpu"),
               **{k: dict(v) for k, v in MODEL_CONFIGS.items()}}
    for spiece_key, config_key in (("umt5", "umt5xxl_model_config"), ("gemma", "gemma2_2b_model_config")):
        options[config_key]["vocab_size"] = _spiece_vocab_size(spiece_model(spiece_key))
    if family == "hidream":
        options["vocab_size"] = 128256  # HiDreamTEModel writes this into model_options itself; keep ours unshared
    target = comfy.supported_models_base.ClipTarget(tokenizer_class, te_class)
    clip = comfy.sd.CLIP(target=target, tokenizer_data=tokenizer_data, model_options=options)
    for key, encoder in text_encoders(clip).items():
        if encoder is None:
            raise RuntimeError(f"tiny_clip({family!r}): no text encoder for token key '{key}'.")
        if getattr(encoder.transformer, "visual", None) is not None:
            encoder.transformer.visual = None  # fixed-size vision tower; text-only prompts never use it
        _seeded(encoder, key, seed)
    return clip


_WEIGHTS: dict = {}  # (key, seed, shapes) -> state dict, shared by every family that has that encoder


def _seeded(encoder: torch.nn.Module, key: str, seed: int) -> None:
    """Seeded weights for one text encoder; an encoder of the same key, shapes and seed in another
    family (the T5 of flux, chroma, sd3, hidream) shares the same tensors (memory, build time)."""
    state = encoder.state_dict()
    cache_key = (key, seed, tuple((n, tuple(t.shape), t.dtype) for n, t in state.items()))
    if cache_key not in _WEIGHTS:
        init_weights(encoder, seed * 1000 + zlib.crc32(key.encode()) % 1000)
        _WEIGHTS[cache_key] = encoder.state_dict()
    else:
        encoder.load_state_dict(_WEIGHTS[cache_key], assign=True)
