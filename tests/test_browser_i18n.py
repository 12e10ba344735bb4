"""The pack's help pages and locales in the real frontend page (server, browser and page helpers from
tests/test_browser.py), on the frontend ComfyUI 0.3.75 pins and on test_browser.NEWER_FRONTEND.

- help: a user selects our node on the canvas and presses the selection toolbox's "info" button; the help
  panel shows web/docs/AudioTokenEncode.md rendered (its title, an input name, its picture loaded);
- locales: with the setting Comfy.Locale = zh / ja (set through the page's settings store, which saves it on
  the server, then a reload as after a restart), a new AudioTokenEncode node on the canvas carries the display
  name and input/widget labels of locales/<lang>/nodeDefs.json; setting "en" back gives the English names.
"""
from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import test_browser
from test_browser import APP, Page, _fit_view, _frontend_static, _newer_frontend_static

browser, page = test_browser.browser, test_browser.page  # fixtures: one Chromium, the page of `ui_server` below

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE = "AudioTokenEncode"
HELP_PAGE = REPO_ROOT / "web" / "docs" / f"{NODE}.md"
LOCALES = REPO_ROOT / "locales"
FRONTENDS = {"pinned": _frontend_static, "newer": _newer_frontend_static}


@pytest.fixture(scope="module", params=list(FRONTENDS))
def ui_server(request, tmp_path_factory):
    """A ComfyUI serving one of the two frontends with the pack (no models: nothing runs here)."""
    from tools.comfy_server import ComfyServer

    static = FRONTENDS[request.param]()
    base = tmp_path_factory.mktemp(f"comfy_i18n_{request.param}")
    server = ComfyServer(base, front_end_root=static, test_nodes=False)
    try:
        server.wait_ready()
        test_browser.as_fresh_user(server, {"Comfy.Locale": "en"})
        server.frontend = request.param
        yield server
    finally:
        server.stop()


def _add_node(p: Page) -> int:
    """A fresh AudioTokenEncode on an empty canvas, in view; its id."""
    node_id = p.js(f"""(cls) => {{
        {APP}.graph.clear();
        const node = window.LiteGraph.createNode(cls);
        node.pos = [100, 100]; {APP}.graph.add(node); {APP}.canvas.setDirty(true, true);
        return node.id;
    }}""", NODE)
    _fit_view(p, [node_id])
    return node_id


def _labels(p: Page, node_id: int) -> dict:
    """What the canvas shows for the node: its title and the label of each input slot and widget."""
    return p.js(f"""(id) => {{
        const n = {APP}.graph.getNodeById(id);
        const shown = (s) => s.label || s.localized_name || s.name;
        return {{title: n.title,
                 inputs: Object.fromEntries((n.inputs || []).map(s => [s.name, shown(s)])),
                 widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.label || w.name]))}};
    }}""", node_id)


def _help_text_expected() -> tuple[str, str]:
    """The help page's title (its first heading) and the name of its first listed input."""
    text = HELP_PAGE.read_text(encoding="utf-8")
    title = re.search(r"^# (.+)$", text, re.M).group(1).strip()
    first_input = re.search(r"^- \*\*(\w+)\*\*", text.split("## Inputs", 1)[1], re.M).group(1)
    return title, first_input


