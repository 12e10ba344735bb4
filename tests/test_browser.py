"""The web/ extension in a real browser: Debian's headless Chromium (driven by Playwright) against a
real ComfyUI server serving the frontend package it pins (comfyui-frontend-package).

Checks: the page loads with no console errors from our extension; every AudioToken node is found
in the node search and created; the audio preview decodes the Load Audio file and draws the
waveform + spectrogram, and dragging it moves start_seconds; the example workflow loads, queues
and its image shows on Save Image; progress messages draw the training loss chart.
Screenshots go to test-artifacts/browser/.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from comfy_fixtures import BEATS, BEATS_SMALL, CKPT, TOKEN_SD15, _token
from tools.comfy_server import ComfyServer

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
WORKFLOW = REPO_ROOT / "workflows" / "audiotoken_sd15_audio_to_image.json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"
SEARCH_INPUT = "input[role='combobox'][placeholder*='node' i]"
NEWER_FRONTEND = "1.58.1"  # scripts/setup_env.sh installs it beside the one ComfyUI pins


def _missing(what: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: run scripts/setup_env.sh (CI must run the browser tests)")
    pytest.skip(what)


def _frontend_static() -> Path:
    try:
        import comfyui_frontend_package
    except ImportError:
        _missing("comfyui-frontend-package is not installed")
    static = Path(list(comfyui_frontend_package.__path__)[0]) / "static"
    if not (static / "index.html").is_file():
        _missing(f"{static} has no index.html")
    return static


def _newer_frontend_static() -> Path:
    """The newer frontend (Nodes 2.0 as users run it, the Missing Models panel), served with --front-end-root."""
    static = Path(sys.prefix) / f"comfyui-frontend-{NEWER_FRONTEND}" / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        _missing(f"{static} is missing (scripts/setup_env.sh installs comfyui-frontend-package=={NEWER_FRONTEND})")
    return static


def as_fresh_user(server, settings: dict | None = None) -> None:
    """Save a fresh user's settings on the server before a page opens: no first-run template browser or minimap
    over the canvas, plus `settings` (e.g. {"Comfy.Locale": "en"})."""
    for key, value in {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, **(settings or {})}.items():
        server.request("POST", f"/settings/{key}", value)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, cc0_recordings):
    """A ComfyUI with the frontend, generated placeholder models and the CC0 dog/cat recordings."""
    from audiotoken_core.token_file import save_audiotoken
    from tools.placeholder_beats import write_placeholder_beats
    from tools.placeholder_sd import write_placeholder_sd15

    static = _frontend_static()
    base = tmp_path_factory.mktemp("comfy_ui")
    server = ComfyServer(base, front_end_root=static, test_nodes=False)
    try:
        models = base / "models"
        write_placeholder_sd15(models / "checkpoints" / CKPT)
        write_placeholder_beats(models / "audio_encoders" / BEATS, seed=1, **BEATS_SMALL)
        save_audiotoken(models / "audiotoken" / TOKEN_SD15, _token({"l": 768}, seed=2))
        for name in ("dog.mp3", "cat.mp3"):
            shutil.copy(next(p for p in cc0_recordings if p.name == name), base / "input" / name)
        server.wait_ready()
        as_fresh_user(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -r requirements-test.txt)")
    if not Path(CHROMIUM).is_file():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Page:
    """One loaded ComfyUI page with its console messages and page errors."""

    def __init__(self, browser, server: ComfyServer):
        self.server = server
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc.message}\n{exc.stack}"))
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("response", self._on_response)
        self.page.goto(server.url + "/", wait_until="load")
        # The startup spinner goes off only once the first workflow is loaded and the node types are final: newer
        # frontends redo both after the app exists, which would replace a graph a test has already built.
        self.page.wait_for_function(
            f"() => window.comfyAPI?.app?.app?.graph && {APP}.extensions?.some(e => e.name === 'audiotoken.audioPreview')"
            f" && {APP}.canvas && !{APP}.extensionManager?.spinner", timeout=90_000)
        self.page.wait_for_timeout(1500)  # let late dialogs/toasts appear, then close them
        self.page.keyboard.press("Escape")

    def _on_console(self, msg):
        if msg.type == "error":
            loc = msg.location or {}
            self.errors.append(f"console.error: {msg.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})")
        self.console.append(f"{msg.type}: {msg.text}")

    def _on_request_failed(self, request):
        # <audio> elements abort their own range requests when the source changes: not an error
        if "ERR_ABORTED" not in (request.failure or ""):
            self.errors.append(f"requestfailed: {request.url} {request.failure}")

    def _on_response(self, response):
        if response.status >= 400 and "/extensions/" in response.url:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def ours(self) -> list[str]:
        """Errors from our extension: its files, its names (all lower-case `audiotoken...`), or our nodes.

        Offline, the frontend's own registry look-ups (api.comfy.org, blocked by the page's CSP) name
        every node of a loaded workflow, core and ours alike: those are reported, not failed."""
        def from_us(e: str) -> bool:
            if "api.comfy.org" in e and ("Content Security Policy" in e or e.endswith(" csp")):
                return False
            return "/extensions/audiotoken" in e or "audiotoken" in e or "AudioToken" in e
        return [e for e in self.errors if from_us(e)]

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def shot(self, name: str, clip: dict | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), clip=clip)
        return path

    def close(self):
        self.context.close()


@pytest.fixture(scope="module")
def page(browser, ui_server):
    p = Page(browser, ui_server)
    yield p
    ours = set(p.ours())
    others = [e for e in p.errors if e not in ours]
    if others:
        print("\nconsole/page errors not from our extension:\n  " + "\n  ".join(others[:30]))
    p.close()


def _assert_no_errors_from_us(page: Page):
    assert not page.ours(), "errors from the audiotoken extension:\n" + "\n".join(page.ours())


def _node_defs(server: ComfyServer) -> dict[str, dict]:
    info = server.get("/object_info")
    return {k: v for k, v in info.items() if v.get("python_module", "").endswith("audiotoken")}


def _workflow(**audio_widgets) -> dict:
    """The example workflow with the test's tiny models, 2 steps, 64x64."""
    wf = json.loads(WORKFLOW.read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["CheckpointLoaderSimple"]["widgets_values"][0] = CKPT
    by_type["AudioTokenEncoderLoader"]["widgets_values"][0] = BEATS
    by_type["AudioTokenLoader"]["widgets_values"][0] = TOKEN_SD15
    by_type["EmptyLatentImage"]["widgets_values"][:2] = [64, 64]
    ks = by_type["KSampler"]["widgets_values"]
    ks[2] = 2  # steps
    enc = by_type["AudioTokenEncode"]["widgets_values"]
    for name, value in audio_widgets.items():
        enc[{"start_seconds": 2, "window_seconds": 3, "loop_short_audio": 5}[name]] = value
    return wf


def _load_workflow(page: Page, wf: dict):
    """Load through the app; then push down nodes that our (taller) audio nodes now overlap."""
    page.js(f"async (wf) => {{ await {APP}.loadGraphData(wf); }}", wf)
    page.page.wait_for_timeout(300)
    page.js(f"""() => {{
        const g = {APP}.graph;
        for (const n of g._nodes.filter(n => n.audiotokenPreview)) {{
            const overlaps = (m) => m !== n && m.pos[0] < n.pos[0] + n.size[0] && m.pos[0] + m.size[0] > n.pos[0];
            const below = g._nodes.filter(m => overlaps(m) && m.pos[1] > n.pos[1]);
            if (!below.length) continue;
            const top = Math.min(...below.map(m => m.pos[1]));
            const dy = n.pos[1] + n.size[1] + 60 - top;
            if (dy > 0) for (const m of below) m.pos[1] += dy;
        }}
        {APP}.canvas.setDirty(true, true);
    }}""")


def _node_id(page: Page, comfy_class: str) -> int:
    return page.js(f"(c) => {APP}.graph._nodes.find(n => n.comfyClass === c)?.id ?? null", comfy_class)


def _wait_preview_decoded(page: Page, node_id: int):
    page.page.wait_for_function(
        f"(id) => {{ const p = {APP}.graph.getNodeById(id)?.audiotokenPreview; return p?.state?.mono && !p.frame; }}",
        arg=node_id, timeout=30_000)  # decoded, and no drawing pending


def _canvas_stats(page: Page, selector_script: str) -> dict:
    """Distinct colours and non-background pixels of a canvas found by the script."""
    return page.js(f"""() => {{
        const c = {selector_script};
        if (!c) return null;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const colours = new Set(); let lit = 0;
        for (let i = 0; i < d.length; i += 4) {{
            colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
            if (Math.abs(d[i] - 0x11) + Math.abs(d[i + 1] - 0x18) + Math.abs(d[i + 2] - 0x1d) > 30) lit++;
        }}
        const r = c.getBoundingClientRect();
        return {{colours: colours.size, lit, total: d.length / 4, visible: r.width > 0 && r.height > 0,
                 rect: [r.left, r.top, r.width, r.height]}};
    }}""")


def _fit_view(page: Page, node_ids: list[int], margin: float = 40.0) -> dict:
    """Zoom/pan so these nodes fill the view; returns the screen rectangle that holds them."""
    return page.js(f"""(ids) => {{
        const app = {APP}; const ds = app.canvas.ds;
        const nodes = ids.map(id => app.graph.getNodeById(id));
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of nodes) {{
            const title = 30;
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }}
        const el = app.canvas.canvas.getBoundingClientRect();
        // keep clear of the side bar, the top menu/banner and the run button
        const area = {{left: 80, top: 130, width: el.width - 110, height: el.height - 160}};
        const scale = Math.min(1.25, area.width / (x1 - x0), area.height / (y1 - y0));
        ds.scale = scale;
        ds.offset[0] = (area.left + (area.width - (x1 - x0) * scale) / 2) / scale - x0;
        ds.offset[1] = (area.top + (area.height - (y1 - y0) * scale) / 2) / scale - y0;
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const m = {margin};
        return {{x: Math.max(0, el.left + (x0 + ds.offset[0]) * scale - m), y: Math.max(0, el.top + (y0 + ds.offset[1]) * scale - m),
                 width: (x1 - x0) * scale + 2 * m, height: (y1 - y0) * scale + 2 * m}};
    }}""", node_ids)


# ---------------------------------------------------------------------------------------


def test_page_loads_with_our_extensions_and_no_errors_from_them(page):
    names = page.js(f"() => {APP}.extensions.map(e => e.name)")
    for name in ("audiotoken.nodeColors", "audiotoken.audioPreview", "audiotoken.lossChart"):
        assert name in names
    page.shot("01_page_loaded")
    _assert_no_errors_from_us(page)


def open_node_search(page: "Page", x: float, y: float):
    """Double-click the canvas at (x, y) as a user does and return the node search box once it is open."""
    search = page.page.locator(SEARCH_INPUT + ":visible").first
    for _attempt in range(3):  # a double-click right after the previous search closed may be missed
        page.page.mouse.move(x, y)
        page.page.wait_for_timeout(250)
        page.page.mouse.dblclick(x, y)
        try:
            search.wait_for(timeout=3_000)
            break
        except Exception:
            continue
    search.wait_for(timeout=1_000)
    return search


def test_every_node_is_found_in_the_node_search_and_created(page, ui_server):
    defs = _node_defs(ui_server)
    assert len(defs) >= 10, sorted(defs)
    page.js(f"() => {APP}.graph.clear()")
    canvas = page.page.locator("#graph-canvas")
    box = canvas.bounding_box()
    created = []
    # Always double-click the same empty spot; each created node is then moved off that spot.
    x, y = box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.45
    for i, (cls, d) in enumerate(sorted(defs.items())):
        # 1.32.9: "Search Nodes..."; 1.4x default search box: "Add a node..." (both role=combobox)
        search = open_node_search(page, x, y)
        search.press_sequentially(d["display_name"], delay=5)
        option = page.page.locator("[role='option']:visible").first
        option.wait_for(timeout=10_000)
        page.page.wait_for_timeout(300)  # the list settles on the final query
        if i == 0:
            page.shot("02a_node_search")
        page.page.keyboard.press("Enter")
        page.page.wait_for_function(f"(c) => {APP}.graph._nodes.some(n => n.comfyClass === c)", arg=cls, timeout=10_000)
        page.page.locator(SEARCH_INPUT).first.wait_for(state="hidden", timeout=10_000)
        # Frontend >= 1.44.4 (Comfy.NodeSearchBoxImpl.FollowCursor, on by default): the new node is a "ghost"
        # that follows the pointer until a click places it (1.32.9 has no ghost placement: nothing to do).
        if page.js(f"() => {APP}.canvas.state?.ghostNodeId != null"):
            page.page.mouse.click(x, y)
        page.js(f"""([c, i]) => {{ const n = {APP}.graph._nodes.find(n => n.comfyClass === c);
            n.pos = [(i % 4) * 420, Math.floor(i / 4) * 520 - 5000]; {APP}.canvas.setDirty(true, true); }}""", [cls, i])
        created.append(cls)
    ids = page.js(f"() => {{ for (const n of {APP}.graph._nodes) n.pos[1] += 5000; return {APP}.graph._nodes.map(n => n.id); }}")
    _fit_view(page, ids)
    assert sorted(created) == sorted(defs)
    # our widgets exist on the nodes that should have them
    widgets = page.js(f"""() => Object.fromEntries({APP}.graph._nodes.map(n => [n.comfyClass,
        (n.widgets || []).map(w => w.name)]))""")
    for cls in ("AudioTokenEncode", "AudioTokenEmbedAudio", "AudioTokenEmbedWindows"):
        assert "audiotoken_preview" in widgets[cls], widgets[cls]
    assert "audiotoken_loss_chart" in widgets["AudioTokenTrain"]
    colours = page.js(f"() => {APP}.graph._nodes.map(n => n.bgcolor)")
    assert set(colours) == {"#1c3342"}, colours
    page.page.wait_for_timeout(300)
    page.shot("02_all_nodes_from_search")
    _assert_no_errors_from_us(page)


def test_audio_preview_draws_and_dragging_moves_start(page):
    _load_workflow(page, _workflow(start_seconds=0.0, window_seconds=2.0))
    enc = _node_id(page, "AudioTokenEncode")
    load = _node_id(page, "LoadAudio")
    clip = _fit_view(page, [load, enc])
    _wait_preview_decoded(page, enc)
    node_canvas = f"{APP}.graph.getNodeById({enc}).audiotokenPreview.canvas"
    stats = _canvas_stats(page, node_canvas)
    assert stats and stats["visible"], stats
    assert stats["colours"] > 50 and stats["lit"] > stats["total"] * 0.2, stats  # waveform + spectrogram drawn
    page.shot("03_audio_preview", clip=clip)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    state = page.js(f"() => {{ const p = {APP}.graph.getNodeById({enc}).audiotokenPreview;"
                    " return {duration: p.state.duration, windows: p.state.windows}; }")
    assert state["windows"] == [{"start": 0, "length": 2}]
    assert state["duration"] > 2.0, state
    # Drag the window from its middle to the right by a quarter of the waveform's width.
    x, y, w, h = stats["rect"]
    wave_y = y + 6 + (h - 12 - 16) * 0.38 / 2
    span = state["duration"]
    grab_x = x + 6 + (1.0 / span) * (w - 12)
    page.page.mouse.move(grab_x, wave_y)
    page.page.mouse.down()
    page.page.mouse.move(grab_x + (w - 12) * 0.25, wave_y, steps=6)
    page.page.mouse.up()
    start = page.js(f"() => {APP}.graph.getNodeById({enc}).widgets.find(w => w.name === 'start_seconds').value")
    assert start == pytest.approx(span * 0.25, abs=0.25), (start, span)
    windows = page.js(f"() => {APP}.graph.getNodeById({enc}).audiotokenPreview.state.windows")
    assert windows[0]["start"] == pytest.approx(start)
    # the value reaches the prompt sent to the server
    api_prompt = page.js(f"async () => (await {APP}.graphToPrompt()).output")
    assert api_prompt[str(enc)]["inputs"]["start_seconds"] == pytest.approx(start)
    page.page.wait_for_timeout(200)
    page.shot("04_audio_preview_dragged", clip=clip)

    # a window past the end of a short clip shows the loop
    page.js(f"() => {{ const n = {APP}.graph.getNodeById({enc});"
            " n.widgets.find(w => w.name === 'start_seconds').value = 0;"
            " n.widgets.find(w => w.name === 'window_seconds').value = 30; n.setDirtyCanvas(true, true); }")
    page.page.wait_for_function(
        f"() => {APP}.graph.getNodeById({enc}).audiotokenPreview.state.windows?.[0]?.length === 30", timeout=10_000)
    page.page.wait_for_timeout(200)
    page.shot("05_audio_preview_looped", clip=_fit_view(page, [load, enc]))

    # choosing another file upstream redraws (cat.mp3 is not as long as dog.mp3)
    dog = page.js(f"() => {APP}.graph.getNodeById({enc}).audiotokenPreview.state.duration")
    page.js(f"() => {{ const w = {APP}.graph.getNodeById({load}).widgets.find(w => w.name === 'audio');"
            f" w.value = 'cat.mp3'; w.callback?.(w.value); {APP}.canvas.setDirty(true, true); }}")
    page.page.wait_for_function(
        f"(d) => {{ const s = {APP}.graph.getNodeById({enc}).audiotokenPreview.state;"
        " return s.mono && Math.abs(s.duration - d) > 0.05; }", arg=dog, timeout=30_000)
    # and unplugging the audio clears it
    page.js(f"() => {APP}.graph.getNodeById({enc}).disconnectInput("
            f"{APP}.graph.getNodeById({enc}).inputs.findIndex(i => i.name === 'audio'))")
    page.page.wait_for_function(f"() => !{APP}.graph.getNodeById({enc}).audiotokenPreview.state.mono", timeout=10_000)
    _assert_no_errors_from_us(page)


def test_embed_windows_highlights_every_window(page):
    wf = _workflow()
    page.js(f"async (wf) => {{ await {APP}.loadGraphData(wf); }}", wf)
    ids = page.js(f"""() => {{
        const app = {APP}; const LG = window.LiteGraph;
        const load = app.graph._nodes.find(n => n.comfyClass === 'LoadAudio');
        const node = LG.createNode('AudioTokenEmbedWindows');
        node.pos = [load.pos[0] + 420, load.pos[1] + 700];
        app.graph.add(node);
        node.widgets.find(w => w.name === 'window_seconds').value = 1;
        node.widgets.find(w => w.name === 'hop_seconds').value = 1;
        load.connect(0, node, node.inputs.findIndex(i => i.name === 'audio'));
        return [load.id, node.id];
    }}""")
    _wait_preview_decoded(page, ids[1])
    page.page.wait_for_function(
        f"(id) => ({APP}.graph.getNodeById(id).audiotokenPreview.state.windows || []).length > 1",
        arg=ids[1], timeout=10_000)
    state = page.js(f"(id) => {{ const s = {APP}.graph.getNodeById(id).audiotokenPreview.state;"
                    " return {duration: s.duration, windows: s.windows}; }", ids[1])
    assert len(state["windows"]) == int(state["duration"] // 1), state
    page.shot("06_embed_windows", clip=_fit_view(page, ids))
    _assert_no_errors_from_us(page)


def test_workflow_loads_queues_and_its_image_shows(page, ui_server):
    _load_workflow(page, _workflow(start_seconds=1.0, window_seconds=4.0))
    save = _node_id(page, "SaveImage")
    enc = _node_id(page, "AudioTokenEncode")
    before = len(ui_server.get("/history"))
    page.js(f"async () => {{ await {APP}.queuePrompt(0, 1); }}")
    page.page.wait_for_function(f"(id) => ({APP}.graph.getNodeById(id).imgs || []).length > 0 "
                                f"&& {APP}.graph.getNodeById(id).imgs[0].complete", arg=save, timeout=240_000)
    # the image reaches the page with the "executed" message, a moment before the history entry is written
    deadline = time.time() + 60
    while len(history := ui_server.get("/history")) == before and time.time() < deadline:
        time.sleep(0.25)
    assert len(history) == before + 1
    entry = list(history.values())[-1]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"][str(save)]["images"]
    assert images and images[0]["filename"].startswith("audiotoken")
    width = page.js(f"(id) => {APP}.graph.getNodeById(id).imgs[0].naturalWidth", save)
    assert width == 64
    page.shot("07_workflow_ran", clip=_fit_view(page, [_node_id(page, "LoadAudio"), enc, save]))

    # A compact view for the README (docs/figures/ui_audiotoken_nodes.png is copied from it):
    # the recording, the window the token hears with its spectrogram, and the image.
    ids = page.js(f"""([enc, save]) => {{
        const g = {APP}.graph; const e = g.getNodeById(enc); const s = g.getNodeById(save);
        const keep = new Set(['LoadAudio', 'AudioTokenEncode', 'SaveImage', 'AudioTokenEncoderLoader', 'AudioTokenLoader']);
        for (const n of g._nodes) if (!keep.has(n.comfyClass)) n.pos[0] += 4000;
        s.pos = [e.pos[0] + e.size[0] + 50, e.pos[1]]; s.size = [300, e.size[1]];
        g.setDirtyCanvas(true, true);
        return g._nodes.filter(n => keep.has(n.comfyClass)).map(n => n.id);
    }}""", [enc, save])
    page.page.wait_for_timeout(300)
    page.shot("09_figure_audiotoken_nodes", clip=_fit_view(page, ids, margin=28))

    # The run sent the window the token heard; without a Load Audio file the preview shows that.
    assert page.js(f"() => {APP}.graph.getNodeById({enc}).audiotokenPreview.serverPreview?.type") == "temp"
    page.js(f"() => {{ const g = {APP}.graph; g.remove(g._nodes.find(n => n.comfyClass === 'LoadAudio')); }}")
    page.page.wait_for_function(
        f"() => {{ const s = {APP}.graph.getNodeById({enc}).audiotokenPreview.state;"
        " return s.mono && s.caption.includes('last run'); }", timeout=30_000)
    duration = page.js(f"() => {APP}.graph.getNodeById({enc}).audiotokenPreview.state.duration")
    assert duration == pytest.approx(4.0, abs=0.05)
    page.page.wait_for_timeout(200)
    page.shot("07b_preview_from_last_run", clip=_fit_view(page, [enc]))
    _assert_no_errors_from_us(page)


@pytest.mark.parametrize("start, window, channels", [(1.0, 3.0, "mix"), (0.0, 10.0, "first")])
def test_encode_sends_the_window_it_heard_as_ui_output(ui_server, start, window, channels):
    """Over HTTP: the UI output names a temp FLAC holding exactly the window (16 kHz mono, looped)."""
    import urllib.parse
    import urllib.request

    import av
    import numpy as np

    from comfy_fixtures import graph

    entry = ui_server.run(graph(start=start, window=window, channels=channels, save="image"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["encode"]["audiotoken_window"]
    assert len(saved) == 1 and saved[0]["type"] == "temp" and saved[0]["filename"].endswith(".flac")
    assert saved[0]["start_seconds"] == start and saved[0]["window_seconds"] == window
    query = urllib.parse.urlencode({k: saved[0][k] for k in ("filename", "subfolder", "type")})
    data = urllib.request.urlopen(f"{ui_server.url}/view?{query}", timeout=30).read()
    with av.open(__import__("io").BytesIO(data)) as container:
        stream = container.streams.audio[0]
        # mono; ComfyUI 0.3.75's FLAC writer gives every file a stereo layout (both channels equal)
        assert stream.rate == 16000 and stream.channels in (1, 2)
        frames = np.concatenate([f.to_ndarray().reshape(-1, stream.channels) for f in container.decode(stream)])
    assert np.array_equal(frames[:, 0], frames[:, -1])
    samples = frames[:, 0] / (np.iinfo(frames.dtype).max + 1.0 if frames.dtype.kind == "i" else 1.0)
    assert len(samples) == round(window * 16000)  # dog.mp3 is 6 s: the 10 s window is the loop
    assert np.abs(samples).max() > 0.01


def test_loss_chart_draws_progress_messages(page):
    page.js(f"() => {APP}.graph.clear()")
    node_id = page.js(f"""() => {{
        const node = window.LiteGraph.createNode('AudioTokenTrain');
        node.pos = [100, 100]; {APP}.graph.add(node); return node.id;
    }}""")
    chart = f"{APP}.graph.getNodeById({node_id}).audiotokenLossChart"
    # 5000 messages for our node (and some for another node, which must be ignored)
    page.js(f"""() => {{
        const api = {API};
        for (let s = 1; s <= 5000; s++) {{
            const loss = 0.2 + 0.8 * Math.exp(-s / 900) + 0.02 * Math.sin(s);
            api.dispatchEvent(new CustomEvent('audiotoken.train_progress',
                {{detail: {{node: String({node_id}), step: s, steps: 5000, loss, diffusion: loss - 0.05}}}}));
            api.dispatchEvent(new CustomEvent('audiotoken.train_progress',
                {{detail: {{node: '99999', step: s, steps: 5000, loss: 100, diffusion: 100}}}}));
        }}
    }}""")
    info = page.js(f"() => {{ const c = {chart}; return {{count: c.count, last: c.latest, total: c.totalSteps}}; }}")
    assert info["last"]["step"] == 5000 and info["total"] == 5000
    assert 0 < info["count"] <= 2048
    assert info["last"]["loss"] < 1.0  # the other node's messages were not taken
    page.page.wait_for_function(f"() => !{chart}._frame", timeout=10_000)  # drawn
    stats = _canvas_stats(page, f"{chart}.canvas")
    assert stats and stats["visible"] and stats["colours"] > 5 and stats["lit"] > 200, stats
    page.shot("08_loss_chart", clip=_fit_view(page, [node_id]))
    # a new run (step back at 1) starts a fresh chart; a removed node's chart stops listening
    page.js(f"() => {API}.dispatchEvent(new CustomEvent('audiotoken.train_progress',"
            f" {{detail: {{node: String({node_id}), step: 1, steps: 10, loss: 0.5, diffusion: 0.4}}}}))")
    assert page.js(f"() => {chart}.count") == 1
    page.js(f"""() => {{ const g = {APP}.graph; const n = g.getNodeById({node_id}); g.remove(n);
        {API}.dispatchEvent(new CustomEvent('audiotoken.train_progress',
            {{detail: {{node: String({node_id}), step: 2, steps: 10, loss: 0.5, diffusion: 0.4}}}})); }}""")
    page.page.wait_for_timeout(200)
    _assert_no_errors_from_us(page)


def test_audio_helpers_in_the_browser(page):
    """The extension's own DSP and URL helpers, run in the page: FFT peak of a sine, tiling, /view URLs."""
    result = page.js("""async () => {
        const m = await import('/extensions/audiotoken/js/audiotoken_audio.js');
        const rate = 16000, n = rate;
        const sine = new Float32Array(n).map((_, i) => Math.sin(2 * Math.PI * 1000 * i / rate));
        const spec = m.audiotokenSpectrogram(sine, rate, {fftSize: 1024, maxFrames: 8});
        const peaks = [];
        for (let f = 0; f < spec.frames; f++) {
            let best = 0;
            for (let b = 1; b < spec.bins; b++) if (spec.db[f * spec.bins + b] > spec.db[f * spec.bins + best]) best = b;
            peaks.push(best * rate / 1024);
        }
        const clip = new Float32Array([1, 2, 3]);
        return {
            peaks, bins: spec.bins, frames: spec.frames,
            looped: Array.from(m.audiotokenWindowSamples(clip, 1, 2, 5, true)),
            padded: Array.from(m.audiotokenWindowSamples(clip, 1, 2, 5, false)),
            maxStart: [m.audiotokenMaxStart(6, true), m.audiotokenMaxStart(12, true), m.audiotokenMaxStart(6, false)],
            plain: m.audiotokenViewPath(m.audiotokenParseFileValue('dog.mp3')),
            nested: m.audiotokenViewPath(m.audiotokenParseFileValue('my sounds/a&b=c.wav [output]')),
            empty: m.audiotokenParseFileValue(''),
        };
    }""")
    assert result["frames"] == 8 and result["bins"] == 512
    assert all(abs(p - 1000) <= 16 for p in result["peaks"]), result["peaks"]
    assert result["looped"] == [3, 1, 2, 3, 1]
    assert result["padded"] == [3, 0, 0, 0, 0]
    assert result["maxStart"] == [10, 12, 6]
    assert result["plain"] == "/view?filename=dog.mp3&type=input&subfolder="
    assert result["nested"] == "/view?filename=a%26b%3Dc.wav&type=output&subfolder=my+sounds"
    assert result["empty"] is None
