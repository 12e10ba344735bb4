"""Benchmark an AudioToken training step, split into its parts, with and without caches.

Parts (each timed alone, medians): data loading (decode + resample + image) vs cached
(features + latents from disk), audio encoder forward, VAE encode, CLIP forward+backward
(through the spliced vector), UNet forward+backward (denoising loss). Then whole trainer
steps with caches; the floor is UNet + CLIP forward+backward. Goal: step / floor
<= 1.15 with caches. Peak memory: CPU max RSS, GPU max allocated.

CPU (default): full SD1.5-sized random UNet/CLIP/VAE at a small frame size.
GPU: .venv/bin/python benchmarks/bench_train.py --size 512x320 --batch 8 --precision bf16 --gradient-checkpointing
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
sys.path.insert(0, str(REPO_ROOT / "tests"))

from tools.comfy_root import import_comfy, import_pack  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256x160", help="WxH of the training frames")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--unet", choices=["full", "tiny"], default="full")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    gpu = torch.cuda.is_available()

    import_comfy(cpu=not gpu)
    import_pack()
    import comfy.sd

    from audio_files import write_tone
    from PIL import Image

    from audiotoken.audiotoken_core.data import build_train_batches, pairs_from_folder
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.training.config import TrainConfig
    from audiotoken.audiotoken_core.training.trainer import Trainer, new_audiotoken
    from audiotoken.nodes.comfy_backend import ComfyBackend
    from tools.placeholder_beats import write_placeholder_beats
    from tools.placeholder_sd import write_placeholder_sd15

    tmp = Path(tempfile.mkdtemp(prefix="audiotoken_bench_train_"))
    ckpt = write_placeholder_sd15(tmp / "sd15.safetensors", unet=args.unet)
    beats_path = write_placeholder_beats(tmp / "beats.pt", seed=0)
    data = tmp / "data"
    for i in range(max(8, 2 * args.batch)):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        write_tone(data / f"c{i % 2}" / f"x{i}.wav", 200 + 150 * i, seconds=10.0, rate=44100)
        Image.new("RGB", (width * 2, height * 2), (20 * i, 100, 200 - 10 * i)).save(data / f"c{i % 2}" / f"x{i}.png")
    items = pairs_from_folder(data)

    device = torch.device("cuda") if gpu else torch.device("cpu")
    encoder = load_audio_encoder(beats_path).to(device)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    out: dict = {"machine": f"{torch.cuda.get_device_name() if gpu else 'CPU'}, {torch.get_num_threads()} threads, "
                            f"torch {torch.__version__}", "size": args.size, "batch": args.batch, "unet": args.unet,
                 "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing}
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    with ComfyBackend(model, clip, vae, gradient_checkpointing=args.gradient_checkpointing) as backend:
        encode_audio = lambda w: encoder(w.to(device)).float().cpu()  # noqa: E731
        encode_images = lambda x: backend.encode_images(x).float().cpu()  # noqa: E731
        raw = build_train_batches(items, batch_size=args.batch, image_size=(width, height))
        cached = build_train_batches(items, batch_size=args.batch, image_size=(width, height), encode_audio=encode_audio,
                                     encode_images=encode_images, cache_dir=tmp / "cache", cache_settings={"b": 1})
        raw_batch, cached_batch = next(iter(raw)), next(iter(cached))
        out["data_loading_s"] = _median_time(lambda: next(iter(raw)), args.repeats)
        out["data_loading_cached_s"] = _median_time(lambda: next(iter(cached)), args.repeats)
        with torch.no_grad():
            out["audio_encoder_s"] = _median_time(lambda: encoder(raw_batch["wave16"].to(device)), args.repeats)
            out["vae_encode_s"] = _median_time(lambda: backend.encode_images(raw_batch["images"]), args.repeats)

        token = new_audiotoken(backend.widths, encoder.spec, seed=0).to(device)
        features = cached_batch["features"].to(device)
        latents = cached_batch["latents"].to(device)
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(latents)

        def clip_fwd_bwd():
            vectors = {k: torch.randn(args.batch, w, device=device, requires_grad=True) for k, w in backend.widths.items()}
            with autocast():
                cond = backend.encode_prompt("a photo of <audio>", "<audio>", vectors)
            sum(c[0].float().sum() for c in cond).backward()

        with torch.no_grad(), autocast():
            vectors = {k: e(features) for k, e in token.embedders.items()}
            cond0 = backend.encode_prompt("a photo of <audio>", "<audio>", vectors)

        def unet_fwd_bwd():
            cond = [[c[0].detach().clone().requires_grad_(True), dict(c[1])] for c in cond0]
            with autocast():
                loss = backend.diffusion_loss(latents, cond, t, noise).mean()
            loss.backward()

        def embedder_fwd_bwd():
            for e in token.embedders.values():
                e.train()
                with autocast():
                    y = e(features)
                y.float().sum().backward()

        if gpu:
            torch.cuda.reset_peak_memory_stats()
        out["embedder_fwd_bwd_s"] = _median_time(embedder_fwd_bwd, args.repeats)
        for e in token.embedders.values():
            e.zero_grad(set_to_none=True)
        out["clip_fwd_bwd_s"] = _median_time(clip_fwd_bwd, args.repeats)
        out["unet_fwd_bwd_s"] = _median_time(unet_fwd_bwd, args.repeats)
        out["floor_s"] = out["clip_fwd_bwd_s"] + out["unet_fwd_bwd_s"]

        config = TrainConfig(steps=args.steps + 1, batch_size=args.batch, precision=args.precision, save_every=10**6,
                             log_every=10**6)
        trainer = Trainer(config, backend, token, encoder, cached, tmp / "run", device=device)
        stamps = []
        trainer.run(progress=lambda step, info: (_sync(), stamps.append(time.perf_counter())))
        step_times = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step warms up
        out["trainer_step_cached_s"] = statistics.median(step_times)
        out["step_over_floor"] = out["trainer_step_cached_s"] / out["floor_s"]
        out["step_over_floor_plus_embedder"] = out["trainer_step_cached_s"] / (out["floor_s"] + out["embedder_fwd_bwd_s"])
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if gpu:
        out["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["steps_per_s"] = 1.0 / out["trainer_step_cached_s"]
    for k, v in out.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
