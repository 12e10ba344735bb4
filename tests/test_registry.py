"""Ready for the Comfy Registry: `comfy node validate` (comfy-cli from PyPI) runs clean, comfy-cli reads our
[project] / [tool.comfy] fields as meant, the fields follow docs.comfy.org/registry/specifications, and the
archive `comfy node publish` would upload holds everything the pack needs at run time.

comfy-cli lives in its own venv ($VENV/comfy-cli, made by scripts/setup_env.sh) so its pins never move the
test environment's packages."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import brand_images
from tools.comfy_root import find_comfyui_root

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
COMFY_CLI_VENV = Path(sys.prefix) / "comfy-cli"

# What ComfyUI loads from the pack, and the command-line tools its messages name (scripts/convert_beats.py,
# scripts/import_reference_token.py ...): these must be in the published archive.
RUNTIME_FOLDERS = {"nodes", "audiotoken_core", "web", "locales", "workflows", "subgraphs", "scripts"}
RUNTIME_FILES = {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md"}
# Needed only to develop, test or document the pack; a new top-level folder must be put in one of the two sets.
DEVELOPMENT_FOLDERS = {"tests", "tools", "benchmarks", "docs", "assets", ".ci"}

# docs.comfy.org/registry/specifications: the values the registry understands.
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
IMAGE_SUFFIXES = {".svg", ".png", ".jpg", ".jpeg", ".gif"}


def _comfy_cli_python() -> Path:
    python = COMFY_CLI_VENV / "bin" / "python"
    if not python.is_file():
        what = f"comfy-cli is not installed in {COMFY_CLI_VENV}: run scripts/setup_env.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} (CI must run the registry check)")
        pytest.skip(what)
    return python


def _run_comfy_cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """comfy-cli in the repository root, its config in a scratch HOME, no prompts, no telemetry."""
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([str(_comfy_cli_python()), *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).exists()]


def test_comfy_node_validate_runs_clean(tmp_path):
    """The check `comfy node publish` runs first: our fields parse and ruff's eval/exec/one-line scan is empty."""
    result = _run_comfy_cli(["-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "node", "validate"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed successfully" in output, output
    complaints = [line for line in output.splitlines() if re.search(r"warning|error|invalid", line, re.IGNORECASE)]
    assert not complaints, output


def test_comfy_cli_reads_our_fields_as_meant(tmp_path):
    """comfy-cli drops a field it cannot parse (OS list, accelerators, version range) with only a warning: read
    back what it would send to the registry."""
    script = """
import dataclasses, json, sys
from comfy_cli.registry.config_parser import extract_node_configuration

def plain(value):  # dataclasses holding tomlkit items -> JSON
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value.unwrap() if hasattr(value, "unwrap") else value

print(json.dumps(plain(extract_node_configuration(sys.argv[1]))))
"""
    result = _run_comfy_cli(["-c", script, str(REPO / "pyproject.toml")], tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    project, comfy = config["project"], config["tool_comfy"]
    assert project["name"] == PROJECT["name"] and project["version"] == PROJECT["version"]
    assert project["license"] == {"file": "LICENSE", "text": ""}
    assert project["urls"]["repository"] == PROJECT["urls"]["Repository"]
    assert project["urls"]["issues"] == PROJECT["urls"]["Issues"]
    expected_os = [c.removeprefix("Operating System :: ") for c in PROJECT["classifiers"] if c.startswith("Operating System :: ")]
    expected_acc = [c.removeprefix("Environment :: ") for c in PROJECT["classifiers"] if c.startswith("Environment :: ")]
    assert project["supported_os"] == expected_os == ["OS Independent"]
    assert project["supported_accelerators"] == expected_acc and expected_acc
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"]
    assert comfy["publisher_id"] == COMFY["PublisherId"] and comfy["display_name"] == COMFY["DisplayName"]
    assert comfy["icon"] == COMFY["Icon"] and comfy["banner_url"] == COMFY["Banner"]
    assert comfy["includes"] == COMFY["includes"]
    assert sorted(project["dependencies"]) == sorted(PROJECT["dependencies"])


def test_project_fields_follow_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100 and "comfyui" not in name.lower()
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name  # no leading/double specials
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    top = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(encoding="utf-8"), re.MULTILINE).group(1)
    assert PROJECT["version"] == top, f"pyproject.toml says {PROJECT['version']}, CHANGELOG.md's newest entry is {top}"
    assert (REPO / PROJECT["license"]["file"]).is_file()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", PROJECT["urls"]["Repository"])
    assert all(url.startswith(PROJECT["urls"]["Repository"]) for url in PROJECT["urls"].values())
    for classifier in PROJECT["classifiers"]:
        if classifier.startswith("Operating System :: "):
            assert classifier.removeprefix("Operating System :: ").startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment :: "):
            assert classifier.removeprefix("Environment :: ") in ACCELERATORS, classifier
    assert COMFY["PublisherId"] and COMFY["DisplayName"]


def test_requires_comfyui_is_the_oldest_comfyui_the_tests_run():
    bound = re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)", COMFY["requires-comfyui"])
    assert bound, COMFY["requires-comfyui"]
    text = (find_comfyui_root() / "comfyui_version.py").read_text(encoding="utf-8")
    running = re.search(r"__version__\s*=\s*['\"](\d+)\.(\d+)\.(\d+)", text)
    lowest, ours = tuple(map(int, bound.groups())), tuple(map(int, running.groups()))
    assert ours >= lowest
    if not os.environ.get("COMFYUI_ROOT"):  # the suite's own ComfyUI (scripts/setup_env.sh) is the oldest supported
        assert ours == lowest, f"the tests run ComfyUI {ours}, pyproject.toml promises {COMFY['requires-comfyui']}"


@pytest.mark.parametrize("field", ["Icon", "Banner"])
def test_icon_and_banner_are_files_of_this_repository_in_the_documented_shape(field):
    repository = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    url = COMFY[field]
    assert url.startswith(prefix), url
    path = REPO / url.removeprefix(prefix)
    assert path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES, path
    width, height = Image.open(path).size
    if field == "Icon":
        assert width == height <= 400, (width, height)
    else:
        assert width * 9 == height * 21, (width, height)  # 21:9


@pytest.mark.parametrize("draw,path", [(brand_images.draw_icon, brand_images.ICON_PATH),
                                       (brand_images.draw_banner, brand_images.BANNER_PATH)], ids=["icon", "banner"])
def test_brand_images_are_what_the_script_draws(draw, path):
    """`python -m tools.brand_images` regenerates the committed files (a small tolerance for another
    FreeType rasterising the built-in font)."""
    drawn = np.asarray(draw().convert("RGBA"), dtype=np.float64)
    committed = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64)
    assert drawn.shape == committed.shape
    assert np.abs(drawn - committed).mean() < 1.0, "run `python -m tools.brand_images` and commit the images"


