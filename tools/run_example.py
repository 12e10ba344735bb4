"""The main job: ComfyUI with this pack runs the bundled example workflow on bundled audio.

Real model files are used when a models folder holds them (`--models DIR`, a ComfyUI
`models/` folder with checkpoints/, audio_encoders/, audiotoken/); anything missing is
replaced by a generated PLACEHOLDER with random weights, and the run says so: such images
are noise, but every step (decode, resample, BEATs, Embedder, splice, CLIP, KSampler, VAE)
is the real code path.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_server import ComfyServer, execution_error  # noqa: E402
from tools.workflow_api import convert  # noqa: E402

WORKFLOW = REPO_ROOT / "workflows" / "audiotoken_sd15_audio_to_image.json"
AUDIO = REPO_ROOT / "assets" / "audio" / "dog.mp3"
PLACEHOLDERS = {
    "checkpoints": "placeholder_sd15_random.safetensors",
    "audio_encoders": "placeholder_beats_random.pt",
    "audiotoken": "placeholder_audiotoken_random.safetensors",
}
WIDGET = {"checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
          "audio_encoders": ("AudioTokenEncoderLoader", "encoder_name"),
          "audiotoken": ("AudioTokenLoader", "audiotoken_name")}


def _pick_real(models: Path | None, folder: str, wanted: str) -> Path | None:
    if models is None or not (models / folder).is_dir():
        return None
    exact = models / folder / wanted
    if exact.is_file():
        return exact
    candidates = sorted(p for p in (models / folder).iterdir() if p.suffix in (".safetensors", ".pt", ".ckpt"))
    return candidates[0] if candidates else None


def _make_placeholder(folder: str, path: Path) -> None:
    if path.exists():
        return
    if folder == "checkpoints":
        from tools.placeholder_sd import write_placeholder_sd15
        write_placeholder_sd15(path)
    elif folder == "audio_encoders":
        from tools.placeholder_beats import write_placeholder_beats
        write_placeholder_beats(path, seed=0)
    else:
        import torch

        from audiotoken_core.embedder import Embedder, EmbedderConfig
        from audiotoken_core.token_file import AudioToken, save_audiotoken
        torch.manual_seed(0)
        save_audiotoken(path, AudioToken(embedders={"l": Embedder(EmbedderConfig(input_dim=2304, output_dim=768))},
                                         description="PLACEHOLDER: random weights, not trained"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None, help="a ComfyUI models/ folder with real weights")
    parser.add_argument("--audio", type=Path, default=AUDIO, help="audio file to turn into an image")
    parser.add_argument("--workflow", type=Path, default=WORKFLOW)
    parser.add_argument("--prompt", default=None, help="prompt with <audio>; default: the workflow's")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "run")
    args = parser.parse_args(argv)

    base = args.workdir / "comfy"
    server = ComfyServer(base, test_nodes=False)
    try:
        placeholders, chosen = [], {}
        for folder, placeholder in PLACEHOLDERS.items():
            node_type, widget = WIDGET[folder]
            wanted = next(n for n in json.loads(args.workflow.read_text())["nodes"] if n["type"] == node_type)
            real = _pick_real(args.models, folder, wanted["widgets_values"][0])
            target = base / "models" / folder
            if real is not None:
                link = target / real.name
                if not link.exists():
                    link.symlink_to(real.resolve())
                print(f"[run] {folder}: using REAL model {real}")
                chosen[folder] = real.name
            else:
                print(f"[run] {folder}: no real model found -> generating PLACEHOLDER {placeholder} (random weights)")
                _make_placeholder(folder, target / placeholder)
                chosen[folder] = placeholder
                placeholders.append(folder)
        shutil.copy(args.audio, base / "input" / args.audio.name)
        server.wait_ready()
        object_info = server.get("/object_info")
        overrides = {node_type: {widget: chosen[folder]} for folder, (node_type, widget) in WIDGET.items()}
        overrides["LoadAudio"] = {"audio": args.audio.name}
        if args.prompt:
            overrides["AudioTokenEncode"] = {"text": args.prompt}
        if placeholders:  # random weights: keep the CPU run short
            overrides["KSampler"] = {"steps": 4}
            overrides["EmptyLatentImage"] = {"width": 256, "height": 256}
        prompt, problems = convert(json.loads(args.workflow.read_text()), object_info, overrides)
        if problems:
            print("[run] the workflow does not fit this ComfyUI:\n  " + "\n  ".join(problems))
            return 1
        entry = server.run(prompt, timeout=1800)
        err = execution_error(entry)
        if err:
            print(f"[run] ComfyUI reported an error in node {err.get('node_type')}: {err.get('exception_message')}")
            return 1
        out_dir = args.workdir / "output"
        out_dir.mkdir(parents=True, exist_ok=True)
        for node_output in entry["outputs"].values():
            for image in node_output.get("images", []):
                src = base / "output" / image["subfolder"] / image["filename"]
                shutil.copy(src, out_dir / image["filename"])
                print(f"[run] wrote {out_dir / image['filename']}")
        if placeholders:
            print(f"[run] NOTE: {', '.join(placeholders)} were PLACEHOLDER models with random weights, so the image is "
                  f"noise. Pass --models /path/to/ComfyUI/models holding real weights for a real picture.")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
