"""The AudioToken nodes (ComfyUI V3 schema, `comfy_api.v0_0_2`)."""
from __future__ import annotations

import dataclasses
import json
import os

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..audiotoken_core.audio import REFERENCE_CLIP_SECONDS, TARGET_SAMPLE_RATE
from ..audiotoken_core.embedding import blend_embeddings, load_embedding, save_embedding
from ..audiotoken_core.encoders import load_audio_encoder
from ..audiotoken_core.token_file import import_reference_embedder, load_audiotoken, save_audiotoken
from . import model_folders as mf
from .runtime import LoadedAudioToken, LoadedEncoder
from .splice import check_placeholder, encode_with_vectors, require_prompt

CATEGORY = "audio/AudioToken"
ENCODER = io.Custom("AUDIOTOKEN_ENCODER")
AUDIOTOKEN = io.Custom("AUDIOTOKEN")
EMBEDDING = io.Custom("AUDIOTOKEN_EMBEDDING")
VIDEO_CATEGORY = f"{CATEGORY}/video"
TIMELINE = io.Custom("AUDIOTOKEN_TIMELINE")  # one audio vector per video frame (nodes/timeline_nodes.py)
DEFAULT_PROMPT = "a photo of <audio>"
DEFAULT_PLACEHOLDER = "<audio>"
CHANNEL_POLICIES = ["mix", "first"]
ENCODER_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
TOKEN_SUFFIXES = (".safetensors",)
REFERENCE_SUFFIXES = (".bin", ".pt", ".pth")
POOLING_MODES = ["deterministic", "reference (stochastic)"]
EMBEDDING_SUBFOLDER = "audiotoken_embeddings"


# The words each node is found by in the node search, for this module and for web/js/audiotoken_search.js (which
# adds them where the server cannot send them: ComfyUI 0.3.75's io.Schema has no search_aliases).
SEARCH_ALIASES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web",
                                   "search_aliases.json")
with open(SEARCH_ALIASES_FILE, encoding="utf-8") as _f:
    SEARCH_ALIASES: dict[str, list[str]] = json.load(_f)


def schema(**kwargs) -> io.Schema:
    """io.Schema with the node's search aliases from web/search_aliases.json, dropping fields an older ComfyUI lacks
    (search_aliases arrived after 0.3.75)."""
    if "search_aliases" in kwargs:
        raise ValueError(f"{kwargs.get('node_id')}: search aliases belong in web/search_aliases.json (the one list the "
                         "server and the frontend read); move them there and drop the search_aliases argument.")
    kwargs["search_aliases"] = SEARCH_ALIASES.get(kwargs["node_id"], [])
    fields = {f.name for f in dataclasses.fields(io.Schema)}
    return io.Schema(**{k: v for k, v in kwargs.items() if k in fields})


def _parse_layers(text: str) -> tuple[int, ...] | None:
    text = text.strip().lower()
    if text in ("", "auto", "default"):
        return None
    try:
        layers = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise ValueError(f"layers '{text}' is not a comma-separated list of layer numbers; write e.g. 4,8,12 or auto.")
    if not layers:
        raise ValueError("layers is empty; write e.g. 4,8,12 or auto.")
    return layers


def window_preview(wave16, start_seconds: float, window_seconds: float) -> dict:
    """UI output for the frontend (web/js/audiotoken.js): the exact window the token heard (`wave16`
    [B, T] from embed_audio; the first clip, 16 kHz mono, looped or padded), saved to temp/ as FLAC,
    so audio that is not a file still shows."""
    saved = ui.AudioSaveHelper.save_audio({"waveform": wave16[:1, None, :], "sample_rate": TARGET_SAMPLE_RATE},
                                          filename_prefix="audiotoken_window", folder_type=io.FolderType.temp,
                                          cls=None, format="flac")
    return {"audiotoken_window": [dict(r, start_seconds=float(start_seconds), window_seconds=float(window_seconds))
                                  for r in saved]}


def _channels_input():
    return io.Combo.Input("channels", options=CHANNEL_POLICIES, default="mix",
                          tooltip="How to make mono: 'mix' averages all channels; 'first' keeps channel 0 like the reference code.")


def _window_inputs() -> list:
    return [
        io.Float.Input("start_seconds", default=0.0, min=0.0, max=86400.0, step=0.1,
                       tooltip="Where the window starts in the recording, in seconds."),
        io.Float.Input("window_seconds", default=REFERENCE_CLIP_SECONDS, min=0.5, max=60.0, step=0.5,
                       tooltip="Length of audio the token hears. The paper uses 10 s at inference, 5 s in training."),
        _channels_input(),
        io.Boolean.Input("loop_short_audio", default=True,
                         tooltip="Loop clips shorter than the window (as the reference does); off pads with silence."),
    ]


