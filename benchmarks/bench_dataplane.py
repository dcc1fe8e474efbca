"""Data-plane benchmark: remote (vGPU on an emulated GPU) against local, in the same run.

    .venv/bin/python benchmarks/bench_dataplane.py [--ops 20000] [--steps 10]

Prints the client-side cost per tiny op and the CNN training-step ratio remote/local.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool  # noqa: E402


def run(env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "workloads.py"), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"workload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    with local_pool() as env:
        rows = []
        lt, rt = run(local_env, "tiny", str(a.ops)), run(env, "tiny", str(a.ops))
        rows.append(("tiny in-place op (us/op)", lt["us_per_op"], rt["us_per_op"]))
        lc, rc = run(local_env, "cnn", str(a.steps)), run(env, "cnn", str(a.steps))
        rows.append(("CNN train step b64 32x32 (ms)", lc["ms_per_step"], rc["ms_per_step"]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; remote = vGPU on an emulated GPU (CPU)")
    print(f"{'workload':34} {'local':>10} {'remote':>10} {'ratio':>7}")
    for name, loc, rem in rows:
        print(f"{name:34} {loc:10.2f} {rem:10.2f} {rem / loc:7.2f}")
    print(f"client-side cost per op (remote - local): {rows[0][2] - rows[0][1]:.2f} us")


if __name__ == "__main__":
    main()
