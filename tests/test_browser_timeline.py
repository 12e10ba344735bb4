"""The Audio Timeline node in the real frontend page, and the video with its sound.

Server, browser and page helpers from tests/test_browser.py; the server here has no checkpoint (the
timeline needs only the placeholder BEATs and an AudioToken). Both frontends run the same tests: the one
ComfyUI 0.3.75 pins and test_browser.NEWER_FRONTEND.

- the page's time base (web/js/audiotoken_audio.js) gives the answers of tests/data/timeline_table.json, the
  table audiotoken_core/timeline.py is held to;
- before a run the timeline draws what the widgets imply: one tick per frame (thinned when dense), the windows
  the frames hear (the same starts as audiotoken_core.timeline computes);
- after a run it draws the onsets of the node's ui payload where they are (in the beat mode its beats instead,
  the mode's change boundaries), and its windows are the node's;
- the saved video (CreateVideo with the timeline's audio -> SaveVideo) plays in its preview WITH sound, for
  as long as the frames last; the same video without the audio input has none.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import test_browser
from comfy_fixtures import BEATS, BEATS_SMALL, TOKEN_SD15, _token
from test_browser import (
    APP,
    _assert_no_errors_from_us,
    _fit_view,
    _frontend_static,
    _newer_frontend_static,
)

from audiotoken_core import timeline as tl
from audiotoken_core.timeline import WINDOW_MODES as MODES

browser, page = test_browser.browser, test_browser.page  # fixtures: one Chromium, the page of `ui_server` below

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

TABLE = Path(__file__).parent / "data" / "timeline_table.json"
TICK = (0x5F, 0xD3, 0xFF)  # AUDIOTOKEN_TIMELINE_COLORS in web/js/audiotoken_timeline.js
ONSET = (0xFF, 0x4F, 0xD8)
BEAT = (0x7D, 0xFF, 0x6A)
FRONTENDS = {"pinned": _frontend_static, "newer": _newer_frontend_static}
TIMELINE_ID, SAVE_ID, SAVE_SILENT_ID = 4, 7, 9  # node ids of _graph()


@pytest.fixture(scope="module", params=list(FRONTENDS))
def ui_server(request, tmp_path_factory, cc0_recordings):
    """A ComfyUI serving one of the two frontends, with the placeholder BEATs, an SD1.5 AudioToken and dog.mp3
    (the `page` fixture of tests/test_browser.py opens it)."""
    from audiotoken_core.token_file import save_audiotoken
    from tools.comfy_server import ComfyServer
    from tools.placeholder_beats import write_placeholder_beats

    static = FRONTENDS[request.param]()
    base = tmp_path_factory.mktemp(f"comfy_timeline_{request.param}")
    server = ComfyServer(base, front_end_root=static, test_nodes=False)
    try:
        models = base / "models"
        write_placeholder_beats(models / "audio_encoders" / BEATS, seed=1, **BEATS_SMALL)
        save_audiotoken(models / "audiotoken" / TOKEN_SD15, _token({"l": 768}, seed=2))
        shutil.copy(next(p for p in cc0_recordings if p.name == "dog.mp3"), base / "input" / "dog.mp3")
        server.wait_ready()
        assert "AudioTokenTimeline" in server.get("/object_info"), \
            "the pack does not register AudioTokenTimeline: nodes/__init__.py must list nodes.timeline_nodes.NODES"
        test_browser.as_fresh_user(server)
        server.frontend = request.param
        yield server
    finally:
        server.stop()


def _graph(fps=2.0, window=2.0, mode=MODES[0], hop=1.0, start=0.5, length=0.0) -> dict:
    """API format, numeric ids: LoadAudio -> AudioToken loaders -> AudioTokenTimeline -> EmptyImage (one per frame)
    -> CreateVideo (the timeline's fps and audio) -> SaveVideo, and the same video without audio."""
    return {
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "dog.mp3"}},
        "2": {"class_type": "AudioTokenEncoderLoader", "inputs": {"encoder_name": BEATS, "layers": "auto"}},
        "3": {"class_type": "AudioTokenLoader",
              "inputs": {"audiotoken_name": TOKEN_SD15, "audio_encoder": ["2", 0], "pooling": "deterministic"}},
        str(TIMELINE_ID): {"class_type": "AudioTokenTimeline", "inputs": {
            "audio": ["1", 0], "audiotoken": ["3", 0], "fps": fps, "window_seconds": window, "windows": mode,
            "hop_seconds": hop, "interpolation": "linear", "smoothing_seconds": 0.0, "onset_weight": 0.0,
            "start_seconds": start, "length_seconds": length, "channels": "mix", "max_frames": 2400}},
        "5": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": [str(TIMELINE_ID), 1], "color": 0x3080C0}},
        "6": {"class_type": "CreateVideo",
              "inputs": {"images": ["5", 0], "fps": [str(TIMELINE_ID), 2], "audio": [str(TIMELINE_ID), 3]}},
        str(SAVE_ID): {"class_type": "SaveVideo", "inputs": {"video": ["6", 0], "filename_prefix": "video/timeline",
                                                             "format": "auto", "codec": "auto"}},
        "8": {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": [str(TIMELINE_ID), 2]}},
        str(SAVE_SILENT_ID): {"class_type": "SaveVideo", "inputs": {
            "video": ["8", 0], "filename_prefix": "video/timeline_silent", "format": "auto", "codec": "auto"}},
    }


