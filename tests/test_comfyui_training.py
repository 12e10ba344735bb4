"""The training nodes on a REAL ComfyUI server: dataset -> Train AudioToken -> encode.

Cancel and resume are driven as a user drives them: the Cancel button is POST /interrupt
(ComfyUI then raises InterruptProcessingException from inside the model's ops), resume is a
second queue of the same graph. Progress is read from the server's websocket, as the
frontend reads it.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid

import aiohttp
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from audio_files import write_tone
from audiotoken_core.token_file import load_audiotoken
from comfy_fixtures import BEATS, CKPT, TOKEN_SD15
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui

PROGRESS = "audiotoken.train_progress"
NEVER = 1_000_000  # a save_every no test run reaches: only Cancel or the end writes a checkpoint


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


def train_graph(name: str, steps: int, dataset: str = "tones", resume: bool = True, save_every: int = 2) -> dict:
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
                             "save_every": save_every, "resume": resume, "precision": "fp32",
                             "gradient_checkpointing": False, "cache_features": True}},
        "curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 1], "filename_prefix": f"loss_{name}"}},
    }


class ServerEvents:
    """The messages the server pushes on its websocket (/ws), collected in a background thread, as the
    frontend receives them: prompts queued through `queue` (with this client's id) report back here."""

    def __init__(self, comfy):
        self.comfy = comfy
        self.client_id = uuid.uuid4().hex
        self.url = comfy.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.messages: list[dict] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._listen())
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass

    async def _listen(self):
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._connected.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    with self._changed:
                        self.messages.append(json.loads(msg.data))
                        self._changed.notify_all()

    def __enter__(self):
        self._thread.start()
        assert self._connected.wait(30), "could not open the server's websocket"
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)

    def queue(self, graph: dict) -> str:
        status, body = self.comfy.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        assert status == 200, body
        return body["prompt_id"]

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        with self._changed:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.time()
                assert left > 0, f"no websocket message {what} within {timeout} s"
                self._changed.wait(left)

    def steps_reported(self) -> list[int]:
        return [m["data"]["step"] for m in self.messages if m["type"] == PROGRESS and m["data"]["node"] == "train"]


def _ok(entry: dict) -> dict:
    err = execution_error(entry)
    assert err is None, f"{err['exception_type']}: {err['exception_message']}\n{err.get('traceback')}"
    return entry


def _interrupted(entry: dict) -> bool:
    return "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]


def _checkpoint_steps(folder) -> list[int]:
    return sorted(int(re.search(r"-step(\d+)\.state\.pt$", p.name)[1]) for p in folder.glob("*.state.pt"))


def _cancel_after(comfy, graph: dict, step: int) -> tuple[dict, int]:
    """Queue `graph`, press Cancel once training has reported `step`; (history entry, last step reported)."""
    with ServerEvents(comfy) as events:
        prompt_id = events.queue(graph)
        events.wait_for(lambda m: m["type"] == PROGRESS and m["data"]["step"] >= step, 600, f"for step {step}")
        status, _ = comfy.request("POST", "/interrupt", {})
        assert status == 200
        entry = comfy.wait(prompt_id, timeout=300)
        # The interrupt message is queued after every progress message of the run.
        events.wait_for(lambda m: m["type"] == "execution_interrupted", 60, "execution_interrupted")
        return entry, max(events.steps_reported())


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
    entry = _ok(comfy.run(g, timeout=900))

    models = comfy.base / "models" / "audiotoken"
    token = load_audiotoken(models / "tones_token.safetensors")
    assert token.widths == {"l": 768} and token.training_info["step"] == 3 and token.training_info["completed"]
    assert _checkpoint_steps(models / "tones_token_checkpoints") == [2, 3]
    assert entry["outputs"]["curve"]["images"]
    cond = load_file(str(comfy.base / "output" / "trained_cond.safetensors"))["0.cond"]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    # The checkpoint's CLIP is untouched for the rest of the graph (and later graphs).
    after = _text_cond(comfy, "a photo of a cat ", "clip_after_training")  # new input -> re-encoded
    assert torch.equal(before, after)
    # The trained file is immediately listed for the loader.
    assert "tones_token.safetensors" in str(comfy.get("/object_info/AudioTokenLoader"))