CLIP_TOOLTIP = ("CLIP / text encoders of the checkpoint the AudioToken was trained for: SD1.x, SD2.x, SDXL, SD3.x, "
                "Flux.1, Chroma, Wan 2.x, Qwen-Image, HunyuanVideo, Z-Image, Lumina 2 or HiDream.")


def _prompt_inputs() -> list:
    return [
        io.String.Input("text", default=DEFAULT_PROMPT, multiline=True,
                        tooltip="Prompt with the placeholder where the sound belongs, e.g. 'an oil painting of <audio> at night'. "
                                "It may appear several times and take weights like (<audio>:1.3); Qwen-Image and "
                                "Z-Image text encoders ignore prompt weights."),
        io.String.Input("placeholder", default=DEFAULT_PLACEHOLDER,
                        tooltip="The pseudo-word in the prompt that the audio vector replaces."),
    ]


class AudioEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenEncoderLoader",
            display_name="Load Audio Encoder (AudioToken)",
            category=CATEGORY,
            description="Loads the frozen audio encoder an AudioToken listens through: an official BEATs checkpoint "
                        "(.pt or converted .safetensors), Resemblyzer's GE2E speaker encoder pretrained.pt (one voice vector "
                        "per 1.6 s of speech) or a transformers AST / wav2vec2 / HuBERT / CLAP folder, from models/audio_encoders.",
            inputs=[
                io.Combo.Input("encoder_name", options=mf.list_files(mf.AUDIO_ENCODER_FOLDER, ENCODER_SUFFIXES),
                               tooltip="BEATs checkpoint (e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt) or the weights file of a "
                                       "transformers folder (config.json beside it) in models/audio_encoders."),
                io.String.Input("layers", default="auto",
                                tooltip="Transformer layers whose outputs are concatenated (1-indexed). 'auto' = the reference 4,8,12 for BEATs. "
                                        "For CLAP: the blocks of its last stage (1,2 for HTSAT); the GE2E speaker encoder has "
                                        "one (1). "
                                        "Must match what the AudioToken was trained with."),
            ],
            outputs=[ENCODER.Output(display_name="audio_encoder", tooltip="The frozen audio encoder.")],
        )

    @classmethod
    def validate_inputs(cls, encoder_name=None):
        return mf.missing_file_message(mf.AUDIO_ENCODER_FOLDER, encoder_name, ENCODER_SUFFIXES) or True

    @classmethod
    def execute(cls, encoder_name: str, layers: str) -> io.NodeOutput:
        path = mf.resolve(mf.AUDIO_ENCODER_FOLDER, encoder_name)
        folder = os.path.dirname(path)
        source = folder if os.path.isfile(os.path.join(folder, "config.json")) else path
        encoder = load_audio_encoder(source, layers=_parse_layers(layers))
        return io.NodeOutput(LoadedEncoder(encoder=encoder, name=encoder_name))


class AudioTokenLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenLoader",
            display_name="Load AudioToken",
            category=CATEGORY,
            description="Loads trained AudioToken weights (.safetensors from models/audiotoken) and binds them to the audio "
                        "encoder they were trained with. Convert the reference release with 'Import Reference AudioToken'.",
            inputs=[
                io.Combo.Input("audiotoken_name", options=mf.list_files(mf.AUDIOTOKEN_FOLDER, TOKEN_SUFFIXES),
                               tooltip="AudioToken weights file in models/audiotoken."),
                ENCODER.Input("audio_encoder", tooltip="The encoder from 'Load Audio Encoder (AudioToken)'; it must be the kind "
                                                       "and layers this AudioToken was trained with."),
                io.Combo.Input("pooling", options=POOLING_MODES, default=POOLING_MODES[0],
                               tooltip="'deterministic': same audio, same vector. 'reference (stochastic)': keeps the reference code's "
                                       "always-on dropout in the attentive pooling, so each run differs."),
            ],
            outputs=[AUDIOTOKEN.Output(display_name="audiotoken", tooltip="Embedders bound to their audio encoder.")],
        )

    @classmethod
    def validate_inputs(cls, audiotoken_name=None):
        # ComfyUI lists a failed check once for every input the check reads: each check reads one input.
        return mf.missing_file_message(mf.AUDIOTOKEN_FOLDER, audiotoken_name, TOKEN_SUFFIXES) or True

    @classmethod
    def execute(cls, audiotoken_name: str, audio_encoder: LoadedEncoder, pooling: str) -> io.NodeOutput:
        if pooling not in POOLING_MODES:  # ComfyUI 0.3.75 skips V3 combo checks
            raise ValueError(f"pooling {pooling!r} is not one of {POOLING_MODES}; pick one from the list.")
        token = load_audiotoken(mf.resolve(mf.AUDIOTOKEN_FOLDER, audiotoken_name))
        audio_encoder.encoder.spec.check_token(token.encoder, f"AudioToken '{audiotoken_name}'")
        token.set_stochastic_pooling(pooling != POOLING_MODES[0])
        return io.NodeOutput(LoadedAudioToken(token=token, encoder=audio_encoder, name=audiotoken_name))

    @classmethod
    def fingerprint_inputs(cls, audiotoken_name, audio_encoder=None, pooling=POOLING_MODES[0]):
        # Stochastic pooling must not be served from cache: each run should draw anew. Otherwise the
        # file's content decides, so a token retrained under the same name is loaded again.
        if pooling != POOLING_MODES[0]:
            return float("nan")
        path = folder_paths.get_full_path(mf.AUDIOTOKEN_FOLDER, audiotoken_name) if isinstance(audiotoken_name, str) else None
        return mf.file_fingerprint(path) if path else audiotoken_name


class AudioTokenEmbedAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenEmbedAudio",
            display_name="AudioToken Embed Audio",
            category=CATEGORY,
            description="Turns a sound into AudioToken vectors (one per clip of the AUDIO batch) without a prompt, "
                        "to save, blend or reuse them.",
            inputs=[io.Audio.Input("audio", tooltip="Any ComfyUI AUDIO: any sample rate 8-192 kHz, any channel count."),
                    AUDIOTOKEN.Input("audiotoken", tooltip="From 'Load AudioToken'."),
                    *_window_inputs()],
            outputs=[EMBEDDING.Output(display_name="audio_embedding", tooltip="The audio vectors, one row per clip.")],
        )

    @classmethod
    def execute(cls, audio, audiotoken: LoadedAudioToken, start_seconds, window_seconds, channels,
                loop_short_audio) -> io.NodeOutput:
        emb, wave16 = audiotoken.embed_audio(audio, start_seconds=start_seconds, window_seconds=window_seconds,
                                     channel_policy=channels, loop=loop_short_audio)
        return io.NodeOutput(emb, ui=window_preview(wave16, start_seconds, window_seconds))


class AudioTokenEmbedWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenEmbedWindows",
            display_name="AudioToken Embed Windows (long audio)",
            category=CATEGORY,
            description="Slices a long recording into windows (e.g. 10 s every 10 s) and embeds each one, so a soundscape "
                        "or a podcast becomes a batch: with 'AudioToken Conditioning' and an empty latent of the same batch "
                        "size, KSampler draws one image per window.",
            inputs=[io.Audio.Input("audio", tooltip="A long recording (any rate 8-192 kHz, any channels)."),
                    AUDIOTOKEN.Input("audiotoken", tooltip="From 'Load AudioToken'."),
                    io.Float.Input("window_seconds", default=REFERENCE_CLIP_SECONDS, min=0.5, max=60.0, step=0.5,
                                   tooltip="Length of each window (the paper hears 10 s)."),
                    io.Float.Input("hop_seconds", default=REFERENCE_CLIP_SECONDS, min=0.5, max=3600.0, step=0.5,
                                   tooltip="Distance between window starts; equal to the window for no overlap."),
                    io.Int.Input("max_windows", default=64, min=1, max=4096,
                                 tooltip="Refuse recordings that would give more windows than this (each is one image)."),
                    _channels_input()],
            outputs=[EMBEDDING.Output(display_name="audio_embedding", tooltip="One row per window."),
                     io.Int.Output(display_name="count", tooltip="Number of windows: use it as the latent batch size."),
                     io.String.Output(display_name="window_starts", tooltip="Start time of each window, in seconds.")],
        )

    @classmethod
    def execute(cls, audio, audiotoken: LoadedAudioToken, window_seconds, hop_seconds, max_windows,
                channels) -> io.NodeOutput:
        emb, starts = audiotoken.embed_windows(audio, window_seconds=window_seconds, hop_seconds=hop_seconds,
                                               max_windows=max_windows, channel_policy=channels)
        return io.NodeOutput(emb, emb.batch_size, ", ".join(f"{s:g}" for s in starts))


class AudioTokenConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenConditioning",
            display_name="AudioToken Conditioning",
            category=CATEGORY,
            description="Encodes a prompt with the audio vector in place of the placeholder word (textual-inversion style, "
                        "before the frozen text encoders: one vector per encoder, e.g. CLIP-L + T5-XXL for Flux.1). "
                        "One conditioning row per embedding row. Qwen-Image and Z-Image ignore prompt weights.",
            inputs=[io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                    EMBEDDING.Input("audio_embedding", tooltip="From 'AudioToken Embed Audio', 'Blend' or 'Load Embedding'."),
                    *_prompt_inputs()],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, placeholder=None):
        # ComfyUI lists a failed check once for every input the check reads: this one reads one.
        # Whether the prompt holds the placeholder is checked first thing in execute.
        return (isinstance(placeholder, str) and check_placeholder(placeholder)) or True

    @classmethod
    def execute(cls, clip, audio_embedding, text, placeholder) -> io.NodeOutput:
        cond = encode_with_vectors(clip, text, placeholder, audio_embedding.vectors, f"Audio embedding '{audio_embedding.source}'")
        return io.NodeOutput(cond)


class AudioTokenEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenEncode",
            display_name="AudioToken Encode (audio + prompt)",
            category=CATEGORY,
            description="The whole AudioToken path in one node: audio -> audio encoder -> Embedder -> the placeholder's word "
                        "embedding -> CLIP -> CONDITIONING. Also outputs the audio embedding for saving or blending.",
            inputs=[io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                    io.Audio.Input("audio", tooltip="Any ComfyUI AUDIO: any sample rate 8-192 kHz, any channel count; "
                                                    "a batch gives one conditioning row per clip."),
                    AUDIOTOKEN.Input("audiotoken", tooltip="From 'Load AudioToken'."),
                    *_prompt_inputs(), *_window_inputs()],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler."),
                     EMBEDDING.Output(display_name="audio_embedding", tooltip="The audio vectors, one row per clip.")],
        )

    @classmethod
    def validate_inputs(cls, placeholder=None):
        return AudioTokenConditioning.validate_inputs(placeholder=placeholder)

    @classmethod
    def execute(cls, clip, audio, audiotoken: LoadedAudioToken, text, placeholder, start_seconds, window_seconds,
                channels, loop_short_audio) -> io.NodeOutput:
        require_prompt(text, placeholder)  # before the audio work
        emb, wave16 = audiotoken.embed_audio(audio, start_seconds=start_seconds, window_seconds=window_seconds,
                                     channel_policy=channels, loop=loop_short_audio)
        cond = encode_with_vectors(clip, text, placeholder, emb.vectors, f"AudioToken '{audiotoken.name}'")
        return io.NodeOutput(cond, emb, ui=window_preview(wave16, start_seconds, window_seconds))


class AudioTokenBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        weight = dict(default=1.0, min=-10.0, max=10.0, step=0.05)
        return schema(
            node_id="AudioTokenBlend",
            display_name="AudioToken Blend Embeddings",
            category=CATEGORY,
            description="Weighted mix of two to four audio embeddings (e.g. rain + birds). With 'normalize' the weights are "
                        "divided by their sum, keeping the vector's scale.",
            inputs=[EMBEDDING.Input("embedding_1", tooltip="First audio embedding."),
                    io.Float.Input("weight_1", tooltip="Weight of embedding_1.", **weight),
                    EMBEDDING.Input("embedding_2", tooltip="Second audio embedding."),
                    io.Float.Input("weight_2", tooltip="Weight of embedding_2.", **weight),
                    EMBEDDING.Input("embedding_3", optional=True, tooltip="Optional third audio embedding."),
                    io.Float.Input("weight_3", optional=True, tooltip="Weight of embedding_3.", **weight),
                    EMBEDDING.Input("embedding_4", optional=True, tooltip="Optional fourth audio embedding."),
                    io.Float.Input("weight_4", optional=True, tooltip="Weight of embedding_4.", **weight),
                    io.Boolean.Input("normalize", default=True, tooltip="Divide the weights by their sum.")],
            outputs=[EMBEDDING.Output(display_name="audio_embedding", tooltip="The blended vectors.")],
        )

    @classmethod
    def execute(cls, embedding_1, weight_1, embedding_2, weight_2, normalize=True, embedding_3=None, weight_3=1.0,
                embedding_4=None, weight_4=1.0) -> io.NodeOutput:
        pairs = [(embedding_1, weight_1), (embedding_2, weight_2), (embedding_3, weight_3), (embedding_4, weight_4)]
        pairs = [(e, w) for e, w in pairs if e is not None]
        return io.NodeOutput(blend_embeddings([e for e, _ in pairs], [w for _, w in pairs], normalize_weights=normalize))


class AudioTokenSaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenSaveEmbedding",
            display_name="AudioToken Save Embedding",
            category=CATEGORY,
            description=f"Saves audio vectors as .safetensors in output/{EMBEDDING_SUBFOLDER}. Copy the file to "
                        f"input/{EMBEDDING_SUBFOLDER} to load it with 'AudioToken Load Embedding'.",
            inputs=[EMBEDDING.Input("audio_embedding", tooltip="The vectors to save."),
                    io.String.Input("filename_prefix", default=f"{EMBEDDING_SUBFOLDER}/audio",
                                    tooltip="File name prefix, relative to the output folder.")],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, audio_embedding, filename_prefix) -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        path = os.path.join(full_dir, f"{name}_{counter:05}_.safetensors")
        save_embedding(path, audio_embedding)
        return io.NodeOutput(path)


class AudioTokenLoadEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenLoadEmbedding",
            display_name="AudioToken Load Embedding",
            category=CATEGORY,
            description=f"Loads saved audio vectors (.safetensors) from input/{EMBEDDING_SUBFOLDER}.",
            inputs=[io.Combo.Input("embedding_name", options=_input_embeddings(),
                                   tooltip=f"A file saved by 'AudioToken Save Embedding', placed in input/{EMBEDDING_SUBFOLDER}.")],
            outputs=[EMBEDDING.Output(display_name="audio_embedding", tooltip="The saved vectors.")],
        )

    @classmethod
    def validate_inputs(cls, embedding_name=None):
        if embedding_name not in _input_embeddings():
            return (f"'{embedding_name}' is not a .safetensors file in input/{EMBEDDING_SUBFOLDER}; "
                    f"copy a file saved by 'AudioToken Save Embedding' there and refresh.")
        return True

    @classmethod
    def execute(cls, embedding_name) -> io.NodeOutput:
        base = os.path.join(folder_paths.get_input_directory(), EMBEDDING_SUBFOLDER)
        path = mf.listed_path(base, embedding_name, "Embedding")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Embedding '{embedding_name}' is not a file in input/{EMBEDDING_SUBFOLDER}; "
                                    f"copy it there and refresh.")
        return io.NodeOutput(load_embedding(path))


def _input_embeddings() -> list[str]:
    base = os.path.join(folder_paths.get_input_directory(), EMBEDDING_SUBFOLDER)
    if not os.path.isdir(base):
        return []
    return sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))


class AudioTokenImportReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AudioTokenImportReference",
            display_name="Import Reference AudioToken (.bin)",
            category=CATEGORY,
            description="Converts the AudioToken authors' released embedder_learned_embeds.bin (SD1.4, BEATs layers 4,8,12) "
                        "into this pack's .safetensors format in models/audiotoken. Reads the pickle with weights-only loading.",
            inputs=[io.Combo.Input("reference_file", options=mf.list_files(mf.AUDIOTOKEN_FOLDER, REFERENCE_SUFFIXES),
                                   tooltip="The released embedder_learned_embeds.bin, placed in models/audiotoken."),
                    io.String.Input("output_name", default="audiotoken_reference_sd14",
                                    tooltip="Name of the .safetensors file to write in models/audiotoken."),
                    io.Boolean.Input("overwrite", default=False, optional=True,
                                     tooltip="Replace a file of the same name in models/audiotoken; off refuses.")],
            outputs=[io.String.Output(display_name="audiotoken_name", tooltip="The file written; pick it in 'Load AudioToken'.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, output_name=None):
        # One input read, so a problem is listed once; a reference_file that is not there is refused when the
        # node runs, with the folder to put it in.
        return mf.output_name_problem(output_name) or True

    @classmethod
    def execute(cls, reference_file, output_name, overwrite=False) -> io.NodeOutput:
        problem = mf.missing_file_message(mf.AUDIOTOKEN_FOLDER, reference_file, REFERENCE_SUFFIXES)
        if problem:
            raise FileNotFoundError(problem)
        target = mf.output_path(mf.AUDIOTOKEN_FOLDER, output_name, ".safetensors", overwrite=overwrite)
        token = import_reference_embedder(mf.resolve(mf.AUDIOTOKEN_FOLDER, reference_file))
        save_audiotoken(target, token)
        identity = {k: token.training_info[k] for k in ("git_blob_id", "authors_release")}
        return io.NodeOutput(os.path.basename(target), ui={"text": [json.dumps({"written": target, **identity})]})


NODES = [
    AudioEncoderLoader,
    AudioTokenLoader,
    AudioTokenEncode,
    AudioTokenEmbedAudio,
    AudioTokenEmbedWindows,
    AudioTokenConditioning,
    AudioTokenBlend,
    AudioTokenSaveEmbedding,
    AudioTokenLoadEmbedding,
    AudioTokenImportReference,
]
