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
# Dashboard browser tests drive Debian's Chromium through Playwright (never `playwright
# install`: it downloads a browser build). As root, install it quietly when missing.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null 2>&1 || echo "bootstrap: could not install chromium; browser tests will skip" >&2
fi
# The network-cut fault test puts client hosts in network namespaces with `ip` (iproute2);
# it fails, saying so, without it. As root, install it quietly when missing.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2) \
    >/dev/null 2>&1 || echo "bootstrap: could not install iproute2; the network-cut test will fail" >&2
fi