def test_feature_cache_is_kept_in_its_model_folder_not_in_temp(comfy, dataset_folder):
    """ComfyUI empties temp/ at every start: the cache lives in models/audiotoken_cache/<dataset>."""
    _ok(comfy.run(train_graph("cache_token", steps=1), timeout=900))
    cache = comfy.base / "models" / "audiotoken_cache" / "tones"
    cached = [p for p in cache.rglob("*.safetensors")]
    assert cached and sum(p.stat().st_size for p in cached) > 0
    assert not list((comfy.base / "temp").rglob("*.safetensors"))


def test_dataset_node_reports_skipped_files(comfy, dataset_folder):
    g = train_graph("unused", steps=1)
    g = {"data": g["data"], "save": {"class_type": "AudioTokenTest_SaveString",
                                     "inputs": {"text": ["data", 1], "filename": "report"}}}
    entry = comfy.run(g)
    assert execution_error(entry) is None, execution_error(entry)
    report = (comfy.base / "output" / "report.txt").read_text()
    assert report.startswith("4 pairs") and "broken" in report and "lonely" in report


def test_cancel_between_checkpoints_keeps_the_last_completed_step(comfy, dataset_folder):
    name = "cancelled_token"
    entry, reached = _cancel_after(comfy, train_graph(name, steps=100_000, resume=False, save_every=NEVER), step=2)
    assert _interrupted(entry), entry["status"]
    folder = comfy.base / "models" / "audiotoken" / f"{name}_checkpoints"
    assert _checkpoint_steps(folder) == [reached]
    token = load_audiotoken(folder / f"{name}-step{reached:06d}.safetensors")
    assert token.training_info["step"] == reached and not token.training_info["completed"]
    state = torch.load(folder / f"{name}-step{reached:06d}.state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == reached and len(state["history"]) == reached
    # Only a completed training writes (or replaces) models/audiotoken/<name>.safetensors.
    assert not (comfy.base / "models" / "audiotoken" / f"{name}.safetensors").exists()
    assert comfy.proc.poll() is None and comfy.get("/system_stats")


def test_cancelled_and_resumed_training_equals_an_uninterrupted_one(comfy, dataset_folder):
    """CPU, same settings: Cancel partway + queue the same graph again = one uninterrupted run, bitwise;
    queueing it again with more steps continues where it ended."""
    steps = 4
    models = comfy.base / "models" / "audiotoken"
    _ok(comfy.run(train_graph("straight", steps=steps, save_every=NEVER), timeout=900))

    resumed = train_graph("resumed", steps=steps, save_every=NEVER)
    entry, reached = _cancel_after(comfy, resumed, step=2)
    assert _interrupted(entry) and 2 <= reached < steps, (entry["status"], reached)
    assert _checkpoint_steps(models / "resumed_checkpoints") == [reached]
    _ok(comfy.run(resumed, timeout=900))

    want, got = load_file(str(models / "straight.safetensors")), load_file(str(models / "resumed.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert load_audiotoken(models / "resumed.safetensors").training_info["step"] == steps

    # More steps: continues from the end of the finished run and replaces the token of that name.
    _ok(comfy.run(train_graph("resumed", steps=steps + 1, save_every=NEVER), timeout=900))
    token = load_audiotoken(models / "resumed.safetensors")
    assert token.training_info["step"] == steps + 1 and token.training_info["completed"]
    assert _checkpoint_steps(models / "resumed_checkpoints")[-1] == steps + 1


def test_names_that_would_write_outside_or_over_another_file_are_refused(comfy, dataset_folder, tmp_path):
    models = comfy.base / "models" / "audiotoken"
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"not yours")
    (models / "elsewhere.safetensors").symlink_to(outside)
    (models / "elsewhere_dir_checkpoints").symlink_to(tmp_path, target_is_directory=True)
    imported = (models / TOKEN_SD15).read_bytes()
    try:
        for name in ("elsewhere", "elsewhere_dir", "bad\x00name", ".", "..", "../escape", "a/b",
                     TOKEN_SD15.removesuffix(".safetensors")):
            status, body = comfy.queue(train_graph(name, steps=1))
            assert status == 400, (name, body)
            assert set(body["node_errors"]) == {"train"}, (name, body)
            details = " ".join(e["details"] for e in body["node_errors"]["train"]["errors"])
            assert "name" in details and "Traceback" not in details, (name, details)
    finally:
        (models / "elsewhere.safetensors").unlink()
        (models / "elsewhere_dir_checkpoints").unlink()
    assert outside.read_bytes() == b"not yours" and sorted(p.name for p in tmp_path.iterdir()) == ["precious.safetensors"]
    assert (models / TOKEN_SD15).read_bytes() == imported  # a token the training node did not make is kept
