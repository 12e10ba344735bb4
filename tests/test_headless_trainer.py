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


# -- the loader flags of the new families (parsed in process; nothing is loaded) ---------------------

def _parse(argv, capsys):
    import importlib
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        script = importlib.import_module("train_audiotoken")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    try:
        return script.parse_args(argv), None
    except SystemExit:
        return None, capsys.readouterr().err


def test_loader_flags_are_checked_before_anything_loads(tmp_path, capsys):
    files = {name: tmp_path / f"{name}.safetensors" for name in ("ckpt", "dit", "clip_l", "t5", "ae")}
    for path in files.values():
        path.write_bytes(b"x")
    base = ["--encoder", "beats.pt", "--data", "d", "--out", "o"]
    dit = ["--diffusion-model", str(files["dit"]), "--clip-type", "flux",
           "--text-encoder", str(files["clip_l"]), "--text-encoder", str(files["t5"])]

    args, _ = _parse(base + dit + ["--vae", str(files["ae"]), "--guidance", "3.5", "--text-encoder-checkpointing",
                                   "--objective", "diffusion", "--warm-start-steps", "100"], capsys)
    assert args.text_encoder == [files["clip_l"], files["t5"]] and args.clip_type == "flux" and args.guidance == 3.5
    assert args.text_encoder_checkpointing and args.warm_start_steps == 100 and args.checkpoint is None
    args, _ = _parse(base + dit + ["--objective", "text_match"], capsys)  # no images: no VAE needed
    assert args.vae is None and args.objective == "text_match"
    args, _ = _parse(base + ["--checkpoint", str(files["ckpt"]), "--vae", str(files["ae"])], capsys)
    assert args.checkpoint == files["ckpt"] and args.guidance is None and args.objective == "diffusion"

    for argv, message in (
        (base, "name the model: --checkpoint FILE"),
        (base + ["--checkpoint", str(files["ckpt"])] + dit, "--checkpoint and --diffusion-model both"),
        (base + ["--checkpoint", str(files["ckpt"]), "--text-encoder", str(files["t5"])],
         "--text-encoder go with --diffusion-model"),
        (base + ["--checkpoint", str(files["ckpt"]), "--clip-type", "sd3"], "--clip-type go with --diffusion-model"),
        (base + ["--diffusion-model", str(files["dit"]), "--clip-type", "flux", "--vae", str(files["ae"])],
         "needs its text encoder(s)"),
        (base + ["--diffusion-model", str(files["dit"]), "--text-encoder", str(files["t5"]), "--vae", str(files["ae"])],
         "needs --clip-type"),
        (base + dit, "needs --vae: the diffusion objective encodes the training images"),
        (base + dit + ["--warm-start-steps", "10"], "needs --vae"),  # a warm start still ends in diffusion
        (base + dit + ["--vae", str(tmp_path / "missing.safetensors")], "--vae " + str(tmp_path / "missing")),
        (base + dit[:4] + ["--text-encoder", str(files["t5"])] * 5 + ["--vae", str(files["ae"])], "ComfyUI's loaders take 1 to 4"),
    ):
        args, err = _parse(argv, capsys)
        assert args is None and message in err, (argv, err)


def test_clip_type_names_follow_comfyui(capsys):
    import importlib
    import sys

    from tools.comfy_root import import_comfy

    import_comfy(cpu=True)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        script = importlib.import_module("train_audiotoken")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import comfy.sd

    assert script.clip_type("flux") is comfy.sd.CLIPType.FLUX and script.clip_type("QWEN_IMAGE") is comfy.sd.CLIPType.QWEN_IMAGE
    assert script.clip_type("stable_diffusion") is comfy.sd.CLIPType.STABLE_DIFFUSION
    with pytest.raises(SystemExit, match="--clip-type 'fluxx' is not one this ComfyUI knows; use one of: .*flux"):
        script.clip_type("fluxx")


def test_separate_model_files_train_with_text_match_and_no_vae(assets, tmp_path):
    """--diffusion-model + --text-encoder + --clip-type, as UNETLoader / CLIPLoader load them (here the two
    halves of the SD1.5 checkpoint), one text-match step: no VAE is given and no image is encoded."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(assets["ckpt"]))
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    clip_prefix = "cond_stage_model.transformer."
    clip = {k[len(clip_prefix):]: v for k, v in state.items() if k.startswith(clip_prefix)}
    del state
    save_file(unet, str(tmp_path / "unet.safetensors"))
    save_file(clip, str(tmp_path / "clip_l.safetensors"))
    del unet, clip
    args = _args(assets, tmp_path / "out", batch=2, steps=1)
    assert args[:2] == ["--checkpoint", str(assets["ckpt"])]
    cache = args.index("--cache-dir")
    args = args[2:cache] + args[cache + 2:]  # no checkpoint; no feature cache (one step encodes one batch)
    done = _run(["--comfyui", str(find_comfyui_root()), *args, "--diffusion-model", str(tmp_path / "unet.safetensors"),
                 "--text-encoder", str(tmp_path / "clip_l.safetensors"), "--clip-type", "stable_diffusion",
                 "--objective", "text_match"], procs=1)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "out" / "result-0.json").read_text())
    assert result["status"] == "completed" and result["step"] == 1
    token = load_audiotoken(tmp_path / "out" / "tok.safetensors")
    assert token.widths == {"l": 768} and token.training_info["config"]["objective"] == "text_match"
    assert "(text_match " in done.stdout
