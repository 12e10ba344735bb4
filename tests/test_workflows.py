"""The example workflows in workflows/ on a REAL ComfyUI server (0.3.75).

Each UI-format workflow is checked against the server's /object_info (node types exist, widget
values are valid, links connect matching types), converted to the API format by our own code
(tools/workflow_api.py) and executed on the small generated models, with per-workflow widget
overrides for the files this machine has and for tiny sizes (64 x 64, 2 sampler steps, 2
training steps, a few video frames). Every workflow must make an image (the sound -> video ones: an
MP4 with its sound); the import workflow is run the way its note tells a user to (queue, refresh,
queue again); the evaluation workflow runs on a small tone set without metric models (every metric n/a).

The Flux.1, SD3.5 and Wan workflows (image and video) run on placeholder models of their family (tools.placeholder_dit):
full-size text encoders (T5-XXL, umT5-XXL) cannot be built here, so the one documented substitution is that every CLIP
the workflow's loader gives is taken from the test node `AudioTokenTest_TinyCLIP` of that family instead (ComfyUI's own
tokenizers and text-encoder classes at tiny depth, real widths); everything else runs as saved, at tiny sizes.

In the browser (marker browser), in the frontend ComfyUI pins and in a newer one: each workflow loads unchanged,
no two nodes overlap on the canvas or in the Nodes 2.0 (Vue) rendering, and the Missing Models panel names the
folder of every model file.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from audio_files import write_tone
from audiotoken_core.embedder import Embedder, EmbedderConfig
from audiotoken_core.speaker import GE2E
from audiotoken_core.token_file import AudioToken, load_audiotoken, save_audiotoken
from comfy_fixtures import (BEATS, CKPT, REFERENCE_BIN, TOKEN_SD15, sdxl_and_base_models,  # noqa: F401 (fixture)
                            write_eval_set)
import test_browser
from test_browser import NEWER_FRONTEND, browser  # noqa: F401 (fixture: one Chromium for both frontends)
from tools.comfy_server import execution_error
from tools.workflow_api import convert, format_problems

pytestmark = pytest.mark.comfyui

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SD15_SIMPLE = ["audiotoken_sd15_audio_to_image", "audiotoken_sd15_text_styling", "audiotoken_sd15_blend_two_sounds",
               "audiotoken_sd15_long_audio_windows"]
SDXL = "audiotoken_sdxl_audio_to_image"
TRAIN = "audiotoken_sd15_train_from_folder"
IMPORT = "audiotoken_import_reference"
EVALUATE = "audiotoken_sd15_evaluate"
VOICE = "audiotoken_sd15_voice_to_face"
# workflow -> the model family its loaders load (tools.placeholder_dit / tools.tiny_text_encoders names)
FAMILIES = {"audiotoken_flux_audio_to_image": "flux", "audiotoken_sd35_audio_to_image": "sd3",
            "audiotoken_wan_audio_to_video": "wan"}
# sound -> video: workflow -> its model family ("sd15": the session checkpoint) and the frames its tiny run makes
VIDEOS = {"audiotoken_sd15_music_video": ("sd15", 3), "audiotoken_flux_music_video": ("flux", 3),
          "audiotoken_wan_soundscape_video": ("wan", 9)}
ALL = [*SD15_SIMPLE, SDXL, TRAIN, IMPORT, EVALUATE, VOICE, *FAMILIES, *VIDEOS]
DATASET = "workflow_tones"
EVAL_SET = "workflow_eval_tones"

# What this machine has, and small sizes; applied to every node of the class.
COMMON = {"CheckpointLoaderSimple": {"ckpt_name": CKPT}, "AudioTokenEncoderLoader": {"encoder_name": BEATS},
          "AudioTokenLoader": {"audiotoken_name": TOKEN_SD15}, "LoadAudio": {"audio": "dog.mp3"},
          "KSampler": {"steps": 2}, "EmptyLatentImage": {"width": 64, "height": 64},
          "EmptySD3LatentImage": {"width": 64, "height": 64},
          "EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 5}}
# The video workflows at tiny sizes: 3 frames at 8 fps (sampled 2 + 1, or chained one by one as the Flux workflow
# saves it); Wan: 9 frames at 16 fps in context windows of 5 frames = 2 latent frames overlapping by 1, so the
# windows and their audio segments really change.
TINY_VIDEO = {"AudioTokenTimeline": {"fps": 8.0, "window_seconds": 1.0, "length_seconds": 0.375},
              "AudioTokenSampleFrames": {"steps": 2, "frames_per_batch": 2}}
TINY_WAN_VIDEO = {"AudioTokenTimeline": {"fps": 16.0, "window_seconds": 1.0, "length_seconds": 0.5625},
                  "AudioTokenVideoWindows": {"context_length": 5, "context_overlap": 4}}


def _overrides(**per_class: dict) -> dict:
    out = {k: dict(v) for k, v in COMMON.items()}
    for kind, values in per_class.items():
        out.setdefault(kind, {}).update(values)
    return out


def _load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _ok(entry: dict) -> dict:
    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    return entry


def _images(comfy, entry: dict) -> list[Path]:
    return [comfy.base / "output" / img["subfolder"] / img["filename"]
            for out in entry["outputs"].values() for img in out.get("images", [])]


def _convert_ok(comfy, name: str, overrides: dict) -> dict:
    prompt, problems = convert(_load(name), comfy.get("/object_info"), overrides)
    assert not problems, f"{name}: {problems}"
    return prompt


def test_every_example_workflow_is_there_with_note_thumbnail_and_frontend_format():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(ALL)
    for name in ALL:
        workflow = _load(name)
        assert any(n["type"] == "MarkdownNote" for n in workflow["nodes"]), f"{name} has no note"
        assert (WORKFLOWS / f"{name}.jpg").is_file(), f"{name} has no thumbnail (python -m tools.workflow_thumbnail)"
        assert not format_problems(workflow), f"{name}: {format_problems(workflow)}"


def test_format_check_wants_a_models_entry_with_folder_and_url_for_every_model_file():
    workflow = _load(IMPORT)
    loader = next(n for n in workflow["nodes"] if n["type"] == "AudioTokenLoader")
    entry = loader["properties"]["models"]
    assert entry == [{"name": loader["widgets_values"][0], "url": entry[0]["url"], "directory": "audiotoken"}]
    del loader["properties"]["models"]
    assert format_problems(workflow) == [
        f"node {loader['id']} (AudioTokenLoader): model file '{loader['widgets_values'][0]}' has no properties.models "
        "entry {name, url, directory}: the Missing Models panel would show its folder as Unknown"]
    loader["properties"]["models"] = [{"name": loader["widgets_values"][0], "url": "https://example.org/a"}]
    assert len(problems := format_problems(workflow)) == 1 and "lacks ['directory']" in problems[0], problems
    loader["properties"]["models"][0].update(directory="audiotoken", url="models/a.safetensors")
    assert len(problems := format_problems(workflow)) == 1 and "not an https:// address" in problems[0], problems


def test_format_check_wants_room_between_nodes():
    workflow = _load(SD15_SIMPLE[0])
    a, b = (next(n for n in workflow["nodes"] if n["type"] == t) for t in ("CheckpointLoaderSimple", "LoadAudio"))
    assert not format_problems(workflow)
    gap = (b["pos"][1] - 30) - (a["pos"][1] + a["size"][1])
    a["size"][1] += gap - 19  # 19 px apart, title bar included
    assert format_problems(workflow) == [f"nodes {a['id']} and {b['id']} overlap or are closer than 20 px"]

    workflow = _load(TRAIN)
    group = workflow["groups"][0]
    group["bounding"][3] = 1000  # node 4 (the dataset report) ends at 1080
    assert format_problems(workflow) == [f"node 4 sticks out of group {group['title']!r}"]


@pytest.mark.parametrize("name", SD15_SIMPLE)
def test_sd15_workflows_validate_and_run(comfy, name):
    entry = _ok(comfy.run(_convert_ok(comfy, name, COMMON)))
    images = _images(comfy, entry)
    assert images, f"{name} produced no image"
    for path in images:
        with Image.open(path) as img:
            assert img.size == (64, 64)


@pytest.fixture(scope="module")
def voice_models(comfy):
    """For the voice -> face workflow: a GE2E speaker encoder in Resemblyzer's file format with random weights, a
    random SD1.5 token made for its features (kind ge2e), and espeak-ng speech under the workflow's audio name."""
    models = comfy.base / "models"
    torch.manual_seed(7)
    torch.save({"step": 0, "model_state": GE2E().state_dict()}, models / "audio_encoders" / "ge2e_random.pt")
    token = AudioToken(embedders={"l": Embedder(EmbedderConfig(input_dim=256, output_dim=768))},
                       encoder={"kind": "ge2e", "layers": [1], "hidden_size": 256, "sample_rate": 16000},
                       description="random test token (GE2E speaker features)")
    save_audiotoken(models / "audiotoken" / "token_sd15_ge2e.safetensors", token)
    if shutil.which("espeak-ng") is None:
        pytest.fail("`espeak-ng` is not installed; install it with `apt-get install -y espeak-ng` (CI does)")
    audio = next(n for n in _load(VOICE)["nodes"] if n["type"] == "LoadAudio")["widgets_values"][0]
    subprocess.run(["espeak-ng", "-w", str(comfy.base / "input" / audio), "A voice becomes a face."], check=True)
    return _overrides(AudioTokenEncoderLoader={"encoder_name": "ge2e_random.pt"},
                      AudioTokenLoader={"audiotoken_name": "token_sd15_ge2e.safetensors"}, LoadAudio={"audio": audio})


