"""The per-node help pages (web/docs/<NodeId>.md) against the nodes' live schemas.

The ComfyUI frontend's help panel fetches `/extensions/<pack>/docs/<NodeId>/<locale>.md`, then
`/extensions/<pack>/docs/<NodeId>.md`, and ComfyUI serves the pack's WEB_DIRECTORY under
`/extensions/<pack>`. So a page lives at `<WEB_DIRECTORY>/docs/<NodeId>.md` (or `<NodeId>/<locale>.md`);
a renamed input or node would leave a page that silently describes something else.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

SECTIONS = ("Inputs", "Outputs", "Typical use", "Common errors")


@pytest.fixture(scope="module")
def pack():
    """The pack imported in-process (as custom_nodes would), and its node classes from the entry point."""
    from tools.comfy_root import import_comfy, import_pack

    import_comfy(cpu=True)
    module = import_pack()
    extension = asyncio.run(module.comfy_entrypoint())
    return module, asyncio.run(extension.get_node_list())


@pytest.fixture(scope="module")
def docs_dir(pack) -> Path:
    module, _ = pack
    return Path(module.__file__).parent / module.WEB_DIRECTORY / "docs"


@pytest.fixture(scope="module")
def schemas(pack) -> dict:
    _, nodes = pack
    return {schema.node_id: schema for schema in (node.define_schema() for node in nodes)}


def sections(page: str) -> dict[str, str]:
    """'## Title' -> the text under it (up to the next '## ')."""
    parts = re.split(r"^## (.+)$", page, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def listed_names(section: str) -> list[str]:
    """The names of a list section: each item starts with '- **name**'."""
    return re.findall(r"^- \*\*([^*]+)\*\*", section, flags=re.MULTILINE)


def output_name(output) -> str:
    """The name ComfyUI shows on an output slot (display name, else the type), in both supported versions."""
    return output.display_name or output.io_type


def test_the_pages_cover_the_pack_and_not_the_test_nodes(schemas, docs_dir):
    assert len(schemas) == 20 and all(node_id.startswith("AudioToken") for node_id in schemas)
    assert not any(node_id.startswith("AudioTokenTest_") for node_id in schemas)  # tests/comfy_test_nodes
    assert not list(docs_dir.glob("AudioTokenTest_*"))


def test_every_node_has_a_page_and_every_page_a_node(schemas, docs_dir):
    pages = {p.stem for p in docs_dir.glob("*.md")}
    assert pages == set(schemas), f"missing pages {sorted(set(schemas) - pages)}, pages of no node {sorted(pages - set(schemas))}"
    for entry in docs_dir.iterdir():  # anything else must be a locale folder <NodeId>/<locale>.md of a real node
        if entry.is_dir():
            assert entry.name in schemas, f"{entry} is a locale folder of no node"
            assert all(re.fullmatch(r"[a-z]{2}(-[A-Za-z]+)?\.md", p.name) for p in entry.iterdir()), entry
        else:
            assert entry.suffix == ".md", f"{entry} is not a help page"


def test_each_page_lists_exactly_its_nodes_inputs_and_outputs(schemas, docs_dir):
    for node_id, schema in schemas.items():
        page = (docs_dir / f"{node_id}.md").read_text(encoding="utf-8")
        assert page.startswith(f"# {schema.display_name}\n"), node_id
        parts = sections(page)
        assert list(parts) == list(SECTIONS), f"{node_id}: sections {list(parts)}"
        assert listed_names(parts["Inputs"]) == [i.id for i in schema.inputs], node_id
        assert listed_names(parts["Outputs"]) == [output_name(o) for o in schema.outputs], node_id
        errors = re.findall(r"^\| `.+` \| .+ \|$", parts["Common errors"], flags=re.MULTILINE)
        assert errors, f"{node_id}: no error messages listed"


def test_pages_keep_angle_brackets_out_of_html(docs_dir):
    """The panel renders Markdown to HTML: a bare '<audio>' would become an (empty) HTML element."""
    for page in docs_dir.glob("*.md"):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert "<" not in re.sub(r"`[^`]*`", "", line), f"{page.name}:{number}: escape '<' as &lt; or quote it as code"


IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def test_pictures_resolve_inside_the_web_directory_and_every_picture_is_used(docs_dir):
    """The panel resolves a relative picture against /extensions/<pack>/docs/ (the pack's WEB_DIRECTORY/docs):
    each one must be a small PNG/JPEG inside the web directory, described by its alt text; none lies unused."""
    web = docs_dir.parent.resolve()
    used = set()
    for page in sorted(docs_dir.rglob("*.md")):
        for alt, src in IMAGE.findall(page.read_text(encoding="utf-8")):
            target = (page.parent / src).resolve()
            assert target.is_relative_to(web) and target.is_file(), f"{page.name}: {src} is not a file under web/"
            assert target.suffix in (".png", ".jpg") and target.stat().st_size < 150_000, (page.name, src)
            assert len(alt) > 20, f"{page.name}: describe {src} in its alt text"
            used.add(target)
    pictures = {p.resolve() for p in (web / "help_images").iterdir()}
    assert len(used) >= 3 and used == pictures, f"unused: {sorted(map(str, pictures - used))}"
