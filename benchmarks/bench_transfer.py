"""Transfer benchmark: host -> vGPU and vGPU -> host bandwidth against memcpy, same run.

    .venv/bin/python benchmarks/bench_transfer.py [--max-mib 1024] [--reps 5] [--json PATH]

Starts a throwaway pool (one oriond with emulated GPUs) and, for each transport, one
client program that times every size 4 KiB ... ``--max-mib`` in both directions and a
numpy copy of the same size into a preallocated buffer (the local equivalent), medians of
``--reps`` rounds. Transports: shared memory (Unix socket + shm arena, the default on one
host), the Unix socket without shared memory, TCP loopback without shared memory.
Targets (issue #6): shm >= 70 % of memcpy from 64 MiB up; TCP loopback >= 1 GB/s.
vGPU -> vGPU copies are measured by ``bench_peercopy.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, write_json  # noqa: E402

TRANSPORTS = {"shm": {}, "unix": {"ORION_SHM": "off"},
              "tcp": {"ORION_SHM": "off", "ORION_ENABLE_NET": "1"}}
SHM_RATIO_TARGET = 0.70
TCP_TARGET_MBPS = 1000.0
BIG = 64 << 20  # targets apply from this size up


def run(env: dict[str, str], sizes: list[int], reps: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "transfer_workload.py"),
                          ",".join(map(str, sizes)), "--reps", str(reps)], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"transfer workload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(n: int) -> str:
    if n >= 1 << 30:
        return f"{n >> 30} GiB"
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def target(transport: str, n: int, mbps: float, ratio: float) -> tuple[str, bool | None]:
    if n < BIG:
        return "", None
    if transport == "shm":
        return f"ratio >= {SHM_RATIO_TARGET:.2f}", ratio >= SHM_RATIO_TARGET
    if transport == "tcp":
        return f">= {TCP_TARGET_MBPS:.0f} MB/s", mbps >= TCP_TARGET_MBPS
    return "", None


def rows(results: dict[str, dict], sizes: list[int]) -> list[dict]:
    out = []
    for t in TRANSPORTS:
        for direction, label in (("h2d", "host->vGPU"), ("d2h", "vGPU->host")):
            for n in sizes:
                r = results[t][str(n)]
                ratio = r[direction] / r["memcpy"]
                tgt, met = target(t, n, r[direction], ratio)
                out.append({"name": f"{t} {label} {fmt(n)} (MB/s)", "local": r["memcpy"],
                            "remote": r[direction], "ratio": ratio, "target": tgt,
                            "met": met})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the results as JSON to this path")
    a = ap.parse_args()
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]
    sizes = [s for s in sizes if s <= max(a.max_mib << 20, 4 << 10)]
    gmem = max(1024, 4 * (sizes[-1] >> 20) + 512)  # kept tensor, uploads, frees in flight
    results = {}
    with local_pool() as env:
        for name, extra in TRANSPORTS.items():
            results[name] = run(dict(env, ORION_VGPU="1", ORION_GMEM=str(gmem), **extra),
                                sizes, a.reps)
    table = rows(results, sizes)
    print("MB/s (10^6 B/s); local = numpy copy of the same size into a preallocated buffer, "
          "same process; remote = vGPU on an emulated GPU")
    print(f"{'transfer':38} {'memcpy':>9} {'remote':>9} {'ratio':>6}  target")
    for r in table:
        met = "" if r["met"] is None else (" met" if r["met"] else " MISSED")
        print(f"{r['name']:38} {r['local']:9.0f} {r['remote']:9.0f} {r['ratio']:6.2f}  "
              f"{r['target']}{met}")
    if a.json:
        write_json(a.json, "transfer", table, raw=results)


if __name__ == "__main__":
    main()
