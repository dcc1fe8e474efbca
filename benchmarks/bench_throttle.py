"""Compute-share benchmark: ORION_RATIO and [throttle] throttle_level on one emulated GPU.

    .venv/bin/python benchmarks/bench_throttle.py [--seconds 10] [--size 384] [--batch 8]

1. Two programs with ORION_RATIO 25 and 75 on the same emulated GPU, the same workload
   (a loop of ``--batch`` matmuls then ``torch.cuda.synchronize()``), concurrently for
   ``--seconds``: work each completes, and their proportion (target 1:3 within 10 %).
   Run at throttle_level 100 (the default) and 0.
2. One program with ORION_RATIO 50 alone at throttle_level 0 and 100: the GPU busy
   fraction the server meters (heartbeat ``busy_pct`` on the controller's ``/pool``, and
   the session log's summary line). Targets: <= 55 % at level 0, >= 90 % at level 100.

Each program counts the work it finishes inside a common time window, so start-up and
shutdown (when a program may run alone) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, pool_dir  # noqa: E402

# The window opens this long after every program is ready (they contend meanwhile).
WARMUP_S = 1.0


# -- the client program (runs with ORION_VGPU=1) ------------------------------------------


def client(size: int, batch: int) -> None:
    """Says READY, reads the window "START END" (unix times) from stdin, then runs matmuls in
    batches until END; prints JSON with the work done inside the window."""
    import torch

    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda") / size ** 0.5
    c = torch.empty(size, size, device="cuda")
    torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    print("READY", flush=True)
    start, end = (float(x) for x in sys.stdin.readline().split())
    marks: list[tuple[float, int]] = []
    done = 0
    while True:
        for _ in range(batch):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        done += batch
        now = time.time()
        if now >= start:
            marks.append((now, done))
        if now >= end:
            break
    inside = [m for m in marks if m[0] <= end]
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    print(json.dumps({"ops": n1 - n0,
                      "seconds": t1 - t0, "ops_per_s": (n1 - n0) / (t1 - t0)}))


# -- the driver ---------------------------------------------------------------------------


def _get(env: dict[str, str], path: str) -> dict | list:
    with urllib.request.urlopen(f"http://{env['ORION_CONTROLLER']}/api/v1{path}",
                                timeout=5) as r:
        return json.load(r)


def _launch(env: dict[str, str], ratio: int, a: argparse.Namespace) -> subprocess.Popen[str]:
    """Start a program and wait until it holds its vGPU and said READY."""
    cmd = [sys.executable, __file__, "--client", "--size", str(a.size), "--batch", str(a.batch)]
    proc = subprocess.Popen(cmd, env=dict(env, ORION_RATIO=str(ratio)), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        _, err = proc.communicate(timeout=60)
        raise SystemExit(f"client failed to start:\n{line}{err[-3000:]}")
    return proc


def _open_window(procs: list[subprocess.Popen[str]], seconds: float) -> float:
    start = time.time() + WARMUP_S
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start!r} {start + seconds!r}\n")
        p.stdin.flush()
    return start


def _collect(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"client failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _same_gpu(env: dict[str, str]) -> bool:
    allocs = _get(env, "/allocations?state=active")
    items = allocs if isinstance(allocs, list) else allocs.get("allocations", [])
    gpus = {v["gpu_uuid"] for al in items for v in al["vgpus"]}
    return len(items) == 2 and len(gpus) == 1


def contended(a: argparse.Namespace, level: int) -> dict:
    with local_pool(throttle_level=level) as env:
        p25 = _launch(env, 25, a)  # binpack puts the second program on the same GPU
        p75 = _launch(env, 75, a)
        same = _same_gpu(env)
        _open_window([p25, p75], a.seconds)
        r25, r75 = _collect(p25), _collect(p75)
        time.sleep(0.5)  # the workers write their summaries as the sessions end
        summaries = _session_summaries(env)
    if not same:
        raise SystemExit("the two programs did not share one GPU")
    return {"level": level, "r25": r25, "r75": r75, "summaries": summaries,
            "proportion": r75["ops_per_s"] / r25["ops_per_s"]}


def _busy_samples(env: dict[str, str], until: float) -> list[float]:
    samples = []
    while time.time() < until:
        gpus = _get(env, "/pool")["gpus"]  # type: ignore[index]
        samples.append(max(g.get("busy_pct") or 0.0 for g in gpus))
        time.sleep(1.0)
    return samples


def _session_summaries(env: dict[str, str]) -> list[str]:
    logs = sorted((pool_dir(env) / "log" / "session").glob("*.log"))
    return [ln.split("] ", 1)[-1] for p in logs for ln in p.read_text().splitlines()
            if "compute share: ratio" in ln and "busy" in ln]


def alone(a: argparse.Namespace, level: int) -> dict:
    with local_pool(throttle_level=level) as env:
        proc = _launch(env, 50, a)
        start = _open_window([proc], a.seconds)
        end = start + a.seconds
        # /pool busy_pct averages the last ~5 s of the worker's reports: sample once the
        # averaging window lies inside the measurement window.
        time.sleep(max(0.0, start + 5.0 - time.time()))
        samples = _busy_samples(env, end)
        result = _collect(proc)
        time.sleep(0.5)  # the worker writes its summary as the session ends
        summary = (_session_summaries(env) or ["(no summary line)"])[-1]
    busy = re.search(r"\(([\d.]+)%\)", summary)
    return {"level": level, "result": result, "busy_pct": sum(samples) / len(samples),
            "samples": samples, "session_busy_pct": float(busy.group(1)) if busy else None,
            "summary": summary}


def report(a: argparse.Namespace, pairs: list[dict], singles: list[dict]) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; one emulated GPU (CPU); workload: {a.batch} x "
          f"mm {a.size}x{a.size} fp32 then synchronize, {a.seconds:.0f} s window")
    print()
    print(f"{'two programs, ratios 25 + 75':34} {'ops/s r25':>10} {'ops/s r75':>10} "
          f"{'r75/r25':>8} {'vs 3.00':>8}")
    for p in pairs:
        prop = p["proportion"]
        print(f"{'throttle_level ' + str(p['level']):34} {p['r25']['ops_per_s']:10.1f} "
              f"{p['r75']['ops_per_s']:10.1f} {prop:8.3f} {100 * (prop / 3 - 1):+7.1f}%")
    print()
    print(f"{'one program, ratio 50, alone':34} {'ops/s':>10} {'busy_pct':>10} "
          f"{'session':>8}   (/pool busy_pct samples)")
    for s in singles:
        sess = s["session_busy_pct"]
        print(f"{'throttle_level ' + str(s['level']):34} {s['result']['ops_per_s']:10.1f} "
              f"{s['busy_pct']:9.1f}% {sess if sess is not None else float('nan'):7.1f}%   "
              f"{' '.join(f'{x:.0f}' for x in s['samples'])}")
    print()
    print("session logs (the server's metering):")
    for p in pairs:
        for line in p["summaries"]:
            print(f"  {line}")
    for s in singles:
        print(f"  {s['summary']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cases", default="pair100,pair0,alone0,alone100",
                    help="which runs (comma-separated): pair100 pair0 alone0 alone100")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(a.size, a.batch)
        return
    cases = set(a.cases.split(","))
    pairs = [contended(a, lv) for lv in (100, 0) if f"pair{lv}" in cases]
    singles = [alone(a, lv) for lv in (0, 100) if f"alone{lv}" in cases]
    report(a, pairs, singles)


if __name__ == "__main__":
    main()