def test_voice_workflow_validates_and_runs_on_a_speaker_encoder(comfy, voice_models):
    """The workflow as saved but for its model files: speech -> GE2E speaker vectors -> a ge2e token -> an image."""
    entry = _ok(comfy.run(_convert_ok(comfy, VOICE, voice_models)))
    images = _images(comfy, entry)
    assert len(images) == 1
    with Image.open(images[0]) as img:
        assert img.size == (64, 64)


def _sdxl_overrides(models) -> dict:
    ckpt, token, _ = models
    return _overrides(CheckpointLoaderSimple={"ckpt_name": ckpt}, AudioTokenLoader={"audiotoken_name": token})


def test_sdxl_workflow_validates_and_runs(comfy, sdxl_and_base_models):
    entry = _ok(comfy.run(_convert_ok(comfy, SDXL, _sdxl_overrides(sdxl_and_base_models)), timeout=600))
    images = _images(comfy, entry)
    assert len(images) == 1
    with Image.open(images[0]) as img:
        assert img.size == (64, 64)


def test_sdxl_workflow_conditions_both_text_encoders(comfy, sdxl_and_base_models):
    """SDXL cond is CLIP-L (768) ++ bigG (1280) = 2048 wide, pooled 1280 from bigG; both Embedders act."""
    prompt = _convert_ok(comfy, SDXL, _sdxl_overrides(sdxl_and_base_models))
    encode = next(k for k, v in prompt.items() if v["class_type"] == "AudioTokenEncode")
    graph = {k: v for k, v in prompt.items() if v["class_type"] not in ("KSampler", "VAEDecode", "SaveImage")}
    graph["cat"] = {"class_type": "LoadAudio", "inputs": {"audio": "cat.mp3"}}
    graph["encode_cat"] = {"class_type": "AudioTokenEncode",
                           "inputs": dict(prompt[encode]["inputs"], audio=["cat", 0])}
    for node, filename in ((encode, "sdxl_dog"), ("encode_cat", "sdxl_cat")):
        graph[f"save_{filename}"] = {"class_type": "AudioTokenTest_SaveConditioning",
                                     "inputs": {"conditioning": [node, 0], "filename": filename}}
    _ok(comfy.run(graph))
    dog, cat = (load_file(str(comfy.base / "output" / f"{f}.safetensors")) for f in ("sdxl_dog", "sdxl_cat"))
    assert dog["0.cond"].shape == (1, 77, 2048) and dog["0.pooled"].shape == (1, 1280)
    assert torch.isfinite(dog["0.cond"]).all() and torch.isfinite(dog["0.pooled"]).all()
    diff = (dog["0.cond"] - cat["0.cond"]).abs()
    assert diff[..., :768].max() > 1e-4, "the 'l' Embedder's vector did not reach CLIP-L"
    assert diff[..., 768:].max() > 1e-4, "the 'g' Embedder's vector did not reach OpenCLIP-bigG"
    assert (dog["0.pooled"] - cat["0.pooled"]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def family_overrides(comfy, family_models):
    """{family: loader overrides} for the placeholder files of tests/family_fixtures.py. Flux and Wan load the
    diffusion model and VAE files as they are; SD3.5 loads an all-in-one checkpoint, made here from the placeholder
    MMDiT and VAE with the key prefixes a checkpoint carries (no text encoders inside, as in Stability's own files)."""
    from safetensors.torch import save_file

    models = comfy.base / "models"
    overrides = {family: {"AudioTokenLoader": {"audiotoken_name": family_models[family].token},
                          "UNETLoader": {"unet_name": family_models[family].unet},
                          "VAELoader": {"vae_name": family_models[family].vae}} for family in FAMILIES.values()}
    sd3 = family_models["sd3"]
    checkpoint = models / "checkpoints" / "sd35_tiny.safetensors"
    mmdit = load_file(str(models / "diffusion_models" / sd3.unet))
    state = {f"model.diffusion_model.{k}": v for k, v in mmdit.items()}
    state.update({f"first_stage_model.{k}": v for k, v in load_file(str(models / "vae" / sd3.vae)).items()})
    save_file(state, str(checkpoint))
    overrides["sd3"]["CheckpointLoaderSimple"] = {"ckpt_name": checkpoint.name}
    yield overrides
    checkpoint.unlink()  # pytest keeps the last three sessions' folders: do not keep 160 MB each time


def _with_tiny_clip(workflow: dict, family: str) -> dict:
    """The workflow with every CLIP link coming from a new AudioTokenTest_TinyCLIP node of `family`, and the loaders
    that only gave CLIP (CLIPLoader, DualCLIPLoader, ...) removed; a checkpoint loader keeps its MODEL and VAE."""
    workflow = json.loads(json.dumps(workflow))
    tiny_id = workflow["last_node_id"] + 1
    clip_links = [link for link in workflow["links"] if link[5] == "CLIP"]
    assert clip_links, "the workflow has no CLIP link to substitute"
    sources = {link[1] for link in clip_links}
    for link in clip_links:
        link[1], link[2] = tiny_id, 0
    workflow["nodes"] = [n for n in workflow["nodes"]
                         if not (n["id"] in sources and {o["type"] for o in n["outputs"]} == {"CLIP"})]
    workflow["nodes"].append({"id": tiny_id, "type": "AudioTokenTest_TinyCLIP", "pos": [0, 0], "size": [1, 1],
                              "flags": {}, "order": 0, "mode": 0, "inputs": [],
                              "outputs": [{"name": "CLIP", "type": "CLIP", "links": [link[0] for link in clip_links]}],
                              "properties": {}, "widgets_values": []})
    return workflow


@pytest.mark.parametrize("name", FAMILIES)
def test_family_workflows_validate_and_run(comfy, family_overrides, name):
    """Each workflow as saved is valid on the server but for its model files; with the family's placeholder files and
    tiny CLIP it runs to its image (Flux.1, SD3.5) or its animated WEBP of 5 frames (Wan)."""
    family = FAMILIES[name]
    workflow = _load(name)
    _, problems = convert(workflow, comfy.get("/object_info"), _overrides(**family_overrides[family]))
    text_encoder_loaders = {f"node {n['id']} ({n['type']})" for n in workflow["nodes"]
                            if n["type"] in ("CLIPLoader", "DualCLIPLoader")}
    assert {p.split(":")[0] for p in problems} == text_encoder_loaders, problems  # their files are not here

    overrides = _overrides(AudioTokenTest_TinyCLIP={"family": family, "seed": 0}, **family_overrides[family])
    prompt, problems = convert(_with_tiny_clip(workflow, family), comfy.get("/object_info"), overrides)
    assert not problems, problems
    entry = _ok(comfy.run(prompt, timeout=600))
    images = _images(comfy, entry)
    assert len(images) == 1, images
    with Image.open(images[0]) as img:
        assert img.size == (64, 64)
        if family == "wan":
            assert images[0].suffix == ".webp" and img.n_frames == 5  # 5 frames -> 2 latent frames -> 5 again


def _saved_videos(comfy, entry: dict) -> list[Path]:
    return [path for path in _images(comfy, entry) if path.suffix == ".mp4"]


@pytest.mark.parametrize("name", VIDEOS)
def test_video_workflows_validate_and_write_an_mp4_with_sound(comfy, request, name):
    """Each sound -> video workflow as saved is valid on the server but for its model files; at tiny sizes (the one
    CLIP substitution of the family workflows) it writes an MP4 whose video stream has one frame per timeline frame
    and whose audio stream lasts as long as those frames."""
    import av

    family, frames = VIDEOS[name]
    workflow = _load(name)
    tiny = dict(TINY_WAN_VIDEO if family == "wan" else TINY_VIDEO)
    if family == "sd15":
        overrides = _overrides(**tiny)
    else:
        family_overrides = request.getfixturevalue("family_overrides")  # only these build the family models
        _, problems = convert(workflow, comfy.get("/object_info"), _overrides(**family_overrides[family]))
        text_encoder_loaders = {f"node {n['id']} ({n['type']})" for n in workflow["nodes"]
                                if n["type"] in ("CLIPLoader", "DualCLIPLoader")}
        assert {p.split(":")[0] for p in problems} == text_encoder_loaders, problems  # their files are not here
        workflow = _with_tiny_clip(workflow, family)
        overrides = _overrides(AudioTokenTest_TinyCLIP={"family": family, "seed": 0}, **family_overrides[family], **tiny)
    prompt, problems = convert(workflow, comfy.get("/object_info"), overrides)
    assert not problems, problems
    entry = _ok(comfy.run(prompt, timeout=600))
    timeline = next(k for k, v in prompt.items() if v["class_type"] == "AudioTokenTimeline")
    assert entry["outputs"][timeline]["audiotoken_timeline"][0]["frame_count"] == frames
    videos = _saved_videos(comfy, entry)
    assert len(videos) == 1, entry["outputs"]
    with av.open(str(videos[0])) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (64, 64)
        fps = tiny["AudioTokenTimeline"]["fps"]
        assert video.average_rate == fps
        assert sum(1 for _ in container.decode(video)) == frames
        assert abs(float(audio.duration * audio.time_base) - frames / fps) <= 1024 / audio.sample_rate


@pytest.fixture(scope="module")
def workflow_dataset(comfy):
    """Two labels x two audio + image pairs in input/audiotoken_datasets/workflow_tones."""
    root = comfy.base / "input" / "audiotoken_datasets" / DATASET
    for label, freq, colour in (("low", 300, (200, 30, 30)), ("high", 3000, (30, 30, 200))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            write_tone(root / label / f"{label}{i}.wav", freq * (1 + 0.1 * i))
            Image.new("RGB", (80, 48), colour).save(root / label / f"{label}{i}.png")
    return DATASET


def test_training_workflow_trains_and_the_new_token_draws(comfy, workflow_dataset):
    overrides = _overrides(
        AudioTokenDataset={"folder": workflow_dataset, "image_width": 64, "image_height": 64},
        AudioTokenTrain={"name": "workflow_trained", "steps": 2, "batch_size": 2, "save_every": 2})
    entry = _ok(comfy.run(_convert_ok(comfy, TRAIN, overrides), timeout=900))
    workflow = _load(TRAIN)
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert report.startswith(f"4 pairs in '{workflow_dataset}'"), report
    token = load_audiotoken(comfy.base / "models" / "audiotoken" / "workflow_trained.safetensors")
    assert token.widths == {"l": 768} and token.training_info["step"] == 2
    images = _images(comfy, entry)
    assert len(images) == 2  # the loss curve and the image drawn with the new token
    sizes = sorted(Image.open(p).size for p in images)
    assert (64, 64) in sizes


def test_import_workflow_imports_then_draws_after_a_refresh(comfy, sdxl_and_base_models):
    """Queue 1 imports (Load AudioToken is flagged: its file does not exist yet), refresh, queue 2 draws."""
    overrides = _overrides(AudioTokenEncoderLoader={"encoder_name": sdxl_and_base_models[2]})
    del overrides["AudioTokenLoader"]  # keep the workflow's own file name: the one the import writes
    workflow = _load(IMPORT)
    written = next(n for n in workflow["nodes"] if n["type"] == "AudioTokenLoader")["widgets_values"][0]
    importer = next(n for n in workflow["nodes"] if n["type"] == "AudioTokenImportReference")
    assert importer["widgets_values"] == [REFERENCE_BIN, written.removesuffix(".safetensors"), False]  # no overwrite
    target = comfy.base / "models" / "audiotoken" / written
    assert not target.exists()

    prompt, problems = convert(workflow, comfy.get("/object_info"), overrides)
    assert len(problems) == 1 and "AudioTokenLoader" in problems[0] and written in problems[0], problems
    status, body = comfy.queue(prompt)
    assert status == 200, body  # ComfyUI runs the valid outputs and reports the invalid ones
    loader = next(k for k, v in prompt.items() if v["class_type"] == "AudioTokenLoader")
    assert set(body["node_errors"]) == {loader}, body["node_errors"]
    entry = _ok(comfy.wait(body["prompt_id"]))
    preview = next(k for k, v in prompt.items() if v["class_type"] == "PreviewAny")
    assert entry["outputs"][preview]["text"] == [written]
    assert target.is_file() and load_audiotoken(target).widths == {"l": 768}

    # "Press r": the lists are read again, the name is now valid, and the import is a cache hit.
    entry = _ok(comfy.run(_convert_ok(comfy, IMPORT, overrides)))
    images = _images(comfy, entry)
    assert len(images) == 1
    cached = [data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    assert cached and str(importer["id"]) in cached[0]


@pytest.fixture(scope="module")
def workflow_eval_set(comfy, tmp_path_factory):
    """Two labels x two tones with random frames in input/audiotoken_eval/workflow_eval_tones."""
    tones = tmp_path_factory.mktemp("eval_tones")
    items = []
    for label, freq in (("low", 300), ("high", 3000)):
        for i in range(2):
            write_tone(tones / f"{label}{i}.wav", freq * (1 + 0.1 * i))
            items.append((label, tones / f"{label}{i}.wav"))
    write_eval_set(comfy.base / "input" / "audiotoken_eval" / EVAL_SET, items)
    return EVAL_SET


def test_evaluation_workflow_makes_the_table_and_the_contact_sheet(comfy, workflow_eval_set):
    """The paper's table (every metric n/a here: no metric models) with its three rows, and a saved contact sheet."""
    overrides = _overrides(AudioTokenEvaluate={"eval_set": workflow_eval_set, "name": "workflow_eval", "steps": 2,
                                               "width": 64, "height": 64, "max_items": 4, "sheet_rows": 4})
    entry = _ok(comfy.run(_convert_ok(comfy, EVALUATE, overrides), timeout=900))
    by_type = {n["type"]: str(n["id"]) for n in _load(EVALUATE)["nodes"]}
    table = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    header = table.splitlines()[0]
    assert all(metric in header for metric in ("AIC", "FID", "AIS", "IIS")), table
    for row in ("| AudioToken |", "| SD text label (topline) |", "| untrained token (floor) |"):
        assert row in table, table
    assert "4 items" in table and "n/a" in table and "pick inception" in table, table
    out = comfy.base / "output" / "audiotoken_eval" / "workflow_eval"
    assert (out / "results.md").is_file() and len(list((out / "images").rglob("*.png"))) == 3 * 4
    images = _images(comfy, entry)
    assert len(images) == 1, images
    with Image.open(images[0]) as sheet:
        assert sheet.size[0] > 5 * 64 and sheet.size[1] > 4 * 64  # 5 columns, 4 items


# --- the real frontend: the one ComfyUI 0.3.75 pins (1.32.9) and a newer one (test_browser.NEWER_FRONTEND) -------


def _model_entries(workflow: dict) -> dict[str, dict]:
    """File name -> the node's properties.models entry ({name, url, directory}) for every model file it names."""
    return {e["name"]: e for n in workflow["nodes"] for e in n.get("properties", {}).get("models", [])}


@contextlib.contextmanager
def _frontend_session(browser, base: Path, static: Path, cc0_recordings, model_files: bool):
    """A ComfyUI serving `static`, with the datasets, eval sets and audio the workflows pick (nothing is run), and,
    if `model_files`, an empty file for every model entry, in the folder the entry names."""
    from test_browser import Page
    from tools.comfy_server import ComfyServer

    server = ComfyServer(base, front_end_root=static, test_nodes=False)
    try:
        for name in ALL:
            workflow = _load(name)
            if model_files:
                for entry in _model_entries(workflow).values():
                    (server.base / "models" / entry["directory"]).mkdir(parents=True, exist_ok=True)
                    (server.base / "models" / entry["directory"] / entry["name"]).touch()
            for node in workflow["nodes"]:
                if node["type"] == "AudioTokenDataset":
                    (server.base / "input" / "audiotoken_datasets" / node["widgets_values"][0]).mkdir(parents=True, exist_ok=True)
                if node["type"] == "AudioTokenEvaluate":
                    (server.base / "input" / "audiotoken_eval" / node["widgets_values"][0]).mkdir(parents=True, exist_ok=True)
                if node["type"] == "LoadAudio":
                    name = node["widgets_values"][0]
                    recording = next((p for p in cc0_recordings if p.name == name), None)
                    if recording is None:  # not a CC0 recording (the voice workflow's voice.wav): a tone stands in
                        write_tone(server.base / "input" / name, 220.0)
                    else:
                        shutil.copy(recording, server.base / "input" / name)
        server.wait_ready()
        test_browser.as_fresh_user(server)
        page = Page(browser, server)
        try:
            yield page
        finally:
            page.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def frontend_page(browser, tmp_path_factory, cc0_recordings):
    """The frontend ComfyUI pins, every model file of the workflows present."""
    from test_browser import _frontend_static

    with _frontend_session(browser, tmp_path_factory.mktemp("comfy_workflow_ui"), _frontend_static(), cc0_recordings,
                           model_files=True) as page:
        yield page


@pytest.fixture(scope="module")
def newer_frontend_page(browser, tmp_path_factory, cc0_recordings):
    """The newer frontend, no model file present: each one is listed as missing."""
    from test_browser import _newer_frontend_static

    with _frontend_session(browser, tmp_path_factory.mktemp("comfy_workflow_ui_newer"), _newer_frontend_static(),
                           cc0_recordings, model_files=False) as page:
        yield page


def _overlaps(boxes: dict[str, list[float]]) -> list[str]:
    ids = sorted(boxes, key=int)
    found = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[a], boxes[b]
            dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                found.append(f"nodes {a} and {b} overlap by {dx:.0f} x {dy:.0f} px")
    return found


def _canvas_boxes(page) -> dict[str, list[float]]:
    """The loaded graph's node rectangles as the canvas (LiteGraph) draws them, title bars included."""
    from test_browser import APP

    return page.js(f"() => Object.fromEntries({APP}.graph._nodes.map(n => [String(n.id), [...n.getBounding()]]))")


def _vue_boxes(page, workflow: dict) -> dict[str, list[float]]:
    """Load the workflow in Nodes 2.0 (Vue) and return each node's DOM box in graph units: Vue nodes grow to their
    content, so most are taller than on the canvas."""
    from test_browser import APP

    # No level-of-detail drawing (below ~0.6 zoom): show the graph at 0.8 in a window large enough for all of it.
    page.js(f"""async (wf) => {{ await {APP}.loadGraphData(wf);
        const ds = {APP}.canvas.ds; ds.scale = 0.8; ds.offset[0] = 40; ds.offset[1] = 80;
        {APP}.canvas.setDirty(true, true); }}""",
            workflow)
    page.page.wait_for_function("(n) => document.querySelectorAll('[data-node-id]').length === n",
                                arg=len(workflow["nodes"]), timeout=20_000)
    # our audio previews are drawn (a decoded recording makes them taller), then the widgets settle
    page.page.wait_for_function(f"""() => {APP}.graph._nodes.filter(n => n.audiotokenPreview)
        .every(n => n.audiotokenPreview.state?.mono && !n.audiotokenPreview.frame)""", timeout=30_000)
    measure = f"""() => {{ const ds = {APP}.canvas.ds; const c = {APP}.canvas.canvas.getBoundingClientRect();
        return Object.fromEntries([...document.querySelectorAll('[data-node-id]')].map(e => {{
            const r = e.getBoundingClientRect();
            return [e.dataset.nodeId, [(r.x - c.x) / ds.scale - ds.offset[0], (r.y - c.y) / ds.scale - ds.offset[1],
                                       r.width / ds.scale, r.height / ds.scale]]; }})); }}"""
    # The widgets settle over a few frames (slower on a busy machine): measure until two measurements agree.
    boxes = None
    for _ in range(40):
        page.page.wait_for_timeout(150)
        boxes, previous = page.js(measure), boxes
        if boxes == previous:
            break
    return boxes


def _assert_no_overlaps_in_nodes_2(page):
    from test_browser import APP, VIEWPORT

    found = []
    page.page.set_viewport_size({"width": 2600, "height": 1700})
    page.js(f"async () => {{ await {APP}.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }}")
    try:
        for name in ALL:
            workflow = _load(name)
            boxes = _vue_boxes(page, workflow)
            assert sorted(boxes, key=int) == sorted((str(n["id"]) for n in workflow["nodes"]), key=int), name
            found += [f"{name} (Nodes 2.0): {o}" for o in _overlaps(boxes)]
    finally:
        page.js(f"async () => {{ await {APP}.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }}")
        page.page.set_viewport_size(VIEWPORT)
    assert not found, "\n".join(found)


@pytest.mark.browser
def test_no_nodes_overlap_in_nodes_2_of_the_pinned_frontend(frontend_page):
    """Nodes 2.0 (Vue, which draws most nodes taller) in the frontend ComfyUI 0.3.75 pins; the canvas rendering is
    checked by test_workflow_loads_unchanged_in_the_frontend_and_sends_what_we_convert."""
    _assert_no_overlaps_in_nodes_2(frontend_page)


@pytest.mark.browser
def test_no_nodes_overlap_in_nodes_2_of_the_newer_frontend(newer_frontend_page):
    """The same in the newer frontend, where loaders show their missing-model notice too."""
    assert newer_frontend_page.js("() => window.__COMFYUI_FRONTEND_VERSION__") == NEWER_FRONTEND
    _assert_no_overlaps_in_nodes_2(newer_frontend_page)


@pytest.mark.browser
def test_missing_models_panel_shows_the_folder_of_every_model_file(newer_frontend_page):
    """Nothing is installed: the Missing Models panel lists every model file under the folder its entry names
    (checkpoints, diffusion_models, text_encoders, vae, audio_encoders, audiotoken), none as "Unknown"."""
    from test_browser import APP

    page = newer_frontend_page
    for name in ALL:
        workflow = _load(name)
        expected = {file: entry["directory"] for file, entry in _model_entries(workflow).items()}
        assert expected, name
        page.js(f"async (wf) => {{ await {APP}.loadGraphData(wf); }}", workflow)
        page.page.locator("[data-testid='error-overlay-see-errors']").click(timeout=20_000)
        # a row: the file name (its title) over "<folder> · <size>", or over "Unknown"
        labels_js = """(names) => Object.fromEntries(names.map(name => {
            const text = [...document.querySelectorAll('[title]')].find(e => e.title === name)?.closest('span.flex-col');
            const label = text && text.children.length > 1 ? text.lastElementChild : null;
            return [name, label ? label.innerText.split(' · ')[0].trim() : null]; }))"""
        page.page.wait_for_function(f"(names) => Object.values(({labels_js})(names)).every(v => v)",
                                    arg=sorted(expected), timeout=20_000)
        shown = page.js(labels_js, sorted(expected))
        if name == TRAIN:
            page.shot("missing_models_panel")
        assert shown == expected, name
        page.page.keyboard.press("Escape")


def _set_values(node: dict) -> list:
    """A node's saved widget values without the trailing None of UI-only widgets (LoadAudio's player and upload
    button: frontend 1.32 saves two, 1.58 one). The frontend must keep these; it may append values for widgets of
    inputs a newer server added (upstream's CreateVideo bit_depth, SaveVideo's nested codec), whose prompt entries
    are compared with tools.workflow_api's below."""
    values = list(node.get("widgets_values") or [])
    while values and values[-1] is None:
        values.pop()
    return values


@pytest.mark.browser
@pytest.mark.parametrize("name", ALL)
def test_workflow_loads_unchanged_in_the_frontend_and_sends_what_we_convert(frontend_page, name):
    """The frontend keeps every widget value, grows no node, draws no two nodes over each other on the canvas
    (title bars included) and sends, apart from its own UI-only widgets, exactly the prompt tools.workflow_api makes."""
    from test_browser import APP

    workflow = _load(name)
    frontend_page.js(f"async (wf) => {{ await {APP}.loadGraphData(wf); }}", workflow)
    frontend_page.page.wait_for_timeout(500)
    saved = json.loads(frontend_page.js(f"() => JSON.stringify({APP}.graph.serialize())"))
    original = {n["id"]: n for n in workflow["nodes"]}
    for node in saved["nodes"]:
        mine = original[node["id"]]
        loaded, ours_saved = _set_values(node), _set_values(mine)
        assert loaded[:len(ours_saved)] == ours_saved, (node["id"], node["type"], node.get("widgets_values"))
        gained = len(loaded) > len(ours_saved)  # widgets of inputs a newer server added may make it taller
        assert node["size"] == mine["size"] or gained and node["size"][0] == mine["size"][0], \
            f"node {node['id']} ({node['type']}) grows to {node['size']} in the frontend"
    assert not _overlaps(_canvas_boxes(frontend_page)), _overlaps(_canvas_boxes(frontend_page))
    assert saved["version"] == workflow["version"] and saved["links"] == workflow["links"]
    sent = frontend_page.js(f"async () => (await {APP}.graphToPrompt()).output")
    ours, problems = convert(workflow, frontend_page.server.get("/object_info"))
    assert not problems, problems
    ui_only = {"LoadAudio": {"audioUI"}, "PreviewAny": {"preview"}}
    for node_id, node in sent.items():
        inputs = {k: v for k, v in node["inputs"].items() if k not in ui_only.get(node["class_type"], set())}
        assert {"class_type": node["class_type"], "inputs": inputs} == ours[node_id], node_id
    assert set(sent) == set(ours)
