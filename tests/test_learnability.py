"""Proof that AudioToken learns, and that the evaluation sees it,
in the synthetic paired world of tools/learn_world.py.

K = 4 sound classes (hum, beeps, noise bursts, chirps) are paired with K image classes that
a small frozen text-to-image model (ComfyUI classes, v-prediction) draws from "a photo of
red/green/blue/yellow". AudioToken is trained ONCE per session (module fixture) on the pairs
with the real trainer and the real ComfyUI backend, through a small random BEATs. Then:

1. images are sampled through ComfyUI's sampling path (`nodes.common_ksampler`) from HELD-OUT
   audio. Bars: trained accuracy >= 80 % (chance 25 %), the untrained Embedder <= 50 %, and the
   matched-audio denoising loss below the shuffled-audio loss.
2. the evaluation runner (audiotoken_core/evaluation) with the pack's ComfyGenerator scores the
   held-out set written as files, with the world's own scorers (tools/learn_world_eval.py):
   AudioToken far above the untrained floor, the text-label topline near the world's text accuracy.
3. the same world on a rectified-flow model (ComfyUI's FLOW model type, SD3's shift; trained with
   the velocity target): AudioToken trained with the paper's diffusion objective through the
   backend's flow loss, and with the pack's "text_match" objective (no diffusion model in the
   loop), each reaches >= 80 % held-out accuracy; the untrained Embedder stays <= 50 %.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from tools import learn_world as lw
from tools import learn_world_eval as lwe

ACCURACY_BAR = 0.80
UNTRAINED_MAX = 0.50


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    return lwe.train_world_token(tmp_path_factory.mktemp("learn_world"))


def test_audiotoken_learns_the_paired_world(learned):
    from audiotoken.nodes import splice

    world, summary = learned.world, learned.summary
    assert world.prediction == "v"
    assert summary.status == "completed"
    assert lwe.mean_loss(summary.history, first=False) < lwe.mean_loss(summary.history, first=True)

    untrained = lwe.heldout_accuracy(learned, learned.untrained)
    trained = lwe.heldout_accuracy(learned, learned.token)
    heldout = learned.heldout
    with torch.no_grad():
        vectors = {k: e.eval()(learned.heldout_features) for k, e in learned.token.embedders.items()}
    matched = splice.encode_with_vectors(world.clip, "a photo of <audio>", "<audio>", vectors, "trained")
    shuffled_ids = (heldout["class_id"] + 1) % lw.K
    matched_loss = world.denoising_loss(matched, heldout["class_id"].tolist(), seed=3, target="v")
    shuffled_loss = world.denoising_loss(matched, shuffled_ids.tolist(), seed=3, target="v")
    print(f"untrained {untrained:.2f}  trained {trained:.2f}  loss matched {matched_loss:.4f} shuffled {shuffled_loss:.4f}"
          f"  seconds {learned.seconds}")
    assert trained >= ACCURACY_BAR, (trained, untrained)
    assert untrained <= UNTRAINED_MAX, untrained
    assert matched_loss < shuffled_loss


def test_evaluation_scores_audiotoken_far_above_its_floor(learned, tmp_path):
    steps = []
    t0 = time.perf_counter()
    items, results, sheet = lwe.evaluate_world(learned, tmp_path, progress=lambda s, t: steps.append((s, t)))
    seconds = time.perf_counter() - t0
    table = results.table
    print(json.dumps({"table": table, "seconds": round(seconds, 1), "timings": results.timings}))
    assert len(items) == lw.K * lwe.HELDOUT_PER_CLASS and results.n_items == len(items)
    assert results.not_available == {} and results.errors == {}
    at, floor, top = table["audiotoken"], table["untrained"], table["text_label"]
    # AIC: the world's classifier agrees with the audio's label
    assert at["AIC"] >= 80 and floor["AIC"] <= 50, table
    text_accuracy = 100 * learned.world.text_accuracy(per_class=4)
    assert top["AIC"] >= 80 and abs(top["AIC"] - text_accuracy) <= 25, (top, text_accuracy)
    # IIS / AIS rank the own frame / own sound above the others (chance 50; same-class ties count half)
    assert at["IIS"] >= floor["IIS"] + 15 and at["AIS"] >= floor["AIS"] + 15, table
    assert at["IIS"] >= 60 and at["AIS"] >= 60, table
    # FID: AudioToken's pictures are distributed like the reference frames, the floor's are not
    assert at["FID"] < floor["FID"], table
    # files: images, manifest, results, contact sheet; progress reached the end
    out = tmp_path / "out"
    assert (out / "results.json").is_file() and (out / "results.md").is_file() and (out / "contact_sheet.png").is_file()
    assert len(list((out / "images").rglob("*.png"))) == 3 * len(items)
    assert steps[-1] == (3 * len(items) + 1, 3 * len(items) + 1)
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    # a rerun resumes: nothing is generated again, same numbers
    from audiotoken.audiotoken_core.evaluation.runner import EvalProtocol, EvalRunner

    again = EvalRunner(items, lwe.world_generator(learned), lwe.world_scorers(learned), out,
                       EvalProtocol(audio_seconds=lwe.WINDOW_SECONDS)).run()
    assert again.timings["images_generated"] == 0 and again.table == table


# --------------------------------------------------------------------------- the flow world, both objectives


@pytest.fixture(scope="module")
def flow_world(tmp_path_factory):
    """Built once per session (test_learn_world.py trains it into the same session cache)."""
    return lw.build_world(seed=0, prediction="flow",
                          cache_dir=tmp_path_factory.getbasetemp() / "learn_world_flow_cache")


@pytest.fixture(scope="module", params=["diffusion", "text_match"])
def flow_learned(request, flow_world, tmp_path_factory):
    """One training per objective per session."""
    return lwe.train_world_token(tmp_path_factory.mktemp(f"flow_{request.param}"), prediction="flow",
                                 objective=request.param, world=flow_world)


def test_audiotoken_learns_the_flow_world(flow_learned):
    from audiotoken.nodes import splice

    world, summary, objective = flow_learned.world, flow_learned.summary, flow_learned.objective
    assert world.prediction == "flow" and summary.status == "completed"
    history = summary.history
    part = "diffusion" if objective == "diffusion" else "text_match"
    other = "text_match" if objective == "diffusion" else "diffusion"
    assert all(h[other] == 0 for h in history) and all(h[part] > 0 for h in history)
    first, last = (sum(h[part] for h in chunk) / len(chunk) for chunk in (history[:10], history[-10:]))
    untrained = lwe.heldout_accuracy(flow_learned, flow_learned.untrained)
    trained = lwe.heldout_accuracy(flow_learned, flow_learned.token)
    with torch.no_grad():
        vectors = {k: e.eval()(flow_learned.heldout_features) for k, e in flow_learned.token.embedders.items()}
    matched = splice.encode_with_vectors(world.clip, lwe.PROMPT, lwe.PLACEHOLDER, vectors, "trained")
    ids = flow_learned.heldout["class_id"]
    matched_loss = world.denoising_loss(matched, ids.tolist(), seed=3, target="flow")
    shuffled_loss = world.denoising_loss(matched, ((ids + 1) % lw.K).tolist(), seed=3, target="flow")
    print(f"flow world, objective {objective}: untrained {untrained:.2f} trained {trained:.2f}  "
          f"{part} loss {first:.4f} -> {last:.4f}  velocity-MSE matched {matched_loss:.4f} shuffled "
          f"{shuffled_loss:.4f}  seconds {flow_learned.seconds}")
    assert last < first
    assert trained >= ACCURACY_BAR, (objective, trained, untrained)
    assert untrained <= UNTRAINED_MAX, untrained
    assert matched_loss < shuffled_loss