def test_every_top_level_folder_is_shipped_or_declared_development_only():
    tracked = {p.split("/")[0] for p in _tracked_files() if "/" in p}
    unknown = tracked - RUNTIME_FOLDERS - DEVELOPMENT_FOLDERS
    assert not unknown, f"new top-level folders {sorted(unknown)}: add them to RUNTIME_FOLDERS or DEVELOPMENT_FOLDERS"
    assert RUNTIME_FOLDERS <= tracked
    for include in COMFY["includes"]:
        assert include in RUNTIME_FOLDERS and (REPO / include).is_dir(), include


def test_runtime_code_imports_nothing_from_development_folders():
    files = [REPO / "__init__.py", *(p for folder in ("nodes", "audiotoken_core", "scripts")
                                     for p in sorted((REPO / folder).rglob("*.py")))]
    offending = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offending += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in DEVELOPMENT_FOLDERS]
    assert not offending, offending


def test_the_published_archive_holds_what_the_pack_needs_at_run_time(tmp_path):
    """comfy-cli's own packer (what `comfy node publish` uploads): git-tracked files minus .comfyignore, plus includes."""
    archive = tmp_path / "node.zip"
    script = ("import sys, json; from comfy_cli.file_utils import zip_files; "
              "zip_files(sys.argv[1], includes=json.loads(sys.argv[2]))")
    result = _run_comfy_cli(["-c", script, str(archive), json.dumps(COMFY["includes"])], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = set(zipfile.ZipFile(archive).namelist())
    needed = {p for p in _tracked_files() if p in RUNTIME_FILES or p.split("/")[0] in RUNTIME_FOLDERS}
    assert len(needed) > 100 and not needed - names, sorted(needed - names)[:20]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(".venv/")]
    with zipfile.ZipFile(archive) as z:
        assert z.read("pyproject.toml") == (REPO / "pyproject.toml").read_bytes()
