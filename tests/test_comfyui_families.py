"""AudioToken in a REAL ComfyUI server with the newer model families: Flux.1, SD3.x, Wan 2.1, Qwen-Image.

Each family's usual graph runs to completion (UNETLoader + tiny CLIP + VAELoader + AudioToken
nodes + the family's sampling nodes + decode + save), and the CONDITIONING the graph computed
equals an in-process encode with the same tiny CLIP and the same audio vectors. Diffusion
models and VAEs are random files that ComfyUI's own detection classifies as that family
(checked here too); Qwen-Image's detection fixes a 3584-wide text input that the tiny Qwen CLIP
does not have, so its graph takes an in-process tiny model (AudioTokenTest_TinyModel) instead.
"""
from __future__ import annotations

import pytest
import torch
from comfy_fixtures import BEATS
from family_fixtures import DETECTED, IN_PROCESS, FamilyAssets
from safetensors import safe_open
from safetensors.torch import load_file

from audiotoken_core.embedding import load_embedding
from tools.comfy_root import import_comfy, import_pack
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui

TEXT = "a photo of <audio>, at night"
WINDOW = 3.0  # seconds of audio: nothing checked here needs the reference's 10 s (a third of the encoder work)
# ComfyUI's model config class that detection must pick, and the model_base class it builds.
DETECTED_AS = {"flux": ("Flux", "Flux"), "sd3": ("SD3", "SD3"), "wan": ("WAN21_T2V", "WAN21")}
NAMES = {"flux": "flux", "sd3": "sd3", "wan": "wan", "qwen_image": "qwen"}  # how a message names the family


def _ok(entry: dict) -> dict:
    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    return entry


