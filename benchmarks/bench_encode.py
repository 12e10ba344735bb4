"""Benchmark the AudioToken encode node against its floors and against generation.

One run on one machine prints (and writes JSON next to the figures in docs/benchmarks.md):
  1. our AudioTokenEncode node, cold (first call) and warm (median of repeats);
  2. the bare sum of its three model forwards (audio encoder, Embedder, CLIP) on the same input;
  3. core CLIPTextEncode on the same CLIP;
  4. a 20-step KSampler on a random SD1.5-sized checkpoint (real UNet/CLIP/VAE sizes);
  5. a re-queued graph with unchanged audio on a real ComfyUI server (cache hit).
BEATs-sized random encoder (12 x 768, 90M parameters), 10 s of audio. Goals:
warm node <= 1.1 x bare forwards; re-queue ~0; audio conditioning <= 5 % of a 20-step generation.

Usage: .venv/bin/python benchmarks/bench_encode.py [--size 256] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
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


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, median of `repeats` later calls, last result)."""
    t0 = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return cold, statistics.median(times), result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size for the KSampler run (512 on a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args(argv)

    import_comfy(cpu=not torch.cuda.is_available())
    import comfy.sd
    import nodes as comfy_nodes

    import_pack()
    from audiotoken.audiotoken_core.audio import prepare_waveform
    from audiotoken.audiotoken_core.audio_io import load_audio_file
    from audiotoken.audiotoken_core.embedder import Embedder, EmbedderConfig
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.token_file import AudioToken
    from audiotoken.nodes.audiotoken_nodes import AudioTokenEncode
    from audiotoken.nodes.runtime import LoadedAudioToken, LoadedEncoder
    from audiotoken.nodes.splice import splice_tokens
    from tools.placeholder_beats import write_placeholder_beats
    from tools.placeholder_sd import write_placeholder_sd15

    tmp = Path(tempfile.mkdtemp(prefix="audiotoken_bench_"))
    t0 = time.perf_counter()
    ckpt = write_placeholder_sd15(tmp / "sd15_full.safetensors", unet="full")
    beats_path = write_placeholder_beats(tmp / "beats.pt", seed=0)
    print(f"[bench] generated SD1.5-sized checkpoint and BEATs-sized encoder in {time.perf_counter() - t0:.1f} s")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]

    encoder = LoadedEncoder(encoder=load_audio_encoder(beats_path), name="beats.pt")
    torch.manual_seed(0)
    token = LoadedAudioToken(token=AudioToken(embedders={"l": Embedder(EmbedderConfig(2304, 768))}),
                             encoder=encoder, name="random")
    wave, sr = load_audio_file(REPO_ROOT / "assets" / "audio" / "dog.mp3")
    audio = {"waveform": wave.unsqueeze(0), "sample_rate": sr}
    window = dict(start_seconds=0.0, window_seconds=10.0, channels="mix", loop_short_audio=True)

    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                                f"torch {torch.__version__}, cuda={torch.cuda.is_available()}"}
    with torch.inference_mode():
        node_cold, node_warm, _ = _timed(
            lambda: AudioTokenEncode.execute(clip, audio, token, PROMPT, "<audio>", **window), args.repeats)

        wave16 = prepare_waveform(audio["waveform"], sr, window_seconds=10.0)
        features = encoder.encoder(wave16)
        vectors = token.token.embed(features).vectors
        tokens = splice_tokens(clip, PROMPT, "<audio>", {k: v[0] for k, v in vectors.items()})
        _, enc_t, _ = _timed(lambda: encoder.encoder(wave16), args.repeats)
        _, emb_t, _ = _timed(lambda: token.token.embed(features), args.repeats)
        _, clip_t, _ = _timed(lambda: clip.encode_from_tokens_scheduled(tokens), args.repeats)
        _, core_t, _ = _timed(lambda: comfy_nodes.CLIPTextEncode().encode(clip, PROMPT.replace("<audio>", "dog")),
                              args.repeats)
        positive = AudioTokenEncode.execute(clip, audio, token, PROMPT, "<audio>", **window).args[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
        t0 = time.perf_counter()
        comfy_nodes.common_ksampler(model, 0, args.steps, 7.5, "euler", "normal", positive, negative, latent)
        ksampler_t = time.perf_counter() - t0

    bare = enc_t + emb_t + clip_t
    results.update({
        "node_cold_s": node_cold, "node_warm_s": node_warm,
        "bare_encoder_s": enc_t, "bare_embedder_s": emb_t, "bare_clip_s": clip_t, "bare_sum_s": bare,
        "node_over_bare": node_warm / bare,
        "core_clip_text_encode_s": core_t,
        f"ksampler_{args.steps}_steps_{args.size}px_s": ksampler_t,
        "audio_conditioning_share_of_generation": node_warm / (ksampler_t + node_warm),
    })
    if not args.skip_server:
        results.update(_requeue_cost(tmp))
    for k, v in results.items():
        print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def _requeue_cost(tmp: Path) -> dict:
    """Queue the same graph twice on a real server; the second run should be all cache hits."""
    from tools.comfy_server import ComfyServer
    from tools.placeholder_sd import write_placeholder_sd15

    import shutil

    from audiotoken_core.embedder import Embedder, EmbedderConfig
    from audiotoken_core.token_file import AudioToken, save_audiotoken

    server = ComfyServer(tmp / "server", test_nodes=False)
    try:
        m = server.base / "models"
        write_placeholder_sd15(m / "checkpoints" / "sd15.safetensors")
        shutil.copy(tmp / "beats.pt", m / "audio_encoders" / "beats.pt")
        save_audiotoken(m / "audiotoken" / "tok.safetensors",
                        AudioToken(embedders={"l": Embedder(EmbedderConfig(2304, 768))}))
        shutil.copy(REPO_ROOT / "assets" / "audio" / "dog.mp3", server.base / "input" / "dog.mp3")
        server.wait_ready()
        graph = {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
            "audio": {"class_type": "LoadAudio", "inputs": {"audio": "dog.mp3"}},
            "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": "beats.pt", "layers": "auto"}},
            "tok": {"class_type": "AudioTokenLoader", "inputs": {"audiotoken_name": "tok.safetensors",
                                                                 "audio_encoder": ["enc", 0], "pooling": "deterministic"}},
            "encode": {"class_type": "AudioTokenEncode",
                       "inputs": {"clip": ["ckpt", 1], "audio": ["audio", 0], "audiotoken": ["tok", 0], "text": PROMPT,
                                  "placeholder": "<audio>", "start_seconds": 0.0, "window_seconds": 10.0,
                                  "channels": "mix", "loop_short_audio": True}},
            "save": {"class_type": "AudioTokenSaveEmbedding",
                     "inputs": {"audio_embedding": ["encode", 1], "filename_prefix": "bench/emb"}},
        }
        out = {}
        for label in ("server_first_run_s", "server_requeue_s"):
            if label == "server_requeue_s":
                graph["save"]["inputs"]["filename_prefix"] = "bench/emb"  # identical graph
            entry = server.run(graph, timeout=1800)
            stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
            out[label] = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
            if label == "server_requeue_s":
                cached = [d for k, d in entry["status"]["messages"] if k == "execution_cached"][0]["nodes"]
                out["server_requeue_cached_nodes"] = sorted(cached)
        return out
    finally:
        server.stop()


if __name__ == "__main__":
    main()
