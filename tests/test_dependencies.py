"""The pack's declared runtime dependencies cover every third-party module its runtime code imports."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tools.comfy_root import find_comfyui_root

REPO = Path(__file__).resolve().parent.parent
RUNTIME = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py")), *sorted((REPO / "audiotoken_core").rglob("*.py"))]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1))


def imported_top_level_modules(files) -> dict[str, str]:
    """Absolute imports (`import x.y`, `from x import y`) -> the first file that makes them (the pack's own
    modules import each other relatively, so these are the standard library, ComfyUI and third parties)."""
    found: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def declared() -> tuple[set[str], set[str]]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    requirements = {_requirement_name(line) for line in lines if line.strip() and not line.lstrip().startswith("#")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return requirements, {_requirement_name(dep) for dep in project["dependencies"]}


def test_requirements_txt_and_pyproject_declare_the_same_packages():
    requirements, project = declared()
    assert requirements == project


def test_every_third_party_import_is_declared():
    comfy_root = find_comfyui_root()
    distributions = packages_distributions()
    requirements, _ = declared()
    missing = {}
    for module, where in imported_top_level_modules(RUNTIME).items():
        if module in sys.stdlib_module_names:
            continue
        if (comfy_root / f"{module}.py").is_file() or (comfy_root / module).is_dir():
            continue  # ComfyUI's own modules (comfy, comfy_api, folder_paths, server, nodes)
        dists = {_normalise(d) for d in distributions.get(module, [])}
        assert dists, f"{module} (imported by {where}) is not installed in the test environment"
        if not dists & requirements:
            missing[module] = (where, sorted(dists))
    assert not missing, f"imported but not declared in requirements.txt / pyproject.toml: {missing}"


def test_the_import_scan_sees_pillow():
    """The scan itself: media.py reads images through Pillow (distribution `pillow`)."""
    modules = imported_top_level_modules([REPO / "audiotoken_core" / "data" / "media.py"])
    assert "PIL" in modules and "pillow" in {_normalise(d) for d in packages_distributions()["PIL"]}
