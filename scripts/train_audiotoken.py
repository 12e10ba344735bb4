"""Headless AudioToken training: any SD checkpoint through ComfyUI's own model code, one or many GPUs.

    python scripts/train_audiotoken.py --comfyui ~/ComfyUI --checkpoint sd15.safetensors --encoder BEATs.pt \
        --data /data/pairs --out runs/dog --steps 30000 --batch-size 8
    torchrun --nproc-per-node 4 scripts/train_audiotoken.py ...      # data parallel (NCCL on GPUs, gloo on CPU)

ComfyUI (its model code loads the checkpoint) is the folder given by --comfyui or the
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
    p.add_argument("--checkpoint", required=True, type=Path, help="SD1.x/SD2.x/SDXL checkpoint (.safetensors)")
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
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations (less memory)")
    p.add_argument("--pooling-dropout", type=float, default=0.5, help="dropout in the attentive pooling (reference: 0.5)")
    p.add_argument("--result-json", type=Path, default=None,
                   help="write this rank's result (status, step, weight digest) here; '{rank}' is replaced")
    return p.parse_args(argv)


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = _init_distributed()
    import_comfyui(args.comfyui, cpu=device.type == "cpu")
    import comfy.sd

    from audiotoken.audiotoken_core.data import build_train_batches, module_fingerprint
    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.token_file import weights_digest
    from audiotoken.audiotoken_core.training import TrainConfig, Trainer, new_audiotoken
    from audiotoken.nodes.comfy_backend import ComfyBackend

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    encoder = load_audio_encoder(args.encoder, layers=layers).to(device)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)[:3]
    items = _items(args)
    if rank == 0 and items.problems:
        print(f"[train] skipped {len(items.problems)} files, e.g. {items.problems[:3]}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, base_lr=args.lr,
                         scale_lr=not args.no_scale_lr, lambda_l1=args.lambda_l1, lambda_cl=args.lambda_cl,
                         precision=args.precision, seed=args.seed, save_every=args.save_every, name=args.name)
    with ComfyBackend(model, clip, vae, gradient_checkpointing=args.gradient_checkpointing) as backend:
        batches = build_train_batches(
            items, batch_size=args.batch_size, seed=args.seed, image_size=(width, height),
            encode_audio=lambda w: encoder(w.to(device)).float().cpu(),
            encode_images=lambda x: backend.encode_images(x).float().cpu(),
            cache_dir=args.cache_dir,
            cache_settings={"encoder": str(args.encoder), "spec": encoder.spec.to_dict(),
                            "encoder_weights": module_fingerprint(encoder),
                            "vae_weights": module_fingerprint(vae.first_stage_model)},
            rank=rank, world_size=world, num_workers=args.workers)
        token = new_audiotoken(backend.widths, encoder.spec, seed=args.seed, description=f"trained on {args.data}",
                               pooling_dropout=args.pooling_dropout)
        trainer = Trainer(config, backend, token, encoder, batches, args.out, device=device)
        if args.resume:
            trainer.resume(args.out)

        def progress(step: int, info: dict) -> None:
            if rank == 0 and (step % max(1, config.log_every) == 0 or step == config.steps):
                print(f"[train] step {step}/{config.steps} loss {info['loss']:.5f} lr {info['lr']:.2e}", flush=True)

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
