#!/usr/bin/env bash
# Sets up .venv/ with orion-vgpu (editable) and its test tools; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned to the CPU build that pip finds on this machine's disk (see README).
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements-dev.txt \
  -r requirements-dev.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import orion_vgpu, torch" 
.venv/bin/python -m orion_vgpu.client.install_hook
