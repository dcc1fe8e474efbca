#!/usr/bin/env bash
# Set-up + the main job: an all-in-one pool with emulated GPUs, and a model trained on a vGPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
DATA=$(mktemp -d /tmp/orion-demo.XXXXXX)
export ORION_HOME="$DATA/home"
PORT=${ORION_DEMO_PORT:-9123}
SPORT=${ORION_DEMO_SERVER_PORT:-9960}
.venv/bin/orion up --listen "127.0.0.1:$PORT" --server-port "$SPORT" --data-dir "$DATA/up" \
  --emulated-gpus 2x16GiB --vgpu-count 4 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DATA"' EXIT
export ORION_CONTROLLER="127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  .venv/bin/orion check runtime client >/dev/null 2>&1 && break
  sleep 0.2
done
.venv/bin/orion check runtime client | tail -3
ORION_VGPU=1 ORION_GMEM=4096 .venv/bin/python examples/train.py
