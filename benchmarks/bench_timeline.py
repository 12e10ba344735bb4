"""Conditioning for a video's frames: AudioTokenFrameConditioning against ONE batched text-encoder pass.

A music video at 12 fps has hundreds of frames, each with its own audio vector. The frame
conditioning must not cost hundreds of separate CLIP passes. This measures, for 240 frames with
240 distinct vectors (a slerp timeline between two random vectors, every row different, so no
row is saved by encoding identical rows once):

  node:  AudioTokenFrameConditioning.execute (tokenize, splice, identical-row check, the batched
         section passes of nodes/splice.py in groups of ROWS_PER_PASS, joining the rows)
  floor: each text encoder called ONCE on the 240 stacked spliced token rows (ComfyUI's
         SDClipModel forward: the bare batched pass, nothing else)

and prints node / floor (goal <= 2). CLIPs: SD1.5 (CLIP-L at its real width 768, 3 small layers)
and Flux.1 (that CLIP-L + T5 at its real width 4096, 2 small layers), from
tools/tiny_text_encoders; `--cases sd15-full` adds SD1.5's full-size CLIP-L (12 layers, random weights).

Usage: .venv/bin/python benchmarks/bench_timeline.py [--frames 240] [--repeats 3] [--cases sd15,flux,sd15-full]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_root import import_comfy, import_pack

PROMPT = "a music video frame of <audio>, 4k, high resolution"
PLACEHOLDER = "<audio>"


def _medians(fns, repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved (a shared machine's load hits all alike)."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(spent) for spent in times]


def sd15_clip(real_size: bool):
    """SD1.5's CLIP (ComfyUI's classes): CLIP-L 768 wide, 3 small layers or the full 12."""
    import comfy.sd
    import comfy.supported_models

    from tools.tiny_text_encoders import MODEL_CONFIGS, init_weights

    config = {} if real_size else dict(MODEL_CONFIGS["clip_l_model_config"])
    options = {"dtype": torch.float32, "clip_l_model_config": config}
    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15({}).clip_target(), model_options=options)
    init_weights(clip.cond_stage_model, seed=0)
    return clip


def slerp_rows(widths: dict[str, int], frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`frames` distinct vectors per key on the slerp path between two random word-scale vectors."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for key, width in sorted(widths.items()):
        a, b = (torch.randn(width, generator=gen) * width ** -0.5 for _ in range(2))
        angle = torch.acos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1, 1))
        u = torch.linspace(0, 1, frames)[:, None]
        rows[key] = (torch.sin((1 - u) * angle) * a + torch.sin(u * angle) * b) / torch.sin(angle)
    return rows


def measure(name: str, clip, frames: int, repeats: int) -> dict:
    from audiotoken.audiotoken_core.embedding import AudioEmbedding
    from audiotoken.audiotoken_core.timeline import AudioTimeline
    from audiotoken.nodes import splice
    from audiotoken.nodes.frame_nodes import AudioTokenFrameConditioning

    widths = splice.clip_widths(clip)
    vectors = slerp_rows(widths, frames)
    timeline = AudioTimeline(embedding=AudioEmbedding(vectors, source="bench"), fps=12.0, start_seconds=0.0,
                             window_seconds=4.0, duration_seconds=frames / 12.0)

    def node():
        return AudioTokenFrameConditioning.execute(clip, timeline, PROMPT, PLACEHOLDER).args[0]

    tokens, ids = splice._stand_in_tokens(clip, PROMPT, PLACEHOLDER)
    scales = splice.embedding_scales(clip, ids)
    rows = [splice._put_vectors(tokens, ids, {k: v[b] for k, v in vectors.items()}, scales) for b in range(frames)]
    encoders = splice.text_encoders(clip, widths)
    stacked = {key: [chunk for row in rows for chunk in row[key]] for key in widths}

    def floor():
        for key, encoder in encoders.items():
            encoder([[token for token, *_ in chunk] for chunk in stacked[key]])

    with torch.inference_mode():
        cond = node()[0][0]
        assert cond.shape[0] == frames, cond.shape
        t_node, t_floor = _medians([node, floor], repeats)
    return {"name": name, "frames": frames, "node_s": t_node, "floor_s": t_floor, "ratio": t_node / t_floor,
            "passes": -(-frames // splice.ROWS_PER_PASS)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="sd15,flux",
                        help="comma-separated: sd15, flux, sd15-full (SD1.5's full-size CLIP-L; slow on CPU)")
    args = parser.parse_args(argv)
    import_comfy(cpu=True)
    import_pack()
    from tools.tiny_text_encoders import tiny_clip

    known = {"sd15": ("SD1.5 CLIP-L 768, 3 layers", lambda: sd15_clip(False)),
             "flux": ("Flux.1 CLIP-L 768 + T5 4096, 3 + 2 layers", lambda: tiny_clip("flux")),
             "sd15-full": ("SD1.5 CLIP-L full size (12 layers)", lambda: sd15_clip(True))}
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}: choose from {sorted(known)}")
    cases = [known[n] for n in names]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.frames} frames, "
          f"median of {args.repeats}", flush=True)
    for name, build in cases:
        r = measure(name, build(), args.frames, args.repeats)
        print(f"{r['name']:45s} node {r['node_s']:7.3f} s  one batched pass {r['floor_s']:7.3f} s  "
              f"ratio {r['ratio']:.2f}  ({r['passes']} section passes)", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    main()
