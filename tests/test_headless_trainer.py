"""scripts/train_audiotoken.py: ComfyUI's model code, one process vs two gloo processes under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from audio_files import write_tone
from audiotoken_core.token_file import load_audiotoken
from comfy_fixtures import BEATS_SMALL
from tools.placeholder_beats import write_placeholder_beats
from tools.placeholder_sd import write_placeholder_sd15

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_audiotoken.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("headless")
    ckpt = write_placeholder_sd15(root / "sd15.safetensors")
    beats = write_placeholder_beats(root / "beats.pt", seed=1, **BEATS_SMALL)
    data = root / "data"
    for label, freq, colour in (("low", 300, (200, 30, 30)), ("high", 3000, (30, 30, 200))):
        (data / label).mkdir(parents=True)
        for i in range(4):
            write_tone(data / label / f"{label}{i}.wav", freq * (1 + 0.05 * i))
            Image.new("RGB", (64, 64), colour).save(data / label / f"{label}{i}.png")
    return {"ckpt": ckpt, "beats": beats, "data": data, "root": root}


def _train(assets, out: Path, batch: int, procs: int) -> list[dict]:
    common = ["--checkpoint", str(assets["ckpt"]), "--encoder", str(assets["beats"]), "--data", str(assets["data"]),
              "--out", str(out), "--name", "tok", "--steps", "2", "--batch-size", str(batch), "--lr", "1e-4",
              "--image-size", "64x64", "--seed", "7", "--save-every", "1", "--pooling-dropout", "0",
              "--cache-dir", str(assets["root"] / "cache"), "--result-json", str(out / "result-{rank}.json")]
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(SCRIPT), *common]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(procs)]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    single = _train(assets, tmp_path / "single", batch=4, procs=1)
    ddp = _train(assets, tmp_path / "ddp", batch=2, procs=2)
    assert [r["rank"] for r in ddp] == [0, 1] and all(r["world_size"] == 2 for r in ddp)
    assert ddp[0]["weights_sha256"] == ddp[1]["weights_sha256"]  # both ranks hold identical weights
    assert single[0]["status"] == ddp[0]["status"] == "completed"
    a = load_audiotoken(tmp_path / "single" / "tok.safetensors")
    b = load_audiotoken(tmp_path / "ddp" / "tok.safetensors")
    assert a.training["lr"] == pytest.approx(b.training["lr"])  # lr scales with batch x processes
    step1 = load_audiotoken(tmp_path / "single" / "tok-step000001.safetensors").embedders["l"].state_dict()
    moved = 0.0
    for name, wa in a.embedders["l"].state_dict().items():
        wb = b.embedders["l"].state_dict()[name]
        assert torch.allclose(wa, wb, atol=1e-5, rtol=1e-4), name
        moved = max(moved, (wa - step1[name]).abs().max().item())
    assert moved > 0  # the second step really changed the weights
