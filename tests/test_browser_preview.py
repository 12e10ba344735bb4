"""The audio preview in the real frontend page (server, browser and helpers from tests/test_browser.py):
the window count the page shows is the node's (one table for both), and a dragged window stays
under the pointer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_browser import (  # noqa: F401  (fixtures)
    APP,
    _fit_view,
    _load_workflow,
    _node_id,
    _wait_preview_decoded,
    _workflow,
    browser,
    page,
    ui_server,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

WINDOW_TABLE = json.loads((Path(__file__).parent / "data" / "window_table.json").read_text())


def test_page_counts_windows_like_the_node(page):
    """The table tests/test_audio.py holds audiotoken_core.audio.window_count to."""
    cases = WINDOW_TABLE["cases"]
    got = page.js("""async (cases) => {
        const m = await import('/extensions/audiotoken/js/audiotoken_audio.js');
        return cases.map(c => m.audiotokenWindowCount(c.duration, c.window, c.hop));
    }""", cases)
    assert got == [c["count"] for c in cases]


def _drawn(page, node_id: int) -> dict:
    """Where the preview DRAWS its window's start handle (the orange bar), in screen pixels, once
    the pending frame is drawn; and the waveform panel's screen position."""
    page.page.wait_for_function(f"(id) => !{APP}.graph.getNodeById(id).audiotokenPreview.frame", arg=node_id)
    return page.js(f"""async (id) => {{
        const m = await import('/extensions/audiotoken/js/audiotoken_audio.js');
        const p = {APP}.graph.getNodeById(id).audiotokenPreview;
        const c = p.canvas, r = c.getBoundingClientRect();
        const css = r.width / c.clientWidth, dpr = c.width / c.clientWidth;
        const {{ wave }} = m.audiotokenPanels(c.clientWidth, c.clientHeight);
        const row = Math.round((wave.y + 0.25 * wave.h) * dpr);
        const d = c.getContext('2d').getImageData(0, row, c.width, 1).data;
        const handle = (i) => Math.abs(d[4 * i] - 255) + Math.abs(d[4 * i + 1] - 179)
            + Math.abs(d[4 * i + 2] - 71) < 24;  // #ffb347
        let run = [];
        for (let i = 0; i < c.width; i++) {{
            if (handle(i)) run.push(i); else if (run.length >= 3 * dpr) break; else run = [];
        }}
        const mid = run.length ? (run[0] + run[run.length - 1] + 1) / 2 / dpr : null;
        return {{handle: mid === null ? null : r.left + mid * css, left: r.left + wave.x * css, width: wave.w * css,
                 y: r.top + (wave.y + 0.25 * wave.h) * css, duration: p.state.duration,
                 start: p.state.windows[0].start, length: p.state.windows[0].length}};
    }}""", node_id)


def test_dragged_window_stays_under_the_pointer(page):
    """Dragging the window past the end of the recording (where the time axis grows to show the
    loop): the drawn window edge keeps its distance to the pointer at every step, to the 0.1 s the
    start snaps to."""
    _load_workflow(page, _workflow(start_seconds=0.0, window_seconds=2.0))
    enc = _node_id(page, "AudioTokenEncode")
    _fit_view(page, [_node_id(page, "LoadAudio"), enc])
    _wait_preview_decoded(page, enc)
    first = _drawn(page, enc)
    assert first["start"] == 0 and first["handle"] == pytest.approx(first["left"], abs=1.5), first
    px_per_s = first["width"] / first["duration"]
    grab = 1.0  # seconds into the window
    x0 = first["left"] + grab * px_per_s
    target = first["left"] + (first["duration"] - 0.1) * px_per_s  # the window then ends 0.9 s past the recording
    page.page.mouse.move(x0, first["y"])
    page.page.mouse.down()
    try:
        for i in range(1, 9):
            x = x0 + (target - x0) * i / 8
            page.page.mouse.move(x, first["y"])
            now = _drawn(page, enc)
            assert now["handle"] == pytest.approx(x - grab * px_per_s, abs=0.051 * px_per_s + 1.5), (i, x, now)
    finally:
        page.page.mouse.up()
    end = _drawn(page, enc)
    assert end["start"] + end["length"] > end["duration"]
    # released: the axis grows to show the whole window (and the edge moves left with it)
    assert end["handle"] == pytest.approx(end["left"] + end["start"] / (end["start"] + end["length"]) * end["width"],
                                          abs=1.5)
