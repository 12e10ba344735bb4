"""The English node translations (locales/en/nodeDefs.json), derived from the nodes' own schemas.

ComfyUI serves every pack's `locales/<lang>/main.json` + `nodeDefs.json` at GET /i18n and the
frontend merges them into its messages; a node's texts are looked up as
`nodeDefs.<node_id>.{display_name, description, inputs.<input>.{name, tooltip}, outputs.<index>.{name, tooltip}}`
(the shape of the frontend's own English nodeDefs: an output without a display name has no `name`,
the frontend then shows its type). The schemas are the one source of the English texts, so the
English file is generated here and tests/test_locales.py fails when it drifts; zh and ja are
translated by hand with the same keys. Run `python -m tools.locales` after changing a node's texts,
then update locales/zh and locales/ja.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALES = REPO_ROOT / "locales"
LANGUAGES = ("en", "zh", "ja")


def pack_schemas() -> list:
    """The schemas of every node the pack registers (its ComfyExtension's node list), in order."""
    from tools.comfy_root import import_comfy, import_pack

    import_comfy(cpu=True)
    pack = import_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    return [node.define_schema() for node in asyncio.run(extension.get_node_list())]


def _texts(**texts: str | None) -> dict[str, str]:
    return {key: text for key, text in texts.items() if text}


def english_node_def(schema) -> dict:
    """One node's nodeDefs entry, in English, exactly as the schema states it."""
    entry = _texts(display_name=schema.display_name or schema.node_id, description=schema.description)
    entry["inputs"] = {i.id: _texts(name=i.display_name or i.id, tooltip=i.tooltip) for i in schema.inputs}
    if schema.outputs:
        entry["outputs"] = {str(index): _texts(name=o.display_name, tooltip=o.tooltip)
                            for index, o in enumerate(schema.outputs)}
    return entry


def english_node_defs(schemas) -> dict:
    return {schema.node_id: english_node_def(schema) for schema in schemas}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    write_json(LOCALES / "en" / "nodeDefs.json", english_node_defs(pack_schemas()))
    print(f"wrote {LOCALES / 'en' / 'nodeDefs.json'}; now update the zh and ja files to match")


if __name__ == "__main__":
    main()