def family_graph(a: FamilyAssets, save: str, audio: str = "dog.mp3", sample: bool = True,
                 token: str | None = None) -> dict:
    """API graph: tiny CLIP + AudioToken encode, its CONDITIONING and vectors saved under the name `save`;
    with `sample`, also the family's usual graph: sample, decode, save an image (a WEBP video for Wan)."""
    g = {
        "clip": {"class_type": "AudioTokenTest_TinyCLIP", "inputs": {"family": a.family, "seed": 0}},
        "audio": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
        "tok": {"class_type": "AudioTokenLoader",
                "inputs": {"audiotoken_name": token or a.token, "audio_encoder": ["enc", 0],
                           "pooling": "deterministic"}},
        "encode": {"class_type": "AudioTokenEncode",
                   "inputs": {"clip": ["clip", 0], "audio": ["audio", 0], "audiotoken": ["tok", 0], "text": TEXT,
                              "placeholder": "<audio>", "start_seconds": 0.0, "window_seconds": WINDOW,
                              "channels": "mix", "loop_short_audio": True}},
        "savecond": {"class_type": "AudioTokenTest_SaveConditioning",
                     "inputs": {"conditioning": ["encode", 0], "filename": save}},
        "saveemb": {"class_type": "AudioTokenSaveEmbedding",
                    "inputs": {"audio_embedding": ["encode", 1], "filename_prefix": f"emb/{save}"}},
    }
    if not sample:
        return g
    if a.unet is not None:
        g["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": a.unet, "weight_dtype": "default"}}
    else:
        g["model"] = {"class_type": "AudioTokenTest_TinyModel",
                      "inputs": {"family": a.family, "context_dim": a.context_dim, "pooled_dim": a.pooled_dim or 0,
                                 "seed": 0}}
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": a.vae}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}}
    latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    model, positive, cfg, steps = ["model", 0], ["encode", 0], 2.0, 2
    if a.family == "flux":  # Flux.1-dev: distilled guidance instead of CFG
        g["guide"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["encode", 0], "guidance": 3.5}}
        positive, cfg, steps = ["guide", 0], 1.0, 1
    elif a.family in ("sd3", "wan"):
        g["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 3.0}}
        model = ["shift", 0]
    elif a.family == "qwen_image":
        g["shift"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["model", 0], "shift": 3.1}}
        model = ["shift", 0]
    if a.family == "wan":  # text-to-video: 5 frames -> 2 latent frames
        latent = {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}}
    g["latent"] = latent
    g["sample"] = {"class_type": "KSampler",
                   "inputs": {"model": model, "positive": positive, "negative": ["neg", 0],
                              "latent_image": ["latent", 0], "seed": 1, "steps": steps, "cfg": cfg,
                              "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    if a.family == "wan":
        g["save"] = {"class_type": "SaveAnimatedWEBP",
                     "inputs": {"images": ["decode", 0], "filename_prefix": f"family_{a.family}", "fps": 16.0,
                                "lossless": False, "quality": 80, "method": "fastest"}}
    else:
        g["save"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["decode", 0], "filename_prefix": f"family_{a.family}"}}
    return g


def _meta_state_dict(path) -> dict[str, torch.Tensor]:
    """Names and shapes of a safetensors file as meta tensors: enough for ComfyUI's detection, no 0.7 GB read."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = list(f.keys())  # a safe_open handle is not iterable
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}


@pytest.mark.parametrize("family", DETECTED)
def test_diffusion_model_file_is_detected_as_its_family(comfy, family_models, family):
    import_comfy()
    from comfy import model_detection  # (`comfy` here is the server fixture)

    a = family_models[family]
    path = comfy.base / "models" / "diffusion_models" / a.unet
    config = model_detection.model_config_from_unet(_meta_state_dict(path), "")
    assert config is not None and type(config).__name__ == DETECTED_AS[family][0], config
    unet = config.unet_config
    if family == "flux":
        widths = (unet["context_in_dim"], unet["vec_in_dim"], unet["guidance_embed"], unet["hidden_size"])
        assert widths == (a.context_dim, a.pooled_dim, True, 3072)
    elif family == "sd3":
        assert unet["context_embedder_config"]["params"]["in_features"] == a.context_dim
        assert unet["adm_in_channels"] == a.pooled_dim and unet["qk_norm"] == "rms"
    else:
        assert a.context_dim == 4096 and unet["model_type"] == "t2v" and unet["in_dim"] == 16


@pytest.mark.parametrize("family, context_dim, pooled_dim, detected_as", [
    ("flux", 4096, 768, "Flux"), ("sd3", 4096, 2048, "SD3"), ("wan", 4096, None, "WAN21_T2V"),
    ("qwen_image", 3584, None, "QwenImage"),  # too big (0.73 GB) to write for a test that its CLIP cannot feed
])
def test_detectable_shapes_at_real_text_widths(family, context_dim, pooled_dim, detected_as):
    """The shapes write_placeholder_diffusion_model writes, on the meta device, as ComfyUI detects them."""
    from tools.placeholder_dit import build_diffusion_state_dict

    import_comfy()
    from comfy import model_detection

    shapes = build_diffusion_state_dict(family, context_dim, pooled_dim, device="meta")
    config = model_detection.model_config_from_unet(shapes, "")
    assert config is not None and type(config).__name__ == detected_as, config


def test_small_files_load_through_comfyui_loaders(comfy, family_models):
    """The core loaders' own functions build the family's model_base class and VAE from our files."""
    import_comfy()
    from comfy import model_base, sd, utils

    models = comfy.base / "models"
    for family in ("sd3", "wan"):
        patcher = sd.load_diffusion_model(str(models / "diffusion_models" / family_models[family].unet))
        assert type(patcher.model) is getattr(model_base, DETECTED_AS[family][1])
    for family, (kind, latent_dim) in {"flux": ("AutoencodingEngine", 2), "wan": ("WanVAE", 3)}.items():
        vae = sd.VAE(sd=utils.load_torch_file(str(models / "vae" / family_models[family].vae)))
        assert (type(vae.first_stage_model).__name__, vae.latent_channels, vae.latent_dim) == (kind, 16, latent_dim)


def _saved(comfy, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cond = load_file(str(comfy.base / "output" / f"{name}.safetensors"))
    emb = load_embedding(max((comfy.base / "output" / "emb").glob(f"{name}*.safetensors")))
    return cond, emb.vectors


@pytest.mark.parametrize("family", DETECTED + IN_PROCESS)
def test_family_graph_runs_and_its_conditioning_is_the_spliced_encode(comfy, family_models, family):
    import_pack()
    from audiotoken.nodes.splice import encode_with_vectors

    from tools.tiny_text_encoders import tiny_clip

    a = family_models[family]
    entry = _ok(comfy.run(family_graph(a, f"{family}_dog")))
    files = entry["outputs"]["save"]["images"]
    assert len(files) == 1 and (comfy.base / "output" / files[0]["subfolder"] / files[0]["filename"]).stat().st_size > 0
    _ok(comfy.run(family_graph(a, f"{family}_cat", audio="cat.mp3", sample=False)))
    dog, dog_vectors = _saved(comfy, f"{family}_dog")
    cat, cat_vectors = _saved(comfy, f"{family}_cat")
    assert {k: v.shape for k, v in dog_vectors.items()} == {k: (1, w) for k, w in a.widths.items()}

    # The same tiny CLIP in this process, the graph's own audio vectors placed by the splice.
    with torch.no_grad():
        expected = encode_with_vectors(tiny_clip(family, 0), TEXT, "<audio>", dog_vectors, "test vectors")
    cond, extras = expected[0]
    assert dog["0.cond"].shape == cond.shape and cond.shape[-1] == a.context_dim
    torch.testing.assert_close(dog["0.cond"], cond.float(), atol=1e-4, rtol=1e-4)
    if a.pooled_dim is None:
        assert "0.pooled" not in dog and extras.get("pooled_output") is None
    else:
        assert dog["0.pooled"].shape == (1, a.pooled_dim)
        torch.testing.assert_close(dog["0.pooled"], extras["pooled_output"].float(), atol=1e-4, rtol=1e-4)

    # Another sound changes the conditioning (a graph saved with the cat's vectors).
    assert all((dog_vectors[k] - cat_vectors[k]).abs().max() > 1e-4 for k in dog_vectors)
    assert dog["0.cond"].shape == cat["0.cond"].shape and (dog["0.cond"] - cat["0.cond"]).abs().max() > 1e-4


@pytest.mark.parametrize("clip, token_of", [("wan", "qwen_image"), ("flux", "qwen_image")])  # small Embedders
def test_a_token_for_another_family_is_refused_by_name(comfy, family_models, clip, token_of):
    entry = comfy.run(family_graph(family_models[clip], "refused", sample=False, token=family_models[token_of].token))
    err = execution_error(entry)
    assert err is not None and err["node_id"] == "encode", err
    message = err["exception_message"].lower()
    assert NAMES[clip] in message and NAMES[token_of] in message, err["exception_message"]  # both families named
    assert comfy.proc.poll() is None


# --- in-process: the tiny models themselves (no server) -------------------------------------------

TINY_INPUTS = {  # family -> (latent shape, context width, pooled width, extra conds)
    "flux": ((1, 16, 8, 8), 48, 24, {"guidance": torch.tensor([3.5])}),
    "sd3": ((1, 16, 8, 8), 48, 24, {}),
    "wan": ((1, 16, 2, 8, 8), 48, None, {}),
    "qwen_image": ((1, 16, 1, 8, 8), 40, None, {}),
    "chroma": ((1, 16, 8, 8), 48, None, {"guidance": torch.tensor([0.0])}),
    "z_image": ((1, 16, 8, 8), 40, None, {"num_tokens": 7}),
    "lumina2": ((1, 16, 8, 8), 40, None, {"num_tokens": 7}),
}


@pytest.mark.parametrize("family", sorted(TINY_INPUTS))
def test_tiny_model_is_seeded_and_its_output_follows_the_text(family):
    from tools.placeholder_dit import tiny_model

    shape, context_dim, pooled_dim, extra = TINY_INPUTS[family]
    first, again, other = (tiny_model(family, context_dim, pooled_dim, seed=s) for s in (0, 0, 1))
    weights = [m.model.diffusion_model.state_dict() for m in (first, again, other)]
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if weights[0][k].dim() >= 2)
    g = torch.Generator().manual_seed(0)
    x, cond, cond2 = torch.randn(shape, generator=g), torch.randn(1, 7, context_dim, generator=g), torch.randn(
        1, 7, context_dim, generator=g)
    if pooled_dim is not None:
        extra = dict(extra, y=torch.randn(1, pooled_dim, generator=g))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        out = first.model.apply_model(x, sigma, c_crossattn=cond, **extra)
        same = again.model.apply_model(x, sigma, c_crossattn=cond, **extra)
        moved = first.model.apply_model(x, sigma, c_crossattn=cond2, **extra)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, same)
    assert (out - moved).abs().max() > 1e-3  # the prompt reaches the output


def test_detection_limits_and_unknown_families_are_clear_errors(tmp_path):
    from tools.placeholder_dit import (
        tiny_model,
        write_placeholder_diffusion_model,
        write_placeholder_vae,
    )

    with pytest.raises(ValueError, match="fixed text width of 4096"):
        write_placeholder_diffusion_model("wan", tmp_path / "wan.safetensors", context_dim=112)
    with pytest.raises(ValueError, match="fixed text width of 3584"):
        write_placeholder_diffusion_model("qwen_image", tmp_path / "qwen.safetensors", context_dim=112)
    with pytest.raises(ValueError, match="Unknown family 'sdxl'"):
        tiny_model("sdxl", 768)
    with pytest.raises(ValueError, match="context_dim must be a positive int"):
        tiny_model("flux", 0)
    with pytest.raises(ValueError, match="A wan model takes no pooled text vector"):
        tiny_model("wan", 64, pooled_dim=32)
    with pytest.raises(ValueError, match="detects Flux only with a pooled vector"):
        write_placeholder_diffusion_model("flux", tmp_path / "flux.safetensors", context_dim=64)
    with pytest.raises(ValueError, match="No placeholder VAE for family 'hunyuan_video'"):
        write_placeholder_vae("hunyuan_video", tmp_path / "vae.safetensors")
    assert not list(tmp_path.iterdir())