def test_help_page_opens_from_the_selection_toolbox(page, ui_server):
    title, first_input = _help_text_expected()
    assert title.startswith("AudioToken Encode") and first_input == "clip", (title, first_input)
    node_id = _add_node(page)
    # select the node as a user does: click its title bar
    box = page.js(f"""(id) => {{
        const n = {APP}.graph.getNodeById(id), c = {APP}.canvas, r = c.canvas.getBoundingClientRect();
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0] + 40, n.pos[1] - 15]);
        return [r.left + x, r.top + y];
    }}""", node_id)
    page.page.mouse.click(*box)
    page.page.wait_for_function(f"(id) => {APP}.canvas.selected_nodes?.[id]", arg=node_id, timeout=5_000)
    info = page.page.locator("[data-testid='info-button']:visible").first
    info.wait_for(timeout=10_000)
    with page.page.expect_response(lambda r: f"/extensions/audiotoken/docs/{NODE}" in r.url and r.ok,
                                   timeout=15_000):
        info.click()
    content = page.page.locator(".node-help-content:visible").first
    content.wait_for(timeout=15_000)
    page.page.wait_for_function(
        "(t) => [...document.querySelectorAll('.node-help-content')].some(e => e.innerText.includes(t))",
        arg=title, timeout=15_000)
    rendered = content.inner_text()
    heading = content.locator("h1").first.inner_text()
    assert heading.strip() == title, (heading, rendered[:400])
    assert first_input in rendered and "window_seconds" in rendered and "## Inputs" not in rendered, rendered[:800]
    # the page's picture (../help_images/encode_node.png) is fetched from the pack's web directory and decoded
    picture = content.locator("img").first
    picture.wait_for(timeout=10_000)
    page.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=picture.element_handle(),
                                timeout=10_000)
    size = picture.evaluate("(img) => [img.naturalWidth, img.naturalHeight, new URL(img.src).pathname]")
    assert size[:2] == list(_png_size(REPO_ROOT / "web" / "help_images" / "encode_node.png")), size
    assert size[2].endswith("/help_images/encode_node.png"), size
    page.shot(f"20_help_page_{ui_server.frontend}")
    _assert_no_errors_but_the_locale_probe(page)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def _assert_no_errors_but_the_locale_probe(p: Page):
    """The frontend asks for docs/<node>/<locale>.md first and falls back to docs/<node>.md: the 404 of that
    first look-up (and its console line) is the designed path, every other error from us fails."""
    probe = re.compile(rf"/extensions/audiotoken/docs/{NODE}/[A-Za-z-]+\.md\b")
    unexpected = [e for e in p.ours() if not (probe.search(e) and "404" in e)]
    assert not unexpected, "errors from the audiotoken extension:\n" + "\n".join(unexpected)


API_SET_LOCALE = f"((v) => {APP}.extensionManager.setting.set('Comfy.Locale', v))"


PINNED_LOCALE_BUG = (
    "frontend 1.32.9 loads a non-English locale lazily with i18n.global.setLocaleMessage(locale, core strings), which"
    " replaces the custom nodes' strings it merged from GET /i18n (core nodes are translated, ours stay English);"
    " newer frontends merge them again after the load (1.49.6, upstream's pin, and 1.58.1 pass)")


@pytest.mark.parametrize("locale", ["zh", "ja"])
def test_node_names_come_from_the_locale(request, browser, page, ui_server, locale):
    """Comfy.Locale = zh / ja, set in the page (saved on the server), then the page reloaded: a new node's
    title, input slot and widget labels are those of locales/<locale>/nodeDefs.json; "en" set back gives the
    English names again."""
    if ui_server.frontend == "pinned" and version("comfyui-frontend-package") == "1.32.9":  # 0.3.75's pin
        request.applymarker(pytest.mark.xfail(strict=True, reason=PINNED_LOCALE_BUG))
    expected = json.loads((LOCALES / locale / "nodeDefs.json").read_text(encoding="utf-8"))[NODE]
    english = json.loads((LOCALES / "en" / "nodeDefs.json").read_text(encoding="utf-8"))[NODE]
    want_audio, want_window = expected["inputs"]["audio"]["name"], expected["inputs"]["window_seconds"]["name"]
    assert expected["display_name"] != english["display_name"] and want_audio != "audio", expected
    # the server half: GET /i18n serves the pack's strings for this locale
    assert ui_server.get("/i18n")[locale]["nodeDefs"][NODE]["display_name"] == expected["display_name"]

    page.js(f"async () => {{ await {API_SET_LOCALE}('{locale}'); }}")
    assert ui_server.get("/settings/Comfy.Locale") == locale
    localized = Page(browser, ui_server)
    try:
        node_id = _add_node(localized)
        got = _labels(localized, node_id)
        core = localized.js("() => window.LiteGraph.createNode('KSampler').title")
        localized.page.wait_for_timeout(300)
        localized.shot(f"21_locale_{locale}_{ui_server.frontend}")
        errors = localized.ours()
    finally:
        localized.close()
        page.js(f"async () => {{ await {API_SET_LOCALE}('en'); }}")
    assert ui_server.get("/settings/Comfy.Locale") == "en"
    restored = Page(browser, ui_server)
    try:
        back = _labels(restored, _add_node(restored))
    finally:
        restored.close()
    assert back["title"] == english["display_name"] and back["widgets"]["window_seconds"] == "window_seconds", back

    assert core != "KSampler", core  # the page is in that locale (the frontend's own node names are)
    assert not errors, "errors from the audiotoken extension:\n" + "\n".join(errors)
    assert got["title"] == expected["display_name"], got
    assert got["inputs"]["audio"] == want_audio, got
    assert got["widgets"]["window_seconds"] == want_window, got
