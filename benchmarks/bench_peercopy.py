"""Copy bandwidth between two vGPUs of one node against a local copy of the same size.

    .venv/bin/python benchmarks/bench_peercopy.py [--max-mib 256] [--reps 5] [--json PATH]

One throwaway pool (controller + oriond with two emulated GPUs). A client with
ORION_VGPU=2 times ``y = x.to("cuda:1"); torch.cuda.synchronize()`` (median of reps) with
each route: server to server through shared memory (the default on one node: a memfd
passed over the workers' Unix socket), over TCP loopback (``ORION_PEER_COPY=tcp``, the
route across nodes) and through the client (``ORION_PEER_COPY=0``, the route before peer
copies). The same process times a local
torch CPU copy of the same size: ``clone()`` (a new tensor, as ``.to`` makes) and
``copy_`` into a tensor that exists. Emulated GPUs run on this CPU: the numbers say what
the data plane costs next to memcpy, not what a GPU pair does (no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, write_json  # noqa: E402

ROUTES = {"shm": {}, "tcp": {"ORION_PEER_COPY": "tcp"}, "client": {"ORION_PEER_COPY": "0"}}


def _time(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(n: int, reps: int) -> dict[str, float]:
    """Interleaved: one rep of each kind after the other, so that a neighbour's load on
    this shared machine weighs on the local and the remote copies alike."""
    import torch

    host = torch.empty(n, dtype=torch.uint8).fill_(7)
    into = torch.empty(n, dtype=torch.uint8).fill_(1)
    x = host.to("cuda:0")
    torch.cuda.synchronize()
    x.to("cuda:1")  # warm-up: first connection, first pages
    torch.cuda.synchronize()

    def peer() -> None:
        y = x.to("cuda:1")
        torch.cuda.synchronize()
        del y

    kinds = {"clone": host.clone, "copy_": lambda: into.copy_(host), "peer": peer}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(reps):
        for k, fn in kinds.items():
            times[k].append(_time(fn))
    row = {k: n / statistics.median(v) / 1e6 for k, v in times.items()}
    y = x.to("cuda:1")
    row["ok"] = float(y.shape == x.shape and bool((y[-4096:].cpu() == 7).all()))
    return row


def workload(sizes: list[int], reps: int) -> None:
    """In the client process: MB/s per size, one JSON line on stdout."""
    out = {str(n): _measure(n, reps if n >= 64 << 20 else reps * 2) for n in sizes}
    print(json.dumps(out))


def run(env: dict[str, str], sizes: list[int], reps: int) -> dict:
    cmd = [sys.executable, __file__, "--workload", ",".join(map(str, sizes)), "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"workload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        workload([int(s) for s in a.workload.split(",")], a.reps)
        return
    sizes = [s << 20 for s in (1, 4, 16, 64, 256, 1024) if s <= a.max_mib]
    gmem = max(1024, 3 * a.max_mib + 512)  # source, its snapshot, and the copy
    results = {}
    with local_pool() as env:
        for route, extra in ROUTES.items():
            e = dict(env, ORION_VGPU="2", ORION_GMEM=str(gmem), **extra)
            results[route] = run(e, sizes, a.reps)
    print("cuda:0 -> cuda:1 copy, MB/s, median of runs (ratio to the local clone of the same "
          f"size); emulated GPUs on this CPU; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| size | local clone | local copy_ | peer, shared memory | peer, TCP | via client |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in sizes:
        local = results["shm"][str(n)]
        base = local["clone"]
        cells = [f"{results[r][str(n)]['peer']:.0f} ({results[r][str(n)]['peer'] / base:.2f})"
                 for r in ROUTES]
        print(f"| {fmt(n)} | {base:.0f} | {local['copy_']:.0f} | " + " | ".join(cells) + " |")
        for r in ROUTES:
            rows.append({"name": f"cuda:0->cuda:1 {fmt(n)} via {r} (MB/s)", "local": base,
                         "remote": results[r][str(n)]["peer"],
                         "ratio": results[r][str(n)]["peer"] / base, "target": "", "met": None})
    bad = [f"{r} {fmt(int(n))}" for r in ROUTES for n, v in results[r].items() if not v["ok"]]
    if bad:
        raise SystemExit(f"copies came out wrong: {bad}")
    if a.json:
        write_json(a.json, "peercopy", rows, raw=results)


if __name__ == "__main__":
    main()
