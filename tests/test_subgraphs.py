"""The subgraph blueprints in subgraphs/ (audio -> image on SD1.5 and on Flux.1, each one node) on a REAL ComfyUI.

ComfyUI 0.3.75 has the subgraph manager (app/subgraph_manager.py, as upstream): it lists every
custom_nodes/*/subgraphs/*.json at GET /global_subgraphs and serves one at /global_subgraphs/{id}; the frontend
makes each a node named after its file. A blueprint is a workflow whose one node instantiates the one subgraph of
`definitions.subgraphs`. Each blueprint here validates against /object_info (node types, widget values, link
types), and, wired to loaders and flattened as the frontend queues it (tools.workflow_api.flatten), runs on the
placeholder models of the workflow tests. The browser side is tests/test_browser_subgraphs.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from comfy_fixtures import BEATS, CKPT, TOKEN_SD15
from test_workflows import family_overrides  # noqa: F401 (fixture: the Flux.1 placeholder files)
from tools.workflow_api import convert, flatten

pytestmark = pytest.mark.comfyui

SUBGRAPHS = Path(__file__).resolve().parent.parent / "subgraphs"
SD15 = "AudioToken Audio to Image (SD1.5)"
FLUX = "AudioToken Audio to Image (Flux.1)"
INPUTS = [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("audiotoken", "AUDIOTOKEN"), ("audio", "AUDIO"),
          ("text", "STRING"), ("seed", "INT")]
INNER = {SD15: {"AudioTokenEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode"},
         FLUX: {"AudioTokenEncode", "FluxGuidance", "ConditioningZeroOut", "EmptySD3LatentImage", "KSampler",
                "VAEDecode"}}
TINY = {"KSampler": {"steps": 2}, "EmptyLatentImage": {"width": 64, "height": 64},
        "EmptySD3LatentImage": {"width": 64, "height": 64}}


def _load(name: str) -> dict:
    return json.loads((SUBGRAPHS / f"{name}.json").read_text(encoding="utf-8"))


def _host(name: str, loaders: dict[int, tuple[str, list, list[str]]], feeds: list[tuple[int, int, int]],
          text="a photo of <audio>, test", seed=7) -> dict:
    """The blueprint's node (id 1, its widgets set to text and seed) fed by `loaders` {id: (type, widgets_values,
    output types)} through `feeds` [(loader id, its output slot, subgraph input slot)] and saved by SaveImage (id 20):
    the workflow a user builds around it."""
    wf = _load(name)
    node = wf["nodes"][0]
    node["widgets_values"] = [text, seed]
    for nid, (kind, values, outputs) in loaders.items():
        wf["nodes"].append({"id": nid, "type": kind, "inputs": [], "widgets_values": values, "mode": 0,
                            "outputs": [{"name": o, "type": o, "links": []} for o in outputs]})
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = []
    for k, (nid, out_slot, slot) in enumerate(feeds):
        kind = nodes[nid]["outputs"][out_slot]["type"]
        links.append([100 + k, nid, out_slot, 1, slot, kind])
        nodes[nid]["outputs"][out_slot]["links"].append(100 + k)
        node["inputs"][slot]["link"] = 100 + k
    wf["nodes"].append({"id": 20, "type": "SaveImage", "mode": 0, "widgets_values": ["blueprint"],
                        "inputs": [{"name": "images", "type": "IMAGE", "link": 200}], "outputs": []})
    links.append([200, 1, 0, 20, 0, "IMAGE"])
    node["outputs"][0]["links"] = [200]
    wf["links"] = links
    return wf


def _token_loaders(token: str) -> dict:
    """Load Audio Encoder (id 30) -> Load AudioToken (id 31), as in the example workflows; feed (31, 0, 3)."""
    return {30: ("AudioTokenEncoderLoader", [BEATS, "auto"], ["AUDIOTOKEN_ENCODER"]),
            31: ("AudioTokenLoader", [token, "deterministic"], ["AUDIOTOKEN"])}


def _link_token_loaders(wf: dict) -> dict:
    nodes = {n["id"]: n for n in wf["nodes"]}
    nodes[31]["inputs"] = [{"name": "audio_encoder", "type": "AUDIOTOKEN_ENCODER", "link": 300}]
    nodes[30]["outputs"][0]["links"] = [300]
    wf["links"].append([300, 30, 0, 31, 0, "AUDIOTOKEN_ENCODER"])
    return wf


def _one_image(comfy, entry: dict) -> Path:
    from tools.comfy_server import execution_error

    err = execution_error(entry)
    assert err is None, f"{err.get('exception_type')}: {err.get('exception_message')}\n{err.get('traceback')}"
    images = [comfy.base / "output" / i["subfolder"] / i["filename"]
              for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1, entry["outputs"]
    return images[0]


def test_each_blueprint_is_one_subgraph_node_with_the_inputs_the_frontend_reads():
    """What upstream's frontend requires of a blueprint (subgraphStore: the root graph is one node whose type is
    the id of a subgraph in definitions.subgraphs; its inputs and outputs make the node definition), and links
    inside the subgraph that its nodes and its input/output lists agree on."""
    assert sorted(p.stem for p in SUBGRAPHS.glob("*.json")) == sorted([SD15, FLUX])
    for name in (SD15, FLUX):
        wf = _load(name)
        assert wf["version"] == 0.4 and wf["links"] == []
        (node,) = wf["nodes"]
        (definition,) = wf["definitions"]["subgraphs"]
        assert node["type"] == definition["id"] and node["title"] == definition["name"] == name
        assert [(i["name"], i["type"]) for i in node["inputs"]] == INPUTS
        assert [(i["name"], i["type"]) for i in definition["inputs"]] == INPUTS
        assert [i["name"] for i in node["inputs"] if "widget" in i] == ["text", "seed"]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == [("IMAGE", "IMAGE")]
        assert [(o["name"], o["type"]) for o in definition["outputs"]] == [("IMAGE", "IMAGE")]
        assert wf["extra"]["BlueprintDescription"] == definition["description"] and definition["category"] == "AudioToken"
        assert {n["type"] for n in definition["nodes"]} == INNER[name]
        inner = {n["id"]: n for n in definition["nodes"]}
        for link in definition["links"]:
            o, t = link["origin_id"], link["target_id"]
            if o == -10:
                assert link["id"] in definition["inputs"][link["origin_slot"]]["linkIds"], link
            else:
                assert link["id"] in inner[o]["outputs"][link["origin_slot"]]["links"], link
            if t == -20:
                assert link["id"] in definition["outputs"][link["target_slot"]]["linkIds"], link
            else:
                assert inner[t]["inputs"][link["target_slot"]]["link"] == link["id"], link
        assert definition["state"]["lastLinkId"] >= max(lk["id"] for lk in definition["links"])
        assert definition["state"]["lastNodeId"] >= max(inner)


def test_server_lists_and_serves_the_blueprints(comfy):
    """GET /global_subgraphs: one entry per file, id sha256("custom_node" + path) as 0.3.75 and upstream make it,
    from our pack; GET /global_subgraphs/{id}: the file's text."""
    listed = comfy.get("/global_subgraphs")
    ours = {k: v for k, v in listed.items() if v["info"]["node_pack"] == "custom_nodes.audiotoken"}
    assert sorted(v["name"] for v in ours.values()) == sorted([SD15, FLUX])
    for key, entry in ours.items():
        assert entry["source"] == "custom_node" and "data" not in entry and "path" not in entry
        path = f"{comfy.base}/custom_nodes/audiotoken/subgraphs/{entry['name']}.json"
        assert key == hashlib.sha256(f"custom_node{path}".encode()).hexdigest()
        served = comfy.get(f"/global_subgraphs/{key}")
        assert served["data"] == (SUBGRAPHS / f"{entry['name']}.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [SD15, FLUX])
def test_every_inner_node_and_widget_validates_and_only_the_inputs_to_feed_are_missing(comfy, name):
    """The blueprint alone, flattened: its node types exist on the server, every saved widget value is valid, every
    inner link joins matching types; the only problems are the required inputs the user feeds from outside."""
    _, problems = convert(_load(name), comfy.get("/object_info"))
    fed = {"clip", "audio", "audiotoken", "model", "vae"}
    assert problems and all("has neither a link nor a value" in p for p in problems), problems
    assert {p.split("'")[1] for p in problems} == fed, problems


def test_flatten_names_inner_nodes_as_the_frontend_and_takes_the_promoted_widget_values():
    wf = _host(SD15, {10: ("CheckpointLoaderSimple", [CKPT], ["MODEL", "CLIP", "VAE"])}, [(10, 0, 0)],
               text="a <audio> bark", seed=123)
    flat, promoted = flatten(wf)
    ids = {n["id"]: n["type"] for n in flat["nodes"]}
    assert ids == {10: "CheckpointLoaderSimple", 20: "SaveImage", "1:1": "AudioTokenEncode", "1:2": "CLIPTextEncode",
                   "1:3": "EmptyLatentImage", "1:4": "KSampler", "1:5": "VAEDecode"}
    assert promoted == {"1:1": {"text": "a <audio> bark"}, "1:4": {"seed": 123}}
    model_link = next(lk for lk in flat["links"] if lk[1] == 10)
    assert model_link[3:] == ["1:4", 0, "MODEL"]
    image_link = next(lk for lk in flat["links"] if lk[3] == 20)
    assert image_link[1:3] == ["1:5", 0]


def test_sd15_blueprint_runs_as_one_node_on_the_placeholder_checkpoint(comfy):
    loaders = {10: ("CheckpointLoaderSimple", [CKPT], ["MODEL", "CLIP", "VAE"]),
               11: ("LoadAudio", ["dog.mp3", None, None], ["AUDIO"]), **_token_loaders(TOKEN_SD15)}
    wf = _link_token_loaders(_host(SD15, loaders, [(10, 0, 0), (10, 1, 1), (10, 2, 2), (31, 0, 3), (11, 0, 4)]))
    prompt, problems = convert(wf, comfy.get("/object_info"), TINY)
    assert not problems, problems
    assert prompt["1:1"]["inputs"]["text"] == "a photo of <audio>, test" and prompt["1:4"]["inputs"]["seed"] == 7
    assert prompt["1:1"]["inputs"]["clip"] == ["10", 1] and prompt["1:2"]["inputs"]["clip"] == ["10", 1]
    assert prompt["1:4"]["inputs"]["model"] == ["10", 0] and prompt["1:5"]["inputs"]["vae"] == ["10", 2]
    assert prompt["1:1"]["inputs"]["audiotoken"] == ["31", 0] and prompt["1:1"]["inputs"]["audio"] == ["11", 0]
    assert prompt["20"]["inputs"]["images"] == ["1:5", 0]
    with Image.open(_one_image(comfy, comfy.run(prompt))) as img:
        assert img.size == (64, 64)


def test_flux_blueprint_runs_as_one_node_on_the_flux_placeholders(comfy, family_overrides):  # noqa: F811
    """Flux.1 placeholders of the workflow tests: the diffusion model and VAE files as saved, and the one documented
    substitution, the tiny Flux CLIP of AudioTokenTest_TinyCLIP for DualCLIPLoader."""
    flux = family_overrides["flux"]
    loaders = {10: ("UNETLoader", [flux["UNETLoader"]["unet_name"], "default"], ["MODEL"]),
               11: ("AudioTokenTest_TinyCLIP", ["flux", 0], ["CLIP"]),
               12: ("VAELoader", [flux["VAELoader"]["vae_name"]], ["VAE"]),
               13: ("LoadAudio", ["dog.mp3", None, None], ["AUDIO"]),
               **_token_loaders(flux["AudioTokenLoader"]["audiotoken_name"])}
    wf = _link_token_loaders(_host(FLUX, loaders, [(10, 0, 0), (11, 0, 1), (12, 0, 2), (31, 0, 3), (13, 0, 4)]))
    prompt, problems = convert(wf, comfy.get("/object_info"), TINY)
    assert not problems, problems
    assert {v["class_type"] for k, v in prompt.items() if k.startswith("1:")} == INNER[FLUX]
    with Image.open(_one_image(comfy, comfy.run(prompt, timeout=600))) as img:
        assert img.size == (64, 64)
