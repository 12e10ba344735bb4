"""The translations in locales/ (en, zh, ja) against the nodes' own schemas, and as ComfyUI serves them.

Every node, input and output of every schema must have its entry with text in every language, with no
entry for anything that does not exist; English must be exactly the schemas' texts (regenerate it with
`python -m tools.locales` after changing a node), so it cannot drift from the nodes.
"""
from __future__ import annotations

import json
import re

import pytest

from tools.locales import LANGUAGES, LOCALES, REPO_ROOT, english_node_defs, pack_schemas

# Category segments ComfyUI's frontend already translates (its own nodeCategories); repeating them here
# would override the frontend's strings for every pack.
CORE_CATEGORY_SEGMENTS = {"audio", "video"}
# Names that stay as they are in every language when the English text has them.
TECHNICAL_NAMES = ("AudioToken", "BEATs", "CLIP", "Flux", "Wan", "fps", "slerp", "<audio>")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


def load(lang: str, name: str) -> dict:
    return json.loads((LOCALES / lang / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schemas():
    return pack_schemas()


def test_the_pack_has_its_nineteen_nodes(schemas):
    ids = [schema.node_id for schema in schemas]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert {"AudioTokenEncode", "AudioTokenTimeline", "AudioTokenTrain", "AudioTokenAVAlign"} <= set(ids)


def test_english_is_exactly_the_schemas_texts(schemas):
    en = load("en", "nodeDefs.json")
    assert en == english_node_defs(schemas), "locales/en is out of date: run `python -m tools.locales`"
    # Spot checks straight from the schema objects, independent of the generator.
    timeline = next(s for s in schemas if s.node_id == "AudioTokenTimeline")
    entry = en["AudioTokenTimeline"]
    assert entry["display_name"] == timeline.display_name == "AudioToken Audio Timeline (frames)"
    assert entry["description"] == timeline.description
    assert [entry["inputs"][i.id]["tooltip"] for i in timeline.inputs] == [i.tooltip for i in timeline.inputs]
    assert [entry["outputs"][str(k)]["name"] for k in range(4)] == ["timeline", "frame_count", "fps", "audio"]
    # An output without a display name has no name entry (the frontend then shows its type).
    assert en["AudioTokenConditioning"]["outputs"] == {"0": {"tooltip": "Conditioning for KSampler."}}


def expected_keys(schema) -> dict:
    """Which texts each node must have: the shape of the frontend's nodeDefs, from the schema alone."""
    node = {"display_name", "inputs"} | ({"description"} if schema.description else set())
    if schema.outputs:
        node.add("outputs")
    inputs = {i.id: {"name"} | ({"tooltip"} if i.tooltip else set()) for i in schema.inputs}
    outputs = {str(k): ({"name"} if o.display_name else set()) | ({"tooltip"} if o.tooltip else set())
               for k, o in enumerate(schema.outputs)}
    return {"node": node, "inputs": inputs, "outputs": outputs}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_node_input_and_output_has_its_texts_and_nothing_else(schemas, lang):
    defs = load(lang, "nodeDefs.json")
    assert set(defs) == {s.node_id for s in schemas}, f"{lang}: node ids differ from the pack's nodes"
    for schema in schemas:
        entry, keys = defs[schema.node_id], expected_keys(schema)
        where = f"{lang}/{schema.node_id}"
        assert set(entry) == keys["node"], where
        assert {k: set(v) for k, v in entry["inputs"].items()} == keys["inputs"], where
        assert {k: set(v) for k, v in entry.get("outputs", {}).items()} == keys["outputs"], where
        texts = [entry["display_name"], entry.get("description", "x")]
        texts += [t for part in ("inputs", "outputs") for e in entry.get(part, {}).values() for t in e.values()]
        assert all(isinstance(t, str) and t.strip() == t and t for t in texts), where


@pytest.mark.parametrize("lang", [lang for lang in LANGUAGES if lang != "en"])
def test_translations_are_translated_and_keep_technical_names(lang):
    en, defs = load("en", "nodeDefs.json"), load(lang, "nodeDefs.json")
    for node_id, entry in en.items():
        pairs = [(entry["description"], defs[node_id]["description"])]
        pairs += [(e["tooltip"], defs[node_id][part][key]["tooltip"])
                  for part in ("inputs", "outputs") for key, e in entry.get(part, {}).items() if "tooltip" in e]
        for english, translated in pairs:
            assert CJK.search(translated), f"{lang}/{node_id}: not translated: {translated!r}"
            for name in TECHNICAL_NAMES:
                assert english.count(name) <= translated.count(name), f"{lang}/{node_id}: {name!r} lost in {translated!r}"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_main_json_names_the_packs_own_category_segments(schemas, lang):
    segments = {part for schema in schemas for part in schema.category.split("/")}
    assert segments == {"audio", "AudioToken", "video"}
    main = load(lang, "main.json")
    assert set(main) == {"nodeCategories"}
    assert set(main["nodeCategories"]) == segments - CORE_CATEGORY_SEGMENTS
    assert main["nodeCategories"]["AudioToken"] == "AudioToken"  # a technical name, the same in every language


def test_comfyui_serves_them_at_i18n(monkeypatch, tmp_path):
    """ComfyUI's own collector (app/custom_node_manager.py, behind GET /i18n) reads this pack's files."""
    import folder_paths
    from app.custom_node_manager import CustomNodeManager

    (tmp_path / "audiotoken").symlink_to(REPO_ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(tmp_path)], set()))
    served = CustomNodeManager().build_translations()
    for lang in LANGUAGES:
        assert served[lang]["nodeDefs"] == load(lang, "nodeDefs.json")
        assert served[lang]["nodeCategories"] == load(lang, "main.json")["nodeCategories"]
    assert served["zh"]["nodeDefs"]["AudioTokenEncode"]["inputs"]["text"]["name"] == "文本"
    assert served["ja"]["nodeDefs"]["AudioTokenTrain"]["display_name"] == "AudioToken を学習"
