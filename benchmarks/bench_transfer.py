"""Transfer benchmark: host <-> vGPU and vGPU -> vGPU bandwidth against memcpy, same run.

    .venv/bin/python benchmarks/bench_transfer.py [--max-mib 256]

Transports: shared memory (same host, default), Unix socket without shared memory, TCP
loopback without shared memory. h2d and d2d end with torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool  # noqa: E402


def run(env: dict[str, str], sizes: list[int]) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "transfer_workload.py"),
                          ",".join(map(str, sizes))], env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"workload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-mib", type=int, default=256)
    a = ap.parse_args()
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
    sizes += [s for s in (256 << 20, 1 << 30) if s <= a.max_mib << 20]
    transports = {"shm": {}, "unix": {"ORION_SHM": "off"},
                  "tcp": {"ORION_SHM": "off", "ORION_ENABLE_NET": "1"}}
    with local_pool() as env:
        results = {}
        for name, extra in transports.items():
            e = dict(env, ORION_VGPU="2", ORION_GMEM="3000", **extra)
            results[name] = run(e, sizes)
    print("MB/s (ratio to memcpy of the same size, same process); remote = emulated GPU")
    print(f"{'size':>8} {'memcpy':>8} | " + " | ".join(
        f"{t + ' h2d':>14} {t + ' d2h':>14}" for t in transports) + " | d2d (shm)")
    for n in sizes:
        base = results["shm"][str(n)]["memcpy"]
        cells = []
        for t in transports:
            r = results[t][str(n)]
            cells.append(f"{r['h2d']:7.0f} ({r['h2d'] / base:4.2f}) "
                         f"{r['d2h']:7.0f} ({r['d2h'] / base:4.2f})")
        d2d = results["shm"][str(n)].get("d2d", 0.0)
        print(f"{fmt(n):>8} {base:8.0f} | " + " | ".join(cells) + f" | {d2d:7.0f} ({d2d / base:4.2f})")


if __name__ == "__main__":
    main()
