"""One client program of the scale benchmark; writes its result as JSON to DIR/result-ID.json.

    python scale_workload.py DIR ID --seconds S --batch K

Opens its device (a vGPU under ORION_VGPU, else the CPU) and does a first op, writes
DIR/ready-ID, waits for DIR/go (which holds the common start time), then for S seconds
repeats: K-1 tiny in-place ops without waiting, a sync (``item()``), then one timed op
plus sync: the latency of one op, issue to result, while the others keep the server busy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def wait_for_go(d: Path, ident: str, timeout: float = 900.0) -> float:
    (d / f"ready-{ident}").write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    go = d / "go"
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.005)
    return float(go.read_text())


def loop(x: torch.Tensor, start: float, seconds: float, batch: int) -> dict:
    """Ops and one-op latencies (µs) within [start, start + seconds) of wall time."""
    while time.time() < start:
        time.sleep(0.0005)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    end = t0 + seconds
    ops, lat = 0, []
    while time.perf_counter() < end:
        for _ in range(batch - 1):
            x.add_(1)
        x.item()
        t = time.perf_counter()
        x.add_(1)
        x.item()
        lat.append(round((time.perf_counter() - t) * 1e6, 1))
        ops += batch
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"ops": ops, "seconds": elapsed, "lat_us": lat, "client_cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("id")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args()
    d = Path(a.dir)
    x = torch.zeros(1, dtype=torch.float64, device=DEV)  # exact counts past 2**24
    x.add_(1)
    first = x.item()
    start = wait_for_go(d, a.id)
    out = loop(x, start, a.seconds, a.batch)
    # Every op must have happened, in order, on the device: the count is the proof.
    out["ok"] = x.item() == first + out["ops"]
    out["device"] = DEV
    (d / f"result-{a.id}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
