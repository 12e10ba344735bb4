"""scripts/train_audiotoken.py: ComfyUI's model code, one process vs two gloo processes under torchrun.

Two processes with batch 2 each must train what one process with batch 4 trains (the same
samples and noise, gradients averaged by DistributedDataParallel), only rank 0 writes
files, and a two-process run resumes from its checkpoint with both ranks in step.
"""
from __future__ import annotations

import ast
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
from tools.comfy_root import find_comfyui_root
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


def _args(assets, out: Path, batch: int, steps: int) -> list[str]:
    return ["--checkpoint", str(assets["ckpt"]), "--encoder", str(assets["beats"]), "--data", str(assets["data"]),
            "--out", str(out), "--name", "tok", "--steps", str(steps), "--batch-size", str(batch), "--lr", "1e-4",
            "--image-size", "64x64", "--seed", "7", "--save-every", "1", "--pooling-dropout", "0",
            "--cache-dir", str(assets["root"] / "cache"), "--result-json", str(out / "result-{rank}.json")]


def _run(args: list[str], procs: int, env_extra=None) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(SCRIPT), *args]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_ROOT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _train(assets, out: Path, batch: int, procs: int, steps: int, extra: tuple[str, ...] = ()) -> list[dict]:
    comfyui = ["--comfyui", str(find_comfyui_root())]
    done = _run([*comfyui, *_args(assets, out, batch, steps), *extra], procs)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(procs)]


def _assert_close(a, b, what: str) -> None:
    for name, wa in a.embedders["l"].state_dict().items():
        assert torch.allclose(wa, b.embedders["l"].state_dict()[name], atol=1e-5, rtol=1e-4), (what, name)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    single = _train(assets, tmp_path / "single", batch=4, procs=1, steps=3)
    ddp = _train(assets, tmp_path / "ddp", batch=2, procs=2, steps=2)
    assert [r["rank"] for r in ddp] == [0, 1] and all(r["world_size"] == 2 for r in ddp)
    assert ddp[0]["weights_sha256"] == ddp[1]["weights_sha256"]  # both ranks hold identical weights
    assert single[0]["status"] == ddp[0]["status"] == "completed"
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix != ".json") == [
        "tok-step000001.safetensors", "tok-step000001.state.pt",
        "tok-step000002.safetensors", "tok-step000002.state.pt", "tok.safetensors"]  # rank 0 wrote each file once

    step = {s: load_audiotoken(tmp_path / "single" / f"tok-step{s:06d}.safetensors") for s in (1, 2, 3)}
    two = load_audiotoken(tmp_path / "ddp" / "tok.safetensors")
    assert two.training_info["lr"] == pytest.approx(step[2].training_info["lr"])  # lr scales with batch x processes
    _assert_close(step[2], two, "step 2")
    moved = max((step[2].state_dict()[k] - step[1].state_dict()[k]).abs().max().item() for k in step[1].state_dict())
    assert moved > 0  # the second step really changed the weights

    # the two-process run resumed from its step-2 checkpoint reaches the single process's step 3
    resumed = _train(assets, tmp_path / "ddp", batch=2, procs=2, steps=3, extra=("--resume",))
    assert [r["step"] for r in resumed] == [3, 3] and resumed[0]["weights_sha256"] == resumed[1]["weights_sha256"]
    _assert_close(step[3], load_audiotoken(tmp_path / "ddp" / "tok.safetensors"), "step 3")


def test_the_script_finds_comfyui_only_where_it_is_told(assets, tmp_path):
    imported = {n.module or "" for n in ast.walk(ast.parse(SCRIPT.read_text())) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(SCRIPT.read_text())) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.split(".")[0] == "tools" for name in imported)  # scripts do not use the test install

    args = _args(assets, tmp_path / "out", batch=4, steps=1)
    missing = _run(args, procs=1)
    assert missing.returncode != 0
    assert "pass --comfyui /path/to/ComfyUI or set COMFYUI_ROOT" in missing.stderr
    wrong = _run(args, procs=1, env_extra={"COMFYUI_ROOT": str(tmp_path)})
    assert wrong.returncode != 0 and f"{tmp_path} is not a ComfyUI folder" in wrong.stderr
    assert not (tmp_path / "out").exists()
