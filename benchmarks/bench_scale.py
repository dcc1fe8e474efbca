"""Scale benchmark: many concurrent client programs on one server, against one alone and local.

    .venv/bin/python benchmarks/bench_scale.py [--programs 32] [--seconds 10] [--json PATH]

Starts a throwaway pool (one oriond, ``--gpus`` emulated GPUs with enough vGPU slots for
every program), then runs ``scale_workload.py``: a tiny in-place op loop that syncs every
``--batch`` ops and times one op from issue to result (the latency sample). Phases, each
program on its own small vGPU (``ORION_GMEM=64``): one program alone (``--repeat`` times,
median), then N programs started together and released at the same instant for a common
window; the same two phases as local CPU programs. Reports aggregate op throughput, its
ratio to one program x min(N, cores) (issue #6 target: >= 80 %), and p50/p99 one-op latency.

Two layouts (``--layout``, default both). *shared*: the programs and the server share every
core, as on this 2-core machine by default; one program alone then keeps about 1.6 cores
busy (its client and its worker run in parallel), so N programs can reach at most
max(c, s) / (c + s) of one program x cores (c, s: client and server CPU per op). *split*:
the pool runs on the last CPU and the programs on the others, as programs on other hosts
would (the product's deployment); cores = the server's CPUs. The split rows also give how
busy the server's CPUs were, so that a ratio met on an idle server is not read as capacity.

Each program imports torch (~155 MB proportional set size) and has a worker on the server
(~40 MB: workers are forked from one that imported torch); ``--programs`` is lowered to
what 70 % of the available memory holds, with a note.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, pinned, print_table, write_json  # noqa: E402

MIB_PER_PROGRAM = 250  # proportional set size of a client (~155) and its forked worker (~40)
TARGET = 0.80


def available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def cpu_busy() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies since boot of the whole host ("cpu") and of each CPU ("cpuN")."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *rest = line.split()
            vals = [int(v) for v in rest]
            out[name] = (sum(vals) - vals[3] - vals[4], sum(vals))
    return out


def busy_pct(b0: dict, b1: dict, name: str = "cpu") -> float:
    return 100.0 * (b1[name][0] - b0[name][0]) / max(1, b1[name][1] - b0[name][1])


def phase(env: dict[str, str], n: int, seconds: float, batch: int,
          cpus: set[int] | None = None) -> dict:
    """Start ``n`` programs (on ``cpus`` if given), wait until each has done its first op,
    release them together."""
    d = Path(tempfile.mkdtemp(prefix="orion-scale-"))
    pin = pinned(cpus)
    procs = []
    for i in range(n):
        err = open(d / f"stderr-{i}", "w")  # noqa: SIM115 - closed with the process below
        procs.append((subprocess.Popen(
            [sys.executable, str(HERE / "scale_workload.py"), str(d), str(i), "--seconds",
             str(seconds), "--batch", str(batch)], env=env, stdout=subprocess.DEVNULL,
            stderr=err, preexec_fn=pin), err))
    try:
        _wait_ready(d, procs, timeout=600.0)
        busy0 = cpu_busy()
        (d / "go.tmp").write_text(str(time.time() + 0.5))
        (d / "go.tmp").rename(d / "go")
        for p, _ in procs:
            p.wait(timeout=seconds + 600)
        busy1 = cpu_busy()
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    _check_exits(d, procs)
    result = summarize(d, n, busy0, busy1)
    shutil.rmtree(d, ignore_errors=True)  # kept when a program failed: its stderr is there
    return result


def _wait_ready(d: Path, procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(d.glob("ready-*"))) < len(procs):
        _check_exits(d, procs, running_ok=True)
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(list(d.glob('ready-*')))} of {len(procs)} programs "
                             f"got ready within {timeout:.0f} s")
        time.sleep(0.1)


def _check_exits(d: Path, procs: list, running_ok: bool = False) -> None:
    for i, (p, _) in enumerate(procs):
        code = p.poll()
        if (code is None and running_ok) or code == 0:
            continue
        tail = (d / f"stderr-{i}").read_text()[-2000:]
        raise SystemExit(f"scale program {i} failed (exit {code}):\n{tail}")


def summarize(d: Path, n: int, busy0: dict, busy1: dict) -> dict:
    import json

    results = [json.loads((d / f"result-{i}.json").read_text()) for i in range(n)]
    if not all(r["ok"] for r in results):
        raise SystemExit("a scale program's result is wrong (ops lost or repeated)")
    lat = sorted(v for r in results for v in r["lat_us"])
    rates = [r["ops"] / r["seconds"] for r in results]
    return {"programs": n, "ops_per_s": sum(rates), "min_program": min(rates),
            "max_program": max(rates), "p50_us": pct(lat, 50), "p99_us": pct(lat, 99),
            "samples": len(lat), "client_cpu_s": sum(r["client_cpu_s"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "host_busy_pct": busy_pct(busy0, busy1),
            "cpu_busy_pct": {k: busy_pct(busy0, busy1, k) for k in busy0 if k != "cpu"},
            "device": results[0]["device"]}


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1)]


def alone(env: dict[str, str], a: argparse.Namespace, cpus: set[int] | None) -> dict:
    runs = [phase(env, 1, a.seconds, a.batch, cpus) for _ in range(a.repeat)]
    runs.sort(key=lambda r: r["ops_per_s"])
    return runs[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=100, help="ops per sync (one of them timed)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the one-program phases")
    ap.add_argument("--gpus", type=int, default=2, help="emulated GPUs on the server")
    ap.add_argument("--throttle", choices=("on", "off", "both"), default="on",
                    help="compute share on the server (default on, as shipped); 'both' also "
                    "runs the N programs on a server with enable_computation_throttle = false")
    ap.add_argument("--layout", choices=("shared", "split", "both"), default="both",
                    help="shared: programs and server on every core; split: the pool on the "
                    "last CPU, the programs on the others (default: both)")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    a = ap.parse_args()
    notes = []
    fits = max(1, int(available_mib() * 0.7) // MIB_PER_PROGRAM)
    n = a.programs
    if n > fits:
        notes.append(f"--programs {n} lowered to {fits}: {available_mib()} MiB available, "
                     f"~{MIB_PER_PROGRAM} MiB per program and its worker")
        n = fits
    load = os.getloadavg()[0]
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    layouts = ("shared", "split") if a.layout == "both" else (a.layout,)
    for layout in layouts:
        cpus = sorted(os.sched_getaffinity(0))
        if layout == "split" and len(cpus) < 2:
            notes.append("split layout skipped: it needs 2 CPUs or more")
            continue
        server = {cpus[-1]} if layout == "split" else None
        programs = set(cpus[:-1]) if layout == "split" else None
        res = run_layout(a, n, server, programs)
        raw[layout] = res
        rows += report(layout, n, res, notes)
    print(f"{n} programs on one server ({a.gpus} emulated GPUs), {os.cpu_count()} cores, load "
          f"average {load:.1f} at start; {a.seconds:.0f} s windows, sync every {a.batch} ops")
    print_table(rows, width=70)
    for note in notes:
        print("note:", note)
    if a.json:
        write_json(a.json, "scale", rows, notes=notes, load_at_start=load, raw=raw)


def run_layout(a: argparse.Namespace, n: int, server: set[int] | None,
               programs: set[int] | None) -> dict:
    """The phases of one layout: one program alone and N together, remote then local."""
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    slots = min(64, max(1, math.ceil(n / a.gpus)))
    remote: dict[str, dict] = {}
    for mode in (("on", "off") if a.throttle == "both" else (a.throttle,)):
        with local_pool(emulated=f"{a.gpus}x16GiB", vgpu_count=slots,
                        throttle=mode == "on", cpus=server) as env:
            env = dict(env, ORION_VGPU="1", ORION_GMEM="64")
            if not remote:  # alone there is no contention: the compute share does nothing
                remote["one"] = alone(env, a, programs)
            remote[mode] = phase(env, n, a.seconds, a.batch, programs)
    return {"remote": remote, "local_one": alone(local_env, a, programs),
            "local_n": phase(local_env, n, a.seconds, a.batch, programs),
            "server_cpus": sorted(server or ()), "program_cpus": sorted(programs or ())}


def report(layout: str, n: int, res: dict, notes: list[str]) -> list[dict]:
    remote, l1, ln = res["remote"], res["local_one"], res["local_n"]
    split = layout == "split"
    cores = len(res["server_cpus"]) if split else (os.cpu_count() or 1)
    lcores = len(res["program_cpus"]) if split else cores
    k = min(n, cores)
    r1 = remote["one"]
    eff_l = ln["ops_per_s"] / (l1["ops_per_s"] * min(n, lcores))
    pre = "split: " if split else ""
    where = (f"cpu{','.join(map(str, res['server_cpus']))} for the pool, "
             f"cpu{','.join(map(str, res['program_cpus']))} for the programs" if split else "")
    rows = [row(f"{pre}one program alone: tiny ops (ops/s)", l1["ops_per_s"], r1["ops_per_s"]),
            row(f"{pre}one-op latency p50, alone (us)", l1["p50_us"], r1["p50_us"]),
            row(f"{pre}one-op latency p99, alone (us)", l1["p99_us"], r1["p99_us"])]
    for mode in ("on", "off"):
        rn = remote.get(mode)
        if rn is None:
            continue
        tag = pre + f"{n} programs" + ("" if mode == "on" else ", compute share off")
        eff_r = rn["ops_per_s"] / (r1["ops_per_s"] * k)
        unit = f"{k} server core" + ("s" if k > 1 else "") if split else f"{cores} cores"
        rows += [
            row(f"{tag}: aggregate tiny ops (ops/s)", ln["ops_per_s"], rn["ops_per_s"]),
            row(f"{tag}: aggregate / (one alone x min({n}, {unit}))", eff_l, eff_r,
                f"remote >= {TARGET:.2f}", eff_r >= TARGET),
            row(f"{tag}: one-op latency p50 (us)", ln["p50_us"], rn["p50_us"]),
            row(f"{tag}: one-op latency p99 (us)", ln["p99_us"], rn["p99_us"]),
        ]
        busy = f"host CPU busy {rn['host_busy_pct']:.0f} %"
        if split:
            busy += ", " + ", ".join(
                f"{c} {rn['cpu_busy_pct'][c]:.0f} %" for c in
                (f"cpu{i}" for i in res["server_cpus"] + res["program_cpus"]))
        notes.append(f"{tag}: slowest / fastest program {rn['min_program']:.0f} / "
                     f"{rn['max_program']:.0f} ops/s; {busy} during the window")
    if split:
        alone_busy = r1["cpu_busy_pct"][f"cpu{res['server_cpus'][0]}"]
        notes.append(f"split layout: {where}; the pool's CPU busy, one program alone: "
                     f"{alone_busy:.0f} %")
    notes.append(f"{pre}local, {n} programs: host CPU busy {ln['host_busy_pct']:.0f} % during "
                 "the window")
    notes.append(f"{pre}client CPU per op, alone: remote "
                 f"{r1['client_cpu_s'] / (r1['ops_per_s'] * r1['seconds']) * 1e6:.1f} us, "
                 f"local {l1['client_cpu_s'] / (l1['ops_per_s'] * l1['seconds']) * 1e6:.1f} us")
    return rows


def row(name: str, local: float, remote: float, target: str = "",
        met: bool | None = None) -> dict:
    return {"name": name, "local": local, "remote": remote,
            "ratio": remote / local if local else None, "target": target, "met": met}


if __name__ == "__main__":
    main()
