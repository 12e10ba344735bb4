"""The training nodes on a REAL ComfyUI server: dataset -> Train AudioToken -> encode."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from audio_files import write_tone
from audiotoken_core.token_file import load_audiotoken
from comfy_fixtures import BEATS, CKPT
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def dataset_folder(comfy):
    root = comfy.base / "input" / "audiotoken_datasets" / "tones"
    for label, freq, colour in (("low", 300, (200, 30, 30)), ("high", 3000, (30, 30, 200))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            write_tone(root / label / f"{label}{i}.wav", freq * (1 + 0.1 * i))
            Image.new("RGB", (80, 48), colour).save(root / label / f"{label}{i}.png")
    (root / "low" / "broken.wav").write_bytes(b"not audio")
    (root / "low" / "broken.png").write_bytes(b"not an image")
    (root / "low" / "lonely.wav").write_bytes((root / "low" / "low0.wav").read_bytes())
    return "tones"


def train_graph(name: str, steps: int, dataset: str = "tones", resume: bool = True) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "enc": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
        "data": {"class_type": "AudioTokenDataset",
                 "inputs": {"folder": dataset, "kind": "audio + image pairs", "csv_name": "", "frame": "middle",
                            "image_width": 64, "image_height": 64, "check_files": True,
                            "clip_scorer": "none"}},
        "train": {"class_type": "AudioTokenTrain",
                  "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "audio_encoder": ["enc", 0],
                             "dataset": ["data", 0], "name": name, "steps": steps, "learning_rate": 1e-4,
                             "batch_size": 2, "grad_accum": 1, "seed": 0, "lambda_l1": 0.01, "lambda_cl": 0.01,
                             "save_every": 2, "resume": resume, "precision": "fp32", "gradient_checkpointing": False,
                             "cache_features": True}},
        "curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 1], "filename_prefix": f"loss_{name}"}},
    }


def _text_cond(comfy, text: str, filename: str) -> torch.Tensor:
    entry = comfy.run({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "enc": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "save": {"class_type": "AudioTokenTest_SaveConditioning", "inputs": {"conditioning": ["enc", 0], "filename": filename}},
    })
    assert execution_error(entry) is None, execution_error(entry)
    return load_file(str(comfy.base / "output" / f"{filename}.safetensors"))["0.cond"]


def test_training_node_writes_a_token_the_encode_node_uses(comfy, dataset_folder):
    before = _text_cond(comfy, "a photo of a cat", "clip_before_training")
    g = train_graph("tones_token", steps=3)
    g["audio"] = {"class_type": "LoadAudio", "inputs": {"audio": "dog.mp3"}}
    g["encode"] = {"class_type": "AudioTokenEncode",
                   "inputs": {"clip": ["ckpt", 1], "audio": ["audio", 0], "audiotoken": ["train", 0],
                              "text": "a photo of <audio>", "placeholder": "<audio>", "start_seconds": 0.0,
                              "window_seconds": 10.0, "channels": "mix", "loop_short_audio": True}}
    g["savecond"] = {"class_type": "AudioTokenTest_SaveConditioning",
                     "inputs": {"conditioning": ["encode", 0], "filename": "trained_cond"}}
    g["report"] = {"class_type": "AudioTokenSaveEmbedding",
                   "inputs": {"audio_embedding": ["encode", 1], "filename_prefix": "emb/trained"}}
    entry = comfy.run(g, timeout=900)
    err = execution_error(entry)
    assert err is None, f"{err['exception_message']}\n{err.get('traceback')}"

    models = comfy.base / "models" / "audiotoken"
    token = load_audiotoken(models / "tones_token.safetensors")
    assert token.widths == {"l": 768} and token.training["step"] == 3 and token.training["completed"]
    assert sorted(p.name for p in (models / "tones_token_checkpoints").glob("*.state.pt"))
    assert entry["outputs"]["curve"]["images"]
    cond = load_file(str(comfy.base / "output" / "trained_cond.safetensors"))["0.cond"]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    # The checkpoint's CLIP is untouched for the rest of the graph (and later graphs).
    after = _text_cond(comfy, "a photo of a cat ", "clip_after_training")  # new input -> re-encoded
    assert torch.equal(before, after)
    # The trained file is immediately listed for the loader.
    assert "tones_token.safetensors" in str(comfy.get("/object_info/AudioTokenLoader"))


def test_dataset_node_reports_skipped_files(comfy, dataset_folder):
    g = train_graph("unused", steps=1)
    g = {"data": g["data"], "save": {"class_type": "AudioTokenTest_SaveString",
                                     "inputs": {"text": ["data", 1], "filename": "report"}}}
    entry = comfy.run(g)
    assert execution_error(entry) is None, execution_error(entry)
    report = (comfy.base / "output" / "report.txt").read_text()
    assert report.startswith("4 pairs") and "broken" in report and "lonely" in report


def test_cancel_stops_training_and_keeps_a_checkpoint(comfy, dataset_folder):
    status, body = comfy.queue(train_graph("cancelled_token", steps=100000, resume=False))
    assert status == 200
    checkpoints = comfy.base / "models" / "audiotoken" / "cancelled_token_checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*.state.pt")):
        time.sleep(0.5)
    assert list(checkpoints.glob("*.state.pt")), "training never reached its first checkpoint"
    comfy.request("POST", "/interrupt", {})
    entry = comfy.wait(body["prompt_id"], timeout=300)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds or entry["status"]["status_str"] == "error"
    states = sorted(checkpoints.glob("*.state.pt"))
    last = load_audiotoken(str(states[-1]).replace(".state.pt", ".safetensors"))
    assert last.training["step"] >= 2
    assert comfy.proc.poll() is None and comfy.get("/system_stats")
