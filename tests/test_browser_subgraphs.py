"""The subgraph blueprints (subgraphs/*.json) in the real frontend page, the one ComfyUI 0.3.75 pins (1.32.9) and the
newer one (test_browser.NEWER_FRONTEND); both load blueprints from GET /global_subgraphs.

Each blueprint is listed in the node search under its file name (and found by "audio to image"), and choosing it
adds ONE node with the blueprint's inputs (model, clip, vae, audiotoken, audio, and the widgets text and seed) and
its IMAGE output. What the page queues for that node (graphToPrompt, the blueprint's widget values changed) is
what tools.workflow_api makes of the page's own saved graph (tests/test_subgraphs.py runs that on the server).

Server, browser and page helpers from tests/test_browser.py, as tests/test_browser_timeline.py uses them.
"""
from __future__ import annotations

import pytest
import test_browser
from test_browser import APP, _assert_no_errors_from_us, open_node_search
from test_browser_search import search_list, ui_server  # noqa: F401 (fixture: a server per frontend)
from test_subgraphs import FLUX, INNER, INPUTS, SD15

from tools.workflow_api import convert

browser, page = test_browser.browser, test_browser.page  # fixtures: one Chromium, the page of `ui_server`

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]


def test_audio_to_image_lists_both_blueprints(page):
    page.js(f"() => {APP}.graph.clear()")
    listed = search_list(page, "audio to image")
    assert SD15 in listed and FLUX in listed, listed
    _assert_no_errors_from_us(page)


def _add_from_search(page, title: str) -> None:
    """Double-click the canvas, type the blueprint's name, take the first entry (Enter) and place it."""
    canvas = page.page.locator("#graph-canvas").bounding_box()
    x, y = canvas["x"] + canvas["width"] * 0.5, canvas["y"] + canvas["height"] * 0.5
    search = open_node_search(page, x, y)
    search.press_sequentially(title, delay=5)
    page.page.wait_for_function(
        "(t) => [...document.querySelectorAll(\"[role='option']\")][0]?.innerText.replace('\\u00a0', '').startsWith(t)"
        " || [...document.querySelectorAll(\"[role='option']\")][1]?.innerText.replace('\\u00a0', '').startsWith(t)",
        arg=title, timeout=10_000)
    page.page.wait_for_timeout(300)
    page.page.keyboard.press("Enter")
    page.page.wait_for_function(f"() => {APP}.graph._nodes.length === 1", timeout=10_000)
    if page.js(f"() => {APP}.canvas.state?.ghostNodeId != null"):  # frontends >= 1.44.4 place a ghost first
        page.page.mouse.click(x, y)


@pytest.mark.parametrize("title", [SD15, FLUX])
def test_blueprint_adds_as_one_node_and_queues_what_we_flatten(page, title):
    page.js(f"() => {APP}.graph.clear()")
    _add_from_search(page, title)
    node = page.js(f"""() => {{ const n = {APP}.graph._nodes[0];
        return {{title: n.title, subgraph: !!n.subgraph, type: n.type,
                 inputs: n.inputs.map(i => [i.name, i.type]), outputs: n.outputs.map(o => [o.name, o.type]),
                 widgets: (n.widgets || []).map(w => w.name)}}; }}""")
    assert node["title"] == title and node["subgraph"], node
    assert [tuple(i) for i in node["inputs"]] == INPUTS
    assert [tuple(o) for o in node["outputs"]] == [("IMAGE", "IMAGE")]
    assert node["widgets"] == ["text", "seed"]
    page.js(f"""() => {{ const n = {APP}.graph._nodes[0];
        n.widgets.find(w => w.name === 'text').value = 'a <audio> in the rain';
        n.widgets.find(w => w.name === 'seed').value = 42; {APP}.canvas.setDirty(true, true); }}""")
    page.page.wait_for_timeout(300)
    page.shot(f"blueprint_{'sd15' if title == SD15 else 'flux'}_{page.js('() => window.__COMFYUI_FRONTEND_VERSION__')}")

    saved = page.js(f"() => {APP}.graph.serialize()")
    sent = page.js(f"async () => (await {APP}.graphToPrompt()).output")
    ours, problems = convert(saved, page.server.get("/object_info"))
    assert all("has neither a link nor a value" in p for p in problems), problems  # nothing is wired to it here
    sent = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in sent.items()}
    assert sent == ours
    assert {v["class_type"] for v in sent.values()} == INNER[title]
    by_type = {v["class_type"]: v["inputs"] for v in sent.values()}
    assert by_type["AudioTokenEncode"]["text"] == "a <audio> in the rain" and by_type["KSampler"]["seed"] == 42
    _assert_no_errors_from_us(page)
