"""Per model family: the encode node against its bare forwards, and a training step against its floor.

For each family (Flux.1, SD3.x, Wan 2.x, Qwen-Image, ...) this builds the tiny in-process
ComfyUI text encoders of `tools/tiny_text_encoders.py` (the family's own classes, real
widths except the LLMs', 1-4 layers) and the tiny diffusion model of `tools/placeholder_dit.py`,
with a BEATs-sized random audio encoder and 10 s of audio, and measures:

  1. AudioTokenEncode (warm median) / the bare sum of its forwards: audio encoder, Embedders,
     one text-encoder pass over the spliced tokens. Goal <= 1.1: the splice (stand-in
     tokenization, vector placement, checks) adds no measurable work.
  2. the core Trainer's step (cached features and latents) / the floor: text encoder
     forward+backward through the spliced vectors + diffusion model forward+backward of the
     loss. Goal <= 1.15. The Embedders' own forward, backward and AdamW step are timed too: for a
     4096-wide stream (T5, umT5, Llama) an Embedder has 65.1M parameters (7.4x the paper's
     768-wide one, since its pooling layers are D x D), which is negligible next to a full-size
     DiT but dominates next to these tiny ones, so the tiny-model ratio to quote is
     step / (floor + Embedders).
  3. peak RSS of the process (CPU) or peak allocated VRAM (GPU).

The models are tiny, so (1) and (2) measure what the pack adds around the forwards, not
full-size speed; full-size figures need real weights and a GPU.

Usage: .venv/bin/python benchmarks/bench_families.py [--families flux,sd3,wan,qwen_image] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_root import import_comfy, import_pack  # noqa: E402

PROMPT = "a photo of <audio>, 4k, high resolution"
DEFAULT_FAMILIES = "flux,sd3,wan,qwen_image,z_image,hunyuan_video"


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _latents(model, batch: int, size: int) -> torch.Tensor:
    """Random model-space latents of the model's own layout ([B, C, h, w] or [B, C, 1, h, w])."""
    fmt = model.model.latent_format
    shape = [batch, fmt.latent_channels] + [1] * (getattr(fmt, "latent_dimensions", 2) - 2) + [size, size]
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def bench_family(family: str, encoder, audio, repeats: int, batch: int, steps: int, tmp: Path) -> dict:
    from audiotoken.audiotoken_core.audio import prepare_waveform
    from audiotoken.audiotoken_core.training.config import TrainConfig
    from audiotoken.audiotoken_core.training.trainer import Trainer, new_audiotoken
    from audiotoken.nodes.audiotoken_nodes import AudioTokenEncode
    from audiotoken.nodes.comfy_backend import ComfyBackend
    from audiotoken.nodes.runtime import LoadedAudioToken
    from audiotoken.nodes.splice import clip_widths, splice_tokens
    from tools.placeholder_dit import tiny_model
    from tools.tiny_text_encoders import tiny_clip

    out: dict = {}
    clip = tiny_clip(family)
    widths = clip_widths(clip)
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    pooled = cond[0][1].get("pooled_output")
    model = tiny_model(family, int(cond[0][0].shape[-1]), None if pooled is None else int(pooled.shape[-1]))

    token = new_audiotoken(widths, encoder.encoder.spec, seed=0).eval()
    loaded = LoadedAudioToken(token=token, encoder=encoder, name="random")
    window = dict(start_seconds=0.0, window_seconds=10.0, channels="mix", loop_short_audio=True)
    with torch.inference_mode():
        node = _median(lambda: AudioTokenEncode.execute(clip, audio, loaded, PROMPT, "<audio>", **window), repeats)
        wave16 = prepare_waveform(audio["waveform"], audio["sample_rate"], window_seconds=10.0)
        features = encoder.encoder(wave16)
        vectors = token.embed(features).vectors
        tokens = splice_tokens(clip, PROMPT, "<audio>", {k: v[0] for k, v in vectors.items()})
        bare_enc = _median(lambda: encoder.encoder(wave16), repeats)
        bare_emb = _median(lambda: token.embed(features), repeats)
        bare_text = _median(lambda: clip.encode_from_tokens_scheduled(tokens), repeats)
    bare = bare_enc + bare_emb + bare_text
    out.update(widths=widths, node_warm_s=node, bare_text_encoder_s=bare_text, bare_sum_s=bare,
               node_over_bare=node / bare)

    latents = _latents(model, batch, 8)
    features = features.expand(batch, -1, -1).contiguous()
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    with ComfyBackend(model, clip, None) as backend:
        out["prediction"] = backend.prediction
        train_token = new_audiotoken(backend.widths, encoder.encoder.spec, seed=0)

        def text_fwd_bwd():
            vecs = {k: torch.randn(batch, w, requires_grad=True) for k, w in backend.widths.items()}
            c = backend.encode_prompt("a photo of <audio>", "<audio>", vecs)
            sum(x[0].float().sum() for x in c).backward()

        with torch.no_grad():
            cond0 = backend.encode_prompt("a photo of <audio>", "<audio>",
                                          {k: e(features) for k, e in train_token.embedders.items()})

        def model_fwd_bwd():
            c = [[x[0].detach().clone().requires_grad_(True), dict(x[1])] for x in cond0]
            backend.diffusion_loss(latents, c, t, noise).mean().backward()

        def embedder_fwd_bwd_and_step():
            optimizer = torch.optim.AdamW(train_token.parameters())
            train_token.train()
            sum(y.float().sum() for y in train_token(features).values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out["embedder_fwd_bwd_step_s"] = _median(embedder_fwd_bwd_and_step, repeats)
        out["text_fwd_bwd_s"] = _median(text_fwd_bwd, repeats)
        out["model_fwd_bwd_s"] = _median(model_fwd_bwd, repeats)
        out["floor_s"] = out["text_fwd_bwd_s"] + out["model_fwd_bwd_s"]

        batches = ({"features": features, "latents": latents, "label": ["dog"] * batch} for _ in range(steps + 2))
        config = TrainConfig(steps=steps + 1, batch_size=batch, save_every=10**6, log_every=10**6)
        trainer = Trainer(config, backend, train_token, None, batches, tmp / family)
        stamps: list[float] = []
        trainer.run(progress=lambda step, info: stamps.append(time.perf_counter()))
        step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))  # the first step warms up
        out.update(trainer_step_s=step, step_over_floor=step / out["floor_s"],
                   step_over_floor_plus_embedder=step / (out["floor_s"] + out["embedder_fwd_bwd_step_s"]))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=DEFAULT_FAMILIES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="trainer steps timed (after one warm-up step)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import_comfy(cpu=not torch.cuda.is_available())
    import_pack()
    from audiotoken.audiotoken_core.audio_io import load_audio_file
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.nodes.runtime import LoadedEncoder
    from tools.placeholder_beats import write_placeholder_beats

    tmp = Path(tempfile.mkdtemp(prefix="audiotoken_bench_families_"))
    encoder = LoadedEncoder(encoder=load_audio_encoder(write_placeholder_beats(tmp / "beats.pt", seed=0)),
                            name="beats.pt")
    wave, sr = load_audio_file(REPO_ROOT / "assets" / "audio" / "dog.mp3")
    audio = {"waveform": wave.unsqueeze(0), "sample_rate": sr}

    results: dict = {"machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                                f"cuda={torch.cuda.is_available()}", "families": {}}
    for family in args.families.split(","):
        t0 = time.perf_counter()
        results["families"][family] = fam = bench_family(family, encoder, audio, args.repeats, args.batch,
                                                         args.steps, tmp)
        print(f"[{family}] {time.perf_counter() - t0:.0f} s: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in fam.items()), flush=True)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
