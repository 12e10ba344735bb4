"""Training in ComfyUI: a dataset node and a training node around audiotoken_core's Trainer."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io
from safetensors import safe_open

from ..audiotoken_core.data import (AudioImageDataset, PairList, build_train_batches, load_clip_scorer, module_fingerprint,
                                   pairs_from_folder, pairs_from_videos, pairs_from_vggsound_csv)
from ..audiotoken_core.io import atomic_write
from ..audiotoken_core.training import TrainConfig, Trainer, latest_checkpoint, new_audiotoken
from ..audiotoken_core.training.config import OBJECTIVES
from . import model_folders as mf
from .audiotoken_nodes import AUDIOTOKEN, CATEGORY, DEFAULT_PLACEHOLDER, ENCODER, schema
from .comfy_backend import ComfyBackend
from .loss_plot import loss_curve_image
from .runtime import LoadedAudioToken, LoadedEncoder

DATASET = io.Custom("AUDIOTOKEN_DATASET")
DATASET_SUBFOLDER = "audiotoken_datasets"
DATASET_KINDS = ["audio + image pairs", "videos", "vggsound csv"]
FRAME_CHOICES = ["middle", "random", "best CLIP score"]
NO_SCORER = "none"
PRECISIONS = ["fp32", "bf16", "fp16"]
PROGRESS_EVENT = "audiotoken.train_progress"
FLUX_GUIDANCE = 3.5  # what ComfyUI's Flux.1-dev conditioning uses (FluxGuidance's default)


@dataclass
class TrainingData:
    """What flows on an AUDIOTOKEN_DATASET socket."""

    items: PairList
    name: str
    image_size: tuple[int, int]


def _clip_scorer_folders() -> list[str]:
    """transformers CLIP folders in models/clip_vision, for CLIP-score frame picking."""
    return [NO_SCORER, *mf.transformers_folders("clip_vision")]


def _dataset_root() -> str:
    return os.path.join(folder_paths.get_input_directory(), DATASET_SUBFOLDER)


def _dataset_folders() -> list[str]:
    return mf.input_subfolders(DATASET_SUBFOLDER)


class AudioTokenDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenDataset",
            display_name="AudioToken Training Data",
            category=CATEGORY,
            description=f"Collects training pairs from a folder in input/{DATASET_SUBFOLDER}: audio + image files matched by "
                        "name (labels from subfolders or labels.csv), videos (audio track + a frame inside the audio window), "
                        "or a VGGSound-style CSV. Bad files are skipped and listed, never fatal.",
            inputs=[
                io.Combo.Input("folder", options=_dataset_folders(),
                               tooltip=f"A folder inside input/{DATASET_SUBFOLDER}."),
                io.Combo.Input("kind", options=DATASET_KINDS, default=DATASET_KINDS[0],
                               tooltip="How the folder is laid out."),
                io.String.Input("csv_name", default="",
                                tooltip="For 'vggsound csv': the CSV file inside the folder (ytid,start,label,split). "
                                        "For pairs: an optional labels CSV (file,label). Empty = none."),
                io.Combo.Input("frame", options=FRAME_CHOICES, default="middle",
                               tooltip="For videos: the frame from the middle of the audio window, a random one inside it, "
                                       "or the one a CLIP model rates best against the label (the paper's choice)."),
                io.Combo.Input("clip_scorer", options=_clip_scorer_folders(), default=NO_SCORER,
                               tooltip="For 'best CLIP score': a transformers CLIP folder (config.json, safetensors, "
                                       "tokenizer and processor files) in models/clip_vision."),
                io.Int.Input("image_width", default=512, min=64, max=2048, step=8,
                             tooltip="Training image width (the reference uses 512 x 320)."),
                io.Int.Input("image_height", default=320, min=64, max=2048, step=8, tooltip="Training image height."),
                io.Boolean.Input("check_files", default=True,
                                 tooltip="Decode every example once now, so broken files are listed in the report before "
                                         "training (costs one pass over the data; turn off for very large sets)."),
            ],
            outputs=[DATASET.Output(display_name="dataset", tooltip="The training pairs."),
                     io.String.Output(display_name="report", tooltip="How many pairs were found and which files were skipped.")],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        if isinstance(folder, str) and folder not in _dataset_folders():
            return f"'{folder}' is not a folder in input/{DATASET_SUBFOLDER}; create it there and refresh."
        return True

    @classmethod
    def execute(cls, folder, kind, csv_name, frame, image_width, image_height, check_files=True,
                clip_scorer=NO_SCORER) -> io.NodeOutput:
        root = mf.listed_path(_dataset_root(), folder, "Dataset folder")
        scorer = None
        if frame == "best CLIP score":
            if clip_scorer == NO_SCORER:
                raise ValueError("frame 'best CLIP score' needs a clip_scorer: put a transformers CLIP folder in "
                                 "models/clip_vision and pick it, or choose frame 'middle'.")
            scorer = load_clip_scorer(mf.transformers_folder_path(clip_scorer, "clip_vision"))
        frame = "clip" if scorer is not None else frame
        csv_path = mf.listed_path(root, csv_name.strip(), "CSV file") if csv_name.strip() else None
        if kind == "audio + image pairs":
            items = pairs_from_folder(root, labels_csv=csv_path)
        elif kind == "videos":
            items = pairs_from_videos(root, frame=frame, clip_scorer=scorer)
        else:
            if csv_path is None:
                raise ValueError("'vggsound csv' needs csv_name: the CSV file inside the folder.")
            items = pairs_from_vggsound_csv(csv_path, root, frame=frame, clip_scorer=scorer)
        if check_files and items:
            checked = AudioImageDataset(items, image_size=(image_width, image_height))
            bad = checked.scan()
            items = PairList(checked.items, problems=[*items.problems, *bad])
        if not items:
            raise ValueError(f"No usable training pairs in {root} as '{kind}'. "
                             + (f"Skipped: {items.problems[:5]}" if items.problems else "Check the layout in the README."))
        report = f"{len(items)} pairs in '{folder}'"
        if items.problems:
            report += f"; {len(items.problems)} files skipped:\n" + "\n".join(
                f"  {p.file}: {p.reason}" for p in items.problems[:50])
        return io.NodeOutput(TrainingData(items=items, name=folder, image_size=(image_width, image_height)), report)


class AudioTokenTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenTrain",
            display_name="Train AudioToken",
            category=CATEGORY,
            description="Trains a new AudioToken (only the Embedder learns; the model, CLIP, VAE and audio encoder stay "
                        "frozen and unchanged) with the paper's loss: denoising + L1 (+ optional classification loss), "
                        "or with this pack's cheaper 'text_match' objective (not the paper's: the text encoder's output "
                        "for the prompt with the sound's label, no images or VAE needed), alone or as a warm start. "
                        "Writes models/audiotoken/<name>.safetensors when training completes, and checkpoints in "
                        "models/audiotoken/<name>_checkpoints that the loader lists and that resume continues. Cancel "
                        "keeps the last completed step as a checkpoint; queue the graph again to continue.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from your checkpoint or diffusion-model loader (SD1.x, SD2.x, "
                                                "SDXL, SD3.x, Flux.1, Wan 2.x, Qwen-Image...)."),
                io.Clip.Input("clip", tooltip="CLIP from the same checkpoint, or the text encoder(s) that model uses."),
                io.Vae.Input("vae", optional=True,
                             tooltip="VAE of that model (encodes the training images). Not needed with objective "
                                     "'text_match', which uses no images."),
                ENCODER.Input("audio_encoder", tooltip="The frozen audio encoder (BEATs by default)."),
                DATASET.Input("dataset", tooltip="From 'AudioToken Training Data'."),
                io.String.Input("name", default="my_audiotoken",
                                tooltip="File name of the trained AudioToken in models/audiotoken. Training again under "
                                        "the same name replaces the token this node made before (that is how you "
                                        "update it); a file it did not make (an imported or downloaded token) and a "
                                        "symlink are never overwritten."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000,
                             tooltip="Optimizer steps (the paper trains 30k-60k at batch 8)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1e-2, step=1e-6,
                               tooltip="Base learning rate; multiplied by batch x accumulation like the reference (1e-5 x 8 = 8e-5)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Examples per step."),
                io.Int.Input("grad_accum", default=1, min=1, max=256, tooltip="Micro-batches per optimizer step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Same seed, same data order, same weights."),
                io.Float.Input("lambda_l1", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the L1 penalty on the audio vector (paper: 0.01)."),
                io.Float.Input("lambda_cl", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the classification loss against the label's word embedding (paper: 0.01 when on)."),
                io.Int.Input("save_every", default=500, min=1, max=1_000_000,
                             tooltip="Checkpoint interval in steps (Cancel and the end of training also write one)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the latest checkpoint of this name when there is one (after a "
                                         "Cancel, or with more steps than before). Off: start over; the earlier "
                                         "checkpoints are kept in <name>_checkpoints_<time>."),
                io.Combo.Input("precision", options=PRECISIONS, default="fp32",
                               tooltip="fp32 (reference), or bf16/fp16 autocast with fp32 master weights for the Embedder."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute UNet activations in the backward pass: much less memory, about a third slower."),
                io.Boolean.Input("cache_features", default=True,
                                 tooltip=f"Run the audio encoder and the VAE once per file and keep their outputs in "
                                         f"models/{mf.FEATURE_CACHE_FOLDER}/<dataset> (kept across restarts; delete "
                                         f"the folder to free the space), so later epochs and runs skip them."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="diffusion", optional=True,
                               tooltip="diffusion: the paper's denoising loss on (audio, image) pairs. text_match: NOT the "
                                       "paper's; makes the text encoder's output for the prompt with the audio word "
                                       "equal its output with the sound's label written there. Needs labels but no "
                                       "images, VAE or diffusion model pass: fast, but it learns only what the label "
                                       "says. Good as a warm start, or to try a large model cheaply."),
                io.Int.Input("warm_start_steps", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="With objective 'diffusion': the first this many steps use 'text_match' (counted "
                                     "in 'steps'; resume continues in the right phase). 0 = off."),
                io.Float.Input("guidance", default=FLUX_GUIDANCE, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Distilled guidance given to models with a guidance input (Flux.1-dev: 3.5, as "
                                       "FluxGuidance); ignored by other models."),
                io.Boolean.Input("text_encoder_checkpointing", default=False, optional=True,
                                 tooltip="Recompute the text encoder's activations in the backward pass: much less "
                                         "memory for T5-XXL and LLM text encoders, a bit slower."),
            ],
            outputs=[AUDIOTOKEN.Output(display_name="audiotoken", tooltip="The trained AudioToken, ready for the encode node."),
                     io.Image.Output(display_name="loss_curve", tooltip="Loss per step.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name=None):
        if isinstance(name, str):
            try:
                _output_paths(name)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model, clip, audio_encoder: LoadedEncoder, dataset: TrainingData, name, steps, learning_rate,
                batch_size, grad_accum, seed, lambda_l1, lambda_cl, save_every, resume, precision,
                gradient_checkpointing, cache_features, vae=None, objective="diffusion", warm_start_steps=0,
                guidance=FLUX_GUIDANCE, text_encoder_checkpointing=False) -> io.NodeOutput:
        final, run_dir = _output_paths(name)
        name = os.path.basename(final)[: -len(".safetensors")]
        config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, base_lr=learning_rate, seed=seed,
                             lambda_l1=lambda_l1, lambda_cl=lambda_cl, save_every=save_every, precision=precision,
                             name=name, placeholder=DEFAULT_PLACEHOLDER, prompt=f"a photo of {DEFAULT_PLACEHOLDER}",
                             objective=objective, warm_start_steps=warm_start_steps)
        if config.needs_images and vae is None:
            raise ValueError("The diffusion objective encodes the training images with the VAE: connect the VAE of "
                             "this model, or set objective 'text_match' (which needs no images).")
        encoder = audio_encoder.encoder
        with ComfyBackend(model, clip, vae, gradient_checkpointing=gradient_checkpointing,
                          text_encoder_checkpointing=text_encoder_checkpointing, guidance=guidance) as backend:
            mm.load_models_gpu([audio_encoder.patcher])
            # The encoder runs where its patcher loads it (core's AUDIO_ENCODER: the text-encoder device, which
            # may be the CPU); the Embedder trains on ComfyUI's compute device.
            encoder_device, device = audio_encoder.patcher.load_device, mm.get_torch_device()
            encode_images, image_settings = latent_encoder(backend, vae, model, config)
            batches = build_train_batches(
                dataset.items, batch_size=batch_size, seed=seed, image_size=dataset.image_size,
                encode_audio=lambda w: encoder(w.to(encoder_device)).float().cpu(),
                encode_images=encode_images,
                cache_dir=feature_cache_dir(dataset.name) if cache_features else None,
                cache_settings={"encoder": audio_encoder.name, "spec": encoder.spec.to_dict(),
                                "encoder_weights": module_fingerprint(encoder), **image_settings})
            token = new_audiotoken(backend.widths, encoder.spec, seed=seed, placeholder=DEFAULT_PLACEHOLDER,
                                   description=f"trained on '{dataset.name}' ({len(dataset.items)} pairs)")
            trainer = Trainer(config, backend, token, encoder, batches, run_dir, device=device)
            if resume and latest_checkpoint(run_dir) is not None:
                trainer.resume(run_dir)
            elif not resume:
                set_aside_earlier_run(run_dir)
            pbar = comfy.utils.ProgressBar(steps)
            unique_id = cls.hidden.unique_id if cls.hidden is not None else None

            def progress(step: int, info: dict) -> None:
                _send_progress(unique_id, step, steps, info)  # first: the step is complete even if Cancel raises next
                pbar.update_absolute(step, steps)

            # Cancel raises InterruptProcessingException inside a step (from ComfyUI's ops) or in the progress
            # bar; the trainer then keeps the last completed step as a checkpoint and lets the exception through.
            summary = trainer.run(progress=progress, should_stop=mm.processing_interrupted)
        if summary.status != "completed":  # Cancel between two steps: the trainer stopped; show it as interrupted
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()
        atomic_write(final, lambda tmp: shutil.copyfile(summary.final, tmp))
        losses = [h["loss"] for h in summary.history]
        image = loss_curve_image(losses, title=f"{name}: {summary.step} steps")
        token.eval()
        return io.NodeOutput(LoadedAudioToken(token=token, encoder=audio_encoder, name=os.path.basename(final)), image)


def latent_encoder(backend, vae, model, config: TrainConfig):
    """(encode_images for the data pipeline, what its outputs depend on, for the feature cache's keys).

    A run that never uses the diffusion objective needs no latents: the VAE is not run, and the
    cache stores an empty latent per image (under settings of their own, so real latents of
    another run are never mixed in)."""
    if not config.needs_images:
        return (lambda images: images.new_zeros(images.shape[0], 0)), {"latents": "none (text_match)"}
    return (lambda images: backend.encode_images(images).float().cpu()), {
        "vae_weights": module_fingerprint(vae.first_stage_model),
        "latent_format": type(model.model.latent_format).__name__}


def set_aside_earlier_run(run_dir: str) -> str | None:
    """A fresh start (resume off) must not mix its checkpoints with an earlier run's, whose later steps a
    future resume would pick up: the earlier folder is renamed <folder>_<time>, kept, and its new path returned."""
    if latest_checkpoint(run_dir) is None:
        return None
    kept = f"{run_dir}_{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(run_dir, kept)
    return kept


def feature_cache_dir(dataset_name: str) -> str:
    """Where the encoder outputs of a dataset are cached: <first models/audiotoken_cache folder>/<dataset>."""
    return os.path.join(folder_paths.get_folder_paths(mf.FEATURE_CACHE_FOLDER)[0], dataset_name)


def _output_paths(name: str) -> tuple[str, str]:
    """(token file, checkpoint folder) for the training node's `name`, under the pack's write policy: the
    node replaces a token it trained before, never a file it did not make, never through a symlink."""
    final = mf.output_path(mf.AUDIOTOKEN_FOLDER, name.strip(), ".safetensors", overwrite=True)
    run_dir = final[: -len(".safetensors")] + "_checkpoints"
    if os.path.islink(run_dir) or os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is a symlink or a file; the training node writes its checkpoints only into a "
                         "folder of its own. Remove it or pick another name.")
    if os.path.exists(final) and not _trained_token(final):
        raise ValueError(f"{final} exists and was not made by the training node (an imported or downloaded "
                         "token?); it is kept. Pick another name, or move that file away first.")
    return final, run_dir


def _trained_token(path: str) -> bool:
    """Whether `path` is an AudioToken file the trainer wrote (it has the trainer's `training` metadata)."""
    try:
        with safe_open(path, "pt") as f:
            return "step" in json.loads((f.metadata() or {}).get("training") or "{}")
    except Exception:  # noqa: BLE001 - unreadable or not a token: not one of ours
        return False


def _send_progress(unique_id, step: int, steps: int, info: dict) -> None:
    """Loss points for the frontend's live chart (web/); harmless when no browser listens."""
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI's modules without its server (scripts)
        return
    if PromptServer.instance is not None:
        PromptServer.instance.send_sync(PROGRESS_EVENT, {"node": unique_id, "step": step, "steps": steps,
                                                         "loss": info.get("loss"), "diffusion": info.get("diffusion"),
                                                         "text_match": info.get("text_match")})


NODES = [AudioTokenDataset, AudioTokenTrain]
