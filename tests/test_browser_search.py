"""Our nodes are found in the node search by the words people type, in the real frontend page.

The words are in web/search_aliases.json, the one list: the Python schemas read it (nodes/audiotoken_nodes.py
schema(): search_aliases, which ComfyUI 0.3.75's schema drops) and web/js/audiotoken_search.js adds it to our node
definitions in the page. The frontend 0.3.75 pins (1.32.9) searches name and display_name only; the newer one
(test_browser.NEWER_FRONTEND) search_aliases too. Both are driven as a user does: double-click the canvas, type
the word, read the list. Before the aliases reached the page, "sound" listed none of our nodes in either frontend
(only core's WanSoundImageToVideo*).

Server, browser and page helpers from tests/test_browser.py, as tests/test_browser_timeline.py uses them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_browser
from test_browser import (APP, SEARCH_INPUT, _assert_no_errors_from_us, _frontend_static, _newer_frontend_static,
                          open_node_search)

browser, page = test_browser.browser, test_browser.page  # fixtures: one Chromium, the page of `ui_server` below

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

ALIASES = json.loads((Path(__file__).resolve().parent.parent / "web" / "search_aliases.json").read_text())
FRONTENDS = {"pinned": _frontend_static, "newer": _newer_frontend_static}
WORDS = ["sound", "audio to image", "voice", "music"]


@pytest.fixture(scope="module", params=list(FRONTENDS))
def ui_server(request, tmp_path_factory):
    """A ComfyUI with our pack serving one of the two frontends (no model is needed to search)."""
    from tools.comfy_server import ComfyServer

    static = FRONTENDS[request.param]()
    server = ComfyServer(tmp_path_factory.mktemp(f"comfy_search_{request.param}"), front_end_root=static,
                         test_nodes=False)
    try:
        server.wait_ready()
        test_browser.as_fresh_user(server)
        yield server
    finally:
        server.stop()


def search_list(page, query: str, shot: str | None = None) -> list[str]:
    """Double-click the empty canvas, type `query` into the node search box, return the titles it lists (first line
    of each option), then close the box (after a screenshot named `shot`, if given)."""
    canvas = page.page.locator("#graph-canvas").bounding_box()
    x, y = canvas["x"] + canvas["width"] * 0.6, canvas["y"] + canvas["height"] * 0.45
    search = open_node_search(page, x, y)
    search.press_sequentially(query, delay=5)
    read = "() => [...document.querySelectorAll(\"[role='option']\")].map(e => e.innerText.split('\\n')[0].trim())"
    titles, previous = None, None
    for _ in range(40):  # the list settles on the final query
        page.page.wait_for_timeout(150)
        titles, previous = page.js(read), titles
        if titles == previous and titles:
            break
    if shot:
        page.shot(shot)
    page.page.keyboard.press("Escape")
    page.page.locator(SEARCH_INPUT).first.wait_for(state="hidden", timeout=10_000)
    return [t.replace("\xa0", "").strip() for t in titles]


def _our_display_names(server) -> dict[str, str]:
    return {v["display_name"]: k for k, v in server.get("/object_info").items()
            if v.get("python_module", "").endswith("audiotoken")}


def test_every_node_has_its_words_and_every_word_list_names_a_node(ui_server):
    """web/search_aliases.json lists exactly the registered nodes; each list has the words that are true for it."""
    ours = set(_our_display_names(ui_server).values())
    assert set(ALIASES) == ours, (set(ALIASES) ^ ours)
    assert all(ALIASES[k] and len(set(ALIASES[k])) == len(ALIASES[k]) for k in ours)
    sound = {k for k, words in ALIASES.items() if "sound" in words}
    assert ours - sound == {"AudioTokenSampleFrames", "AudioTokenFrameNoise"}  # they never hear the sound


@pytest.mark.parametrize("word", WORDS)
def test_typing_a_word_lists_the_nodes_it_is_true_for(page, ui_server, word):
    page.js(f"() => {APP}.graph.clear()")
    version = page.js("() => window.__COMFYUI_FRONTEND_VERSION__")
    listed = search_list(page, word, shot=f"search_sound_{version}" if word == "sound" else None)
    names = _our_display_names(ui_server)
    found = {names[t] for t in listed if t in names}
    expected = {k for k, words in ALIASES.items() if word in words and k in names.values()}
    assert found == expected, f"{word!r}: missing {sorted(expected - found)}, unexpected {sorted(found - expected)}"
    if word == "sound":
        assert len(found) == len(names) - 2, (len(found), len(names))
    _assert_no_errors_from_us(page)


def test_the_page_adds_our_words_to_our_node_definitions(page):
    """What the search reads: our extension ran (no warning that the search is not the expected one) and left the
    other nodes' definitions alone."""
    assert "audiotoken.searchAliases" in page.js(f"() => {APP}.extensions.map(e => e.name)")
    assert not [c for c in page.console if "audiotoken" in c and c.startswith("warning")], page.console
    got = page.js("""async () => {
        const m = await import('/extensions/audiotoken/js/audiotoken_search.js');
        const defs = [{name: 'AudioTokenEncode', search_aliases: ['mine']}, {name: 'KSampler'}];
        m.audiotokenAddAliases(defs);
        return [defs, m.audiotokenAliasMatches('Audio TO image', 'audio to image'),
                m.audiotokenAliasMatches('to audio image', 'audio to image'), m.audiotokenAliasMatches('vox', 'voice')];
    }""")
    defs, *matches = got
    assert defs[0]["search_aliases"] == ["mine", *ALIASES["AudioTokenEncode"]]
    assert "search_aliases" not in defs[1]
    assert matches == [True, True, False]
