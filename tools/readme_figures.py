"""Figures for the README, made from real runs of this pack's code.

    .venv/bin/python tools/readme_figures.py [--out docs/figures] [--work /tmp/readme_figures]

docs/figures/learn_world_contact_sheet.png: the learnability world (tools/learn_world.py) after
training an AudioToken in it (tools/learn_world_eval.py, the same training as
tests/test_learnability.py) and evaluating it with the evaluation runner: one row per sound
class (a held-out recording), columns spectrogram | AudioToken's image | reference frame |
untrained token (floor) | text label (topline). Latents are shown as colours (see
learn_world_eval.latent_to_rgb). Also writes learn_world_results.md (the table) next to it.
About 2-3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MAX_BYTES = 300_000


def learn_world_contact_sheet(out_dir: Path, work: Path) -> dict:
    from PIL import Image

    from tools import learn_world_eval as lwe

    t0 = time.perf_counter()
    learned = lwe.train_world_token(work / "train", world_cache=work / "world_cache")
    items, results, _ = lwe.evaluate_world(learned, work / "eval")
    from audiotoken.audiotoken_core.evaluation.contact_sheet import eval_contact_sheet

    first_of_each = [next(i for i, item in enumerate(items) if item.label == word) for word in lwe.lw.WORDS]
    sheet = eval_contact_sheet(work / "eval" / "out", items, indices=first_of_each,
                               columns=("spectrogram", "audiotoken", "reference", "untrained", "text_label"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "learn_world_contact_sheet.png"
    Image.fromarray(sheet).save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        Image.fromarray(sheet).quantize(colors=128).save(path, optimize=True)
    (out_dir / "learn_world_results.md").write_text(
        "# Learnability world: evaluation of the trained AudioToken (tools/readme_figures.py)\n\n" + results.markdown())
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
            "table": results.table, "training": learned.seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "figures")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(learn_world_contact_sheet(args.out, args.work))
    else:
        with tempfile.TemporaryDirectory() as work:
            print(learn_world_contact_sheet(args.out, Path(work)))


if __name__ == "__main__":
    main()
