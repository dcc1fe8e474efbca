"""Compute-share benchmark: ORION_RATIO and [throttle] throttle_level on one emulated GPU.

    .venv/bin/python benchmarks/bench_throttle.py [--seconds 10] [--size 512] [--batch 32]
                                                  [--repeat 1] [--cases pair100,...]

1. Two programs with ORION_RATIO 25 and 75 on the same emulated GPU, the same workload
   (a loop of ``--batch`` matmuls then ``torch.cuda.synchronize()``), concurrently for
   ``--seconds``: the work each completes and their proportion (target 1:3 within 10 %),
   at throttle_level 100 (the default) and 0. Also the proportion of busy time the server
   metered for the two sessions (their session logs).
2. One program with ORION_RATIO 50 alone at throttle_level 0 and 100: the GPU busy
   fraction the server meters (heartbeat ``busy_pct`` on the controller's ``/pool``).
   Targets: <= 55 % at level 0, >= 90 % at level 100.

Each program counts the work it finishes inside a common window (opened once every
program holds its vGPU), so start-up and shutdown are left out. The emulated GPU is the
host's CPU: other work on the host slows ops unevenly over time, so each case prints the
load average it ran at. oriond and its workers inherit this process's environment, so
``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_throttle.py`` runs the
workers with passive OpenMP threads (see docs/performance.md, "Compute share").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
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
    print(json.dumps({"ops": n1 - n0, "seconds": t1 - t0, "ops_per_s": (n1 - n0) / (t1 - t0)}))


# -- the driver ---------------------------------------------------------------------------


def _get(env: dict[str, str], path: str) -> dict | list:
    with urllib.request.urlopen(f"http://{env['ORION_CONTROLLER']}/api/v1{path}",
                                timeout=5) as r:
        return json.load(r)


def _launch(env: dict[str, str], ratio: int, a: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--client", "--size", str(a.size), "--batch", str(a.batch)]
    return subprocess.Popen(cmd, env=dict(env, ORION_RATIO=str(ratio)), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_ready(procs: list[subprocess.Popen[str]]) -> None:
    """Every program holds its vGPU and said READY."""
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            _, err = proc.communicate(timeout=60)
            raise SystemExit(f"client failed to start:\n{line}{err[-3000:]}")


def _open_window(procs: list[subprocess.Popen[str]], seconds: float) -> float:
    start = time.time() + WARMUP_S
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start!r} {start + seconds!r}\n")
        p.stdin.flush()
    return start


def _collect(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"client failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _same_gpu(env: dict[str, str]) -> bool:
    allocs = _get(env, "/allocations?state=active")
    items = allocs if isinstance(allocs, list) else allocs.get("allocations", [])
    gpus = {v["gpu_uuid"] for al in items for v in al["vgpus"]}
    return len(items) == 2 and len(gpus) == 1


def _session_summaries(env: dict[str, str]) -> list[str]:
    logs = sorted((pool_dir(env) / "log" / "session").glob("*.log"))
    return [ln.split("] ", 1)[-1] for p in logs for ln in p.read_text().splitlines()
            if "compute share: ratio" in ln and " busy " in ln]


def _metered_busy(lines: list[str], ratio: int) -> float:
    for line in lines:
        m = re.search(rf"ratio {ratio}%.*? busy ([\d.]+) s of", line)
        if m:
            return float(m.group(1))
    return float("nan")


def contended(a: argparse.Namespace, level: int) -> dict:
    load = os.getloadavg()[0]
    with local_pool(throttle_level=level) as env:
        # Both ask at once; binpack puts them on the same GPU.
        procs = [_launch(env, 25, a), _launch(env, 75, a)]
        _wait_ready(procs)
        same = _same_gpu(env)
        _open_window(procs, a.seconds)
        r25, r75 = (_collect(p) for p in procs)
        time.sleep(0.5)  # the workers write their summaries as the sessions end
        lines = _session_summaries(env)
    if not same:
        raise SystemExit("the two programs did not share one GPU")
    return {"level": level, "load": load, "r25": r25, "r75": r75, "summaries": lines,
            "proportion": r75["ops_per_s"] / r25["ops_per_s"],
            "busy_proportion": _metered_busy(lines, 75) / _metered_busy(lines, 25)}


def _busy_samples(env: dict[str, str], until: float) -> list[float]:
    samples = []
    while time.time() < until:
        gpus = _get(env, "/pool")["gpus"]  # type: ignore[index]
        samples.append(max(g.get("busy_pct") or 0.0 for g in gpus))
        time.sleep(1.0)
    return samples


def alone(a: argparse.Namespace, level: int) -> dict:
    load = os.getloadavg()[0]
    with local_pool(throttle_level=level) as env:
        proc = _launch(env, 50, a)
        _wait_ready([proc])
        start = _open_window([proc], a.seconds)
        # /pool busy_pct averages the worker's reports over the last ~5 s: sample once that
        # lies inside the window.
        time.sleep(max(0.0, start + 5.0 - time.time()))
        samples = _busy_samples(env, start + a.seconds)
        result = _collect(proc)
        time.sleep(0.5)
        lines = _session_summaries(env)
    return {"level": level, "load": load, "result": result, "samples": samples,
            "busy_pct": statistics.mean(samples), "summaries": lines}


def report(a: argparse.Namespace, pairs: list[dict], singles: list[dict]) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; one emulated GPU (CPU); workload: {a.batch} x "
          f"mm {a.size}x{a.size} fp32 then synchronize; {a.seconds:.0f} s window; oriond's "
          f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if pairs:
        print()
        print(f"{'two programs, ratios 25 + 75':30} {'load':>5} {'ops/s r25':>10} "
              f"{'ops/s r75':>10} {'work r75/r25':>13} {'vs 3':>7} {'busy r75/r25':>13}")
        for p in pairs:
            prop = p["proportion"]
            print(f"{'throttle_level ' + str(p['level']):30} {p['load']:5.1f} "
                  f"{p['r25']['ops_per_s']:10.1f} {p['r75']['ops_per_s']:10.1f} {prop:13.3f} "
                  f"{100 * (prop / 3 - 1):+6.1f}% {p['busy_proportion']:13.3f}")
        for level in sorted({p["level"] for p in pairs}, reverse=True):
            props = [p["proportion"] for p in pairs if p["level"] == level]
            if len(props) > 1:
                med = statistics.median(props)
                print(f"{'  median of ' + str(len(props)) + ', level ' + str(level):30} "
                      f"{'':5} {'':10} {'':10} {med:13.3f} {100 * (med / 3 - 1):+6.1f}%")
    if singles:
        print()
        print(f"{'one program, ratio 50, alone':30} {'load':>5} {'ops/s':>10} "
              f"{'busy_pct':>10}   (/pool busy_pct samples, one a second)")
        for s in singles:
            print(f"{'throttle_level ' + str(s['level']):30} {s['load']:5.1f} "
                  f"{s['result']['ops_per_s']:10.1f} {s['busy_pct']:9.1f}%   "
                  f"{' '.join(f'{x:.0f}' for x in s['samples'])}")
    print()
    print("session logs (the server's metering, whole sessions):")
    for case in pairs + singles:
        for line in case["summaries"]:
            print(f"  {line}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each two-program case")
    ap.add_argument("--cases", default="pair100,pair0,alone0,alone100",
                    help="which runs (comma-separated): pair100 pair0 alone0 alone100")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(a.size, a.batch)
        return
    cases = set(a.cases.split(","))
    pairs = [contended(a, lv) for _ in range(a.repeat) for lv in (100, 0)
             if f"pair{lv}" in cases]
    singles = [alone(a, lv) for lv in (0, 100) if f"alone{lv}" in cases]
    report(a, pairs, singles)


if __name__ == "__main__":
    main()
