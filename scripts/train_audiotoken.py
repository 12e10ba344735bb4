"""Headless AudioToken training: any model ComfyUI loads, through ComfyUI's own model code, one or many GPUs.

    python scripts/train_audiotoken.py --comfyui ~/ComfyUI --checkpoint sd15.safetensors --encoder BEATs.pt \
        --data /data/pairs --out runs/dog --steps 30000 --batch-size 8
    python scripts/train_audiotoken.py ... --diffusion-model flux1-dev.safetensors --clip-type flux \
        --text-encoder clip_l.safetensors --text-encoder t5xxl_fp16.safetensors --vae ae.safetensors --guidance 3.5
    torchrun --nproc-per-node 4 scripts/train_audiotoken.py ...      # data parallel (NCCL on GPUs, gloo on CPU)

Models: --checkpoint (an all-in-one file, as CheckpointLoaderSimple loads it), or separate
files as the core loader nodes take them: --diffusion-model (UNETLoader), --text-encoder once
per file with --clip-type (CLIPLoader / DualCLIPLoader / TripleCLIPLoader's type) and --vae
(VAELoader). --objective text_match (NOT the paper's objective: the text encoder's output for
the prompt with the sound's label; no images, no VAE) trains alone or, with
--warm-start-steps, before the paper's diffusion objective.

ComfyUI (its model code loads the models) is the folder given by --comfyui or the
environment variable COMFYUI_ROOT. The loop is audiotoken_core's Trainer, the same one the
ComfyUI training node runs; under torchrun each rank trains on its slice of every global
batch (DistributedDataParallel), the learning rate scales with the number of processes,
and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from comfyui_import import add_comfyui_argument, import_comfyui  # noqa: E402  (scripts/, beside this file)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comfyui_argument(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="all-in-one checkpoint (model, text encoders, VAE), e.g. SD1.x/SD2.x/SDXL/SD3.5 .safetensors")
    p.add_argument("--diffusion-model", type=Path, default=None,
                   help="diffusion model alone, as UNETLoader loads it (Flux, SD3, Wan, Qwen-Image...); "
                        "with --text-encoder, --clip-type and --vae")
    p.add_argument("--text-encoder", type=Path, action="append", default=[],
                   help="text-encoder file for --diffusion-model; repeat for each (e.g. clip_l and t5xxl for Flux)")
    p.add_argument("--clip-type", default=None,
                   help="how ComfyUI builds the text encoders, as CLIPLoader's type: flux, sd3, wan, qwen_image, "
                        "hidream, hunyuan_video, lumina2, chroma, ...")
    p.add_argument("--vae", type=Path, default=None,
                   help="VAE file (VAELoader); needed with --diffusion-model unless --objective text_match; "
                        "with --checkpoint it replaces the checkpoint's VAE")
    p.add_argument("--encoder", required=True, type=Path, help="BEATs checkpoint or transformers audio-model folder")
    p.add_argument("--layers", default=None, help="encoder layers, e.g. 4,8,12 (default: the encoder's)")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (pairs or videos) or VGGSound CSV")
    p.add_argument("--kind", choices=["pairs", "videos", "vggsound"], default="pairs")
    p.add_argument("--media-root", type=Path, default=None, help="for --kind vggsound: where the clips are")
    p.add_argument("--labels-csv", type=Path, default=None, help="for --kind pairs: file,label CSV")
    p.add_argument("--frame", choices=["middle", "random", "clip"], default=None,
                   help="video frame inside the audio window (default: middle, or clip with --clip-scorer)")
    p.add_argument("--clip-scorer", type=Path, default=None,
                   help="local transformers CLIP folder: pick the frame with the best CLIP score against the label")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoints and the final token)")
    p.add_argument("--name", default="audiotoken")
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5, help="base lr, scaled by batch x accumulation x processes")
    p.add_argument("--no-scale-lr", action="store_true")
    p.add_argument("--lambda-l1", type=float, default=0.01)
    p.add_argument("--lambda-cl", type=float, default=0.0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--image-size", default="512x320", help="WxH of the training frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--cache-dir", type=Path, default=None, help="cache encoder features and latents here")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the diffusion model's activations (less memory)")
    p.add_argument("--text-encoder-checkpointing", action="store_true",
                   help="recompute the text encoder's activations (less memory; for T5-XXL / LLM text encoders)")
    p.add_argument("--objective", default="diffusion",
                   help="diffusion (the paper's denoising loss, default) or text_match (NOT the paper's: match the "
                        "text encoder's output for the prompt with the sound's label; needs labels, no images/VAE)")
    p.add_argument("--warm-start-steps", type=int, default=0,
                   help="with --objective diffusion: the first N steps use text_match (0 = off)")
    p.add_argument("--guidance", type=float, default=None,
                   help="distilled guidance for models with a guidance input (Flux.1-dev: 3.5); default: the model's")
    p.add_argument("--pooling-dropout", type=float, default=0.5, help="dropout in the attentive pooling (reference: 0.5)")
    p.add_argument("--result-json", type=Path, default=None,
                   help="write this rank's result (status, step, weight digest) here; '{rank}' is replaced")
    args = p.parse_args(argv)
    problem = loader_problem(args)
    if problem:
        p.error(problem)
    return args


def loader_problem(args: argparse.Namespace) -> str | None:
    """What is inconsistent about the model files given, or None (checked before anything loads)."""
    separate = [flag for flag, value in (("--text-encoder", args.text_encoder), ("--clip-type", args.clip_type))
                if value]
    if args.checkpoint is None and args.diffusion_model is None:
        return ("name the model: --checkpoint FILE (an all-in-one checkpoint), or --diffusion-model FILE with "
                "--text-encoder FILE (repeat per file), --clip-type TYPE and --vae FILE")
    if args.checkpoint is not None and args.diffusion_model is not None:
        return "--checkpoint and --diffusion-model both name the diffusion model: give one of them"
    if args.checkpoint is not None and separate:
        return (f"{' and '.join(separate)} go with --diffusion-model; a --checkpoint brings its own text encoders "
                "(for a checkpoint without them, load its model with --diffusion-model)")
    if args.diffusion_model is not None:
        if not args.text_encoder:
            return "--diffusion-model needs its text encoder(s): add --text-encoder FILE for each file"
        if not args.clip_type:
            return ("--diffusion-model needs --clip-type: how ComfyUI builds these text encoders "
                    "(flux, sd3, wan, qwen_image, hidream, ...)")
        if len(args.text_encoder) > 4:
            return f"{len(args.text_encoder)} --text-encoder files: ComfyUI's loaders take 1 to 4"
        if args.vae is None and args.objective != "text_match":
            return ("--diffusion-model needs --vae: the diffusion objective encodes the training images "
                    "(or train with --objective text_match, which uses no images)")
    for flag, path in (("--checkpoint", args.checkpoint), ("--diffusion-model", args.diffusion_model),
                       ("--vae", args.vae), *(("--text-encoder", t) for t in args.text_encoder)):
        if path is not None and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    return None


def _init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _items(args):
    from audiotoken.audiotoken_core.data import (load_clip_scorer, pairs_from_folder, pairs_from_videos,
                                                 pairs_from_vggsound_csv)

    if args.kind == "pairs":
        return pairs_from_folder(args.data, labels_csv=args.labels_csv)
    scorer = load_clip_scorer(args.clip_scorer) if args.clip_scorer else None
    if args.kind == "videos":
        return pairs_from_videos(args.data, frame=args.frame, clip_scorer=scorer)
    return pairs_from_vggsound_csv(args.data, args.media_root or args.data.parent, frame=args.frame, clip_scorer=scorer)


def clip_type(name: str):
    """ComfyUI's CLIPType for a --clip-type name (CLIPLoader's spelling: lower case)."""
    import comfy.sd

    types = {t.name.lower(): t for t in comfy.sd.CLIPType}
    if name.lower() not in types:
        raise SystemExit(f"--clip-type {name!r} is not one this ComfyUI knows; use one of: {', '.join(sorted(types))}")
    return types[name.lower()]


def load_models(args):
    """(MODEL, CLIP, VAE or None) with ComfyUI's own loader functions, as its loader nodes call them."""
    import comfy.sd
    import comfy.utils

    def load_vae(path):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
        vae.throw_exception_if_invalid()
        return vae

    if args.checkpoint is not None:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        if clip is None:
            raise SystemExit(f"{args.checkpoint} holds no text encoders: load its model with --diffusion-model and "
                             "give --text-encoder and --clip-type")
        return model, clip, load_vae(args.vae) if args.vae is not None else vae
    kind = clip_type(args.clip_type)
    model = comfy.sd.load_diffusion_model(str(args.diffusion_model))
    clip = comfy.sd.load_clip(ckpt_paths=[str(p) for p in args.text_encoder], clip_type=kind)
    return model, clip, load_vae(args.vae) if args.vae is not None else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = _init_distributed()
    import_comfyui(args.comfyui, cpu=device.type == "cpu")

    from audiotoken.audiotoken_core.data import build_train_batches, module_fingerprint
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.token_file import weights_digest
    from audiotoken.audiotoken_core.training import TrainConfig, Trainer, new_audiotoken
    from audiotoken.nodes.comfy_backend import ComfyBackend
    from audiotoken.nodes.train_nodes import latent_encoder

    try:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, base_lr=args.lr,
                             scale_lr=not args.no_scale_lr, lambda_l1=args.lambda_l1, lambda_cl=args.lambda_cl,
                             precision=args.precision, seed=args.seed, save_every=args.save_every, name=args.name,
                             objective=args.objective, warm_start_steps=args.warm_start_steps)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    encoder = load_audio_encoder(args.encoder, layers=layers).to(device)
    model, clip, vae = load_models(args)
    if config.needs_images and vae is None:
        raise SystemExit(f"{args.checkpoint or args.diffusion_model} comes without a VAE: the diffusion objective "
                         "encodes the training images; add --vae FILE (or use --objective text_match)")
    items = _items(args)
    if rank == 0 and items.problems:
        print(f"[train] skipped {len(items.problems)} files, e.g. {items.problems[:3]}")
    with ComfyBackend(model, clip, vae, gradient_checkpointing=args.gradient_checkpointing,
                      text_encoder_checkpointing=args.text_encoder_checkpointing, guidance=args.guidance) as backend:
        encode_images, image_settings = latent_encoder(backend, vae, model, config)
        batches = build_train_batches(
            items, batch_size=args.batch_size, seed=args.seed, image_size=(width, height),
            encode_audio=lambda w: encoder(w.to(device)).float().cpu(),
            encode_images=encode_images,
            cache_dir=args.cache_dir,
            cache_settings={"encoder": str(args.encoder), "spec": encoder.spec.to_dict(),
                            "encoder_weights": module_fingerprint(encoder), **image_settings},
            rank=rank, world_size=world, num_workers=args.workers)
        token = new_audiotoken(backend.widths, encoder.spec, seed=args.seed, description=f"trained on {args.data}",
                               pooling_dropout=args.pooling_dropout)
        trainer = Trainer(config, backend, token, encoder, batches, args.out, device=device)
        if args.resume:
            trainer.resume(args.out)

        def progress(step: int, info: dict) -> None:
            if rank == 0 and (step % max(1, config.log_every) == 0 or step == config.steps):
                phase = config.objective_at(step - 1)
                print(f"[train] step {step}/{config.steps} loss {info['loss']:.5f} ({phase} "
                      f"{info[phase]:.5f}) lr {info['lr']:.2e}", flush=True)

        summary = trainer.run(progress=progress)
    result = {"status": summary.status, "step": summary.step, "final": summary.final, "rank": rank, "world_size": world,
              "last_loss": summary.last_loss, "weights_sha256": weights_digest(token)}
    if rank == 0:
        print(json.dumps(result))
    if args.result_json is not None:
        Path(str(args.result_json).replace("{rank}", str(rank))).write_text(json.dumps(result))
    if world > 1:
        torch.distributed.barrier()  # every rank is done with gloo/NCCL before any tears it down
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
