#!/usr/bin/env bash
# The main job (README): set up, then run the example workflow in a real ComfyUI with this pack.
# Extra arguments go to tools/run_example.py (e.g. --models /path/to/ComfyUI/models --audio my.wav).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python tools/run_example.py "$@"
