#!/usr/bin/env bash
# The test command (README): set up (idempotent), then run every test, the real-ComfyUI ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