def _load(page, graph: dict) -> None:
    """Load the API graph into the page (the frontend's own API-JSON loader) and lay it out for screenshots."""
    page.js(f"""async (g) => {{
        await {APP}.loadApiJson(g, 'timeline_test');
        const at = {{1: [0, 0], 2: [0, 200], 3: [0, 360], {TIMELINE_ID}: [420, 0], 5: [980, 0], 6: [980, 220],
                     {SAVE_ID}: [1300, 0], 8: [980, 420], {SAVE_SILENT_ID}: [1300, 480]}};
        for (const n of {APP}.graph._nodes) if (at[n.id]) n.pos = at[n.id];
        const t = {APP}.graph.getNodeById({TIMELINE_ID}); t.size[0] = Math.max(t.size[0], 520);
        {APP}.canvas.setDirty(true, true);
    }}""", graph)
    _fit_view(page, [1, TIMELINE_ID])


def _set_widgets(page, values: dict) -> None:
    page.js(f"""(values) => {{
        const n = {APP}.graph.getNodeById({TIMELINE_ID});
        for (const [name, value] of Object.entries(values)) n.widgets.find(w => w.name === name).value = value;
        {APP}.canvas.setDirty(true, true);
    }}""", values)


def _run_from_page(page, server) -> dict:
    """Queue the page's graph as the Run button does; the finished history entry (the page gets the node's
    `executed` message a moment before the server writes it)."""
    before = len(server.get("/history"))
    page.js(f"async () => {{ await {APP}.queuePrompt(0, 1); }}")
    deadline = time.time() + 240
    while len(history := server.get("/history")) == before and time.time() < deadline:
        time.sleep(0.25)
    entry = server.wait(list(history)[-1], timeout=max(1.0, deadline - time.time()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def _drawn(page, **expect) -> dict:
    """Wait until the timeline shows these plan values and is drawn; then its plan, what it drew, and pixel counts:
    tick runs along the frame lane, and which of the drawn onset columns are onset-coloured in the spectrogram."""
    page.page.wait_for_function(f"""(expect) => {{
        const p = {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview;
        const plan = p?.state?.plan;
        return plan && !p.frame && p.state.drawn && Object.entries(expect).every(([k, v]) => plan[k] === v);
    }}""", arg=expect, timeout=30_000)
    return page.js(f"""([tick, onset, beat]) => {{
        const p = {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview;
        const s = p.state, c = p.canvas, P = s.drawn.panels, dpr = c.width / c.clientWidth;
        const ctx = c.getContext('2d');
        const near = (d, i, rgb) => Math.abs(d[4 * i] - rgb[0]) + Math.abs(d[4 * i + 1] - rgb[1])
            + Math.abs(d[4 * i + 2] - rgb[2]) < 40;
        const row = (y) => ctx.getImageData(0, Math.round(y * dpr), c.width, 1).data;
        const frameRow = row(P.frames.y + P.frames.h - 2);
        let runs = 0;
        for (let i = 0; i < c.width; i++) if (near(frameRow, i, tick) && !(i && near(frameRow, i - 1, tick))) runs++;
        const specRow = row(P.spec.y + P.spec.h / 2);
        let onsetPixels = 0;
        for (let i = 0; i < c.width; i++) if (near(specRow, i, onset)) onsetPixels++;
        return {{
            frameCount: s.plan.frameCount, start: s.plan.start, end: s.plan.end, duration: s.duration,
            windows: s.plan.windows.map(w => w.start), windowLength: s.plan.windows[0].length,
            tickStep: s.drawn.tickStep, ticks: s.drawn.ticks.length, tickRuns: runs,
            onsets: s.onsets, onsetXs: s.drawn.onsets, onsetPixels,
            onsetHits: s.drawn.onsets.map(x => near(specRow, Math.round(x * dpr), onset)),
            beats: s.beats, beatXs: s.drawn.beats, beatHits: s.drawn.beats.map(x => near(specRow, Math.round(x * dpr), beat)),
            span: s.drawn.span, wave: P.wave,
        }};
    }}""", [TICK, ONSET, BEAT])


# ---------------------------------------------------------------------------------------------------------------


def test_page_time_base_matches_the_table(page):
    """Every case of tests/data/timeline_table.json (the answers audiotoken_core/timeline.py gives), computed by
    the page's own functions: the same doubles."""
    table = json.loads(TABLE.read_text())
    got = page.js("""async (cases) => {
        const m = await import('/extensions/audiotoken/js/audiotoken_audio.js');
        return cases.map(c => {
            const n = m.audiotokenFrameCount(c.duration, c.fps, c.start, c.length);
            const listed = Array.from({length: Math.min(n, 6)}, (_, i) => i);
            const centre = (i) => m.audiotokenFrameCentre(i, c.fps, c.start);
            const windowStart = (i) => m.audiotokenCentredWindowStart(centre(i), c.window, c.duration);
            return {
                frame_count: n, end_seconds: m.audiotokenSpanEnd(n, c.fps, c.start),
                frame_times: listed.map(i => m.audiotokenFrameTime(i, c.fps, c.start)),
                frame_centres: listed.map(centre), centred_window_starts: listed.map(windowStart),
                last_frame_time: m.audiotokenFrameTime(n - 1, c.fps, c.start), last_window_start: windowStart(n - 1),
            };
        });
    }""", table["cases"])
    assert len(got) == len(table["cases"]) >= 8
    for case, mine in zip(table["cases"], got):
        for key, value in mine.items():
            assert value == case[key], (key, case, value)


def test_timeline_draws_frames_and_windows_before_a_run(page, ui_server):
    modes = page.js("async () => (await import('/extensions/audiotoken/js/audiotoken_timeline.js')).AUDIOTOKEN_WINDOW_MODES")
    assert modes == list(MODES)  # the page knows the node's modes
    _load(page, _graph(fps=2.0, window=2.0, mode=MODES[0], start=0.5))
    d = _drawn(page, fps=2.0)
    duration = d["duration"]
    assert 5.0 < duration < 8.0, d  # dog.mp3
    assert d["frameCount"] == tl.frame_count(duration, 2.0, 0.5) >= 10
    # one tick per frame, each drawn
    assert d["tickStep"] == 1 and d["ticks"] == d["tickRuns"] == d["frameCount"], d
    # the windows centred on each frame, as the node computes them (clamped at both ends)
    assert d["windows"] == [tl.centred_window_start(tl.frame_centre(i, 2.0, 0.5), 2.0, duration)
                            for i in range(d["frameCount"])]
    assert d["windows"][0] == 0.0 and d["windows"][-1] == duration - 2.0
    assert d["onsets"] is None and d["onsetPixels"] == 0  # no run yet: no onsets drawn
    # the pointer over the waveform picks the frame on screen at that time, and shows the window it hears
    clip = _fit_view(page, [1, TIMELINE_ID])
    box = page.js(f"() => {{ const c = {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.canvas;"
                  " const r = c.getBoundingClientRect(); return [r.left, r.top, r.width / c.clientWidth]; }")
    t = tl.frame_centre(3, 2.0, 0.5)
    x = box[0] + (d["wave"]["x"] + t / d["span"] * d["wave"]["w"]) * box[2]
    page.page.mouse.move(x, box[1] + (d["wave"]["y"] + d["wave"]["h"] / 2) * box[2])
    page.page.wait_for_function(f"() => {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.state.focusFrame === 3",
                                timeout=10_000)
    page.shot(f"10_timeline_centred_{ui_server.frontend}", clip=clip)
    page.page.mouse.move(5, 5)
    page.page.wait_for_function(f"() => {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.state.focusFrame == null",
                                timeout=10_000)

    # hop windows: those the frames blend, as the node plans them (audiotoken_core.timeline)
    _set_widgets(page, {"windows": MODES[1], "hop_seconds": 0.75, "start_seconds": 0.0})
    d = _drawn(page, mode=MODES[1], start=0.0)
    plan = tl._plan_hop(d["frameCount"], 2.0, 0.0, 2.0, 0.75, duration)
    assert d["windows"] == plan.starts and len(plan.starts) > 3, (d["windows"], plan.starts)

    # dense frames are thinned: at 60 fps a tick every `step` frames, each drawn
    _set_widgets(page, {"fps": 60.0, "windows": MODES[0]})
    d = _drawn(page, fps=60.0, mode=MODES[0])
    assert d["frameCount"] == tl.frame_count(duration, 60.0)
    assert d["tickStep"] > 1 and d["ticks"] == d["tickRuns"] == -(-d["frameCount"] // d["tickStep"]), d
    page.shot(f"11_timeline_dense_{ui_server.frontend}", clip=_fit_view(page, [1, TIMELINE_ID]))
    _assert_no_errors_from_us(page)


@pytest.mark.parametrize("mode", MODES)
def test_timeline_after_a_run_draws_the_nodes_onsets_and_windows(page, ui_server, mode):
    """The run's ui payload: its onsets (beat mode: its beats) are drawn where they are; the page's windows for the
    run's settings are the node's (window_starts of the payload), and its frame count too."""
    _load(page, _graph(fps=4.0, window=1.0, mode=mode, hop=0.5, start=0.5))
    _drawn(page, fps=4.0, mode=mode)
    entry = _run_from_page(page, ui_server)
    page.page.wait_for_function(f"() => {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.lastRun",
                                timeout=30_000)
    run = page.js(f"() => {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.lastRun")
    assert entry["outputs"][str(TIMELINE_ID)]["audiotoken_timeline"][0] == run
    d = _drawn(page, fps=4.0, mode=mode, onsetsKnown=True)
    assert d["frameCount"] == run["frame_count"] and d["start"] == run["start_seconds"] == 0.5
    assert sorted(set(d["windows"]))[:512] == run["window_starts"], (d["windows"], run)
    assert d["onsets"] == run["onsets"] and len(run["onsets"]) >= 2, run  # a dog barking: several onsets
    beat_mode = mode == MODES[3]
    assert (len(run["beats"]) >= 2 and run["tempo_bpm"] > 0) if beat_mode else (run["beats"] == []), run
    # each change boundary of the mode drawn at its time on the axis, in its colour: the beats in the beat mode
    # (and then no onsets), else the onsets
    marks, xs, hits = ("beats", "beatXs", "beatHits") if beat_mode else ("onsets", "onsetXs", "onsetHits")
    assert d["beats"] == (run["beats"] if beat_mode else None) and (d["onsetXs"] == [] if beat_mode else d["beatXs"] == [])
    expected_x = [d["wave"]["x"] + t / d["span"] * d["wave"]["w"] for t in run[marks]]
    assert len(d[xs]) == len(expected_x) and all(d[hits]), d
    assert all(abs(x - e) <= 0.5 for x, e in zip(d[xs], expected_x)), (d[xs], expected_x)
    page.shot(f"12_timeline_after_run_{MODES.index(mode)}_{ui_server.frontend}", clip=_fit_view(page, [1, TIMELINE_ID]))
    _assert_no_errors_from_us(page)


def test_saved_video_preview_plays_with_its_sound(page, ui_server):
    """SaveVideo's preview <video> of CreateVideo(frames, the timeline's fps, the timeline's audio) plays with an
    audio track, as long as the frames last; the same frames without the audio input play without one. The
    timeline's "frames' span" button plays that part of the recording."""
    fps = 4.0
    _load(page, _graph(fps=fps, window=1.0, mode=MODES[0], start=0.5, length=3.0))
    _run_from_page(page, ui_server)
    clip = _fit_view(page, [TIMELINE_ID, SAVE_ID, SAVE_SILENT_ID])  # the frontend loads a preview when it draws the node
    played = {}
    for node_id in (SAVE_ID, SAVE_SILENT_ID):
        page.page.wait_for_function(
            f"(id) => {APP}.graph.getNodeById(id).videoContainer?.querySelector('video')?.readyState >= 2",
            arg=node_id, timeout=60_000)
        played[node_id] = page.js(f"""async (id) => {{
            const v = {APP}.graph.getNodeById(id).videoContainer.querySelector('video');
            v.muted = true;  // headless autoplay; muted playback still decodes the audio track
            v.currentTime = 0;
            await v.play();
            const until = Date.now() + 20000;
            while (v.currentTime < Math.min(1.5, 0.8 * v.duration) && Date.now() < until) {{
                await new Promise(r => setTimeout(r, 50));
            }}
            v.pause();
            return {{duration: v.duration, audioBytes: v.webkitAudioDecodedByteCount,
                     videoBytes: v.webkitVideoDecodedByteCount, src: v.currentSrc, controls: v.controls,
                     error: v.error && v.error.message}};
        }}""", node_id)
    page.shot(f"13_video_preview_{ui_server.frontend}", clip=clip)
    run = page.js(f"() => {APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview.lastRun")
    assert run["frame_count"] == 12  # 3 s at 4 fps
    sound, silent = played[SAVE_ID], played[SAVE_SILENT_ID]
    assert sound["error"] is None and sound["controls"], sound
    assert sound["audioBytes"] > 0 and sound["videoBytes"] > 0, sound
    assert sound["duration"] == pytest.approx(run["frame_count"] / fps, abs=0.1), sound
    assert silent["audioBytes"] == 0 and silent["videoBytes"] > 0, silent
    assert silent["duration"] == pytest.approx(run["frame_count"] / fps, abs=0.01), silent

    # The timeline's own player plays the same span of the recording: [0.5, 3.5) s, the frame on screen followed.
    preview = f"{APP}.graph.getNodeById({TIMELINE_ID}).audiotokenPreview"
    page.page.evaluate_handle(f"() => {preview}.root.querySelector('button')").as_element().click()
    page.page.wait_for_function(f"() => !{preview}.audio.paused && {preview}.state.focusFrame >= 1", timeout=10_000)
    page.page.wait_for_function(f"() => {preview}.audio.paused", timeout=15_000)
    stopped = page.js(f"() => [{preview}.audio.currentTime, {preview}.state.plan.end]")
    assert stopped[1] == 3.5 and stopped[0] == pytest.approx(3.5, abs=0.3), stopped
    _assert_no_errors_from_us(page)
