"""Graphs benchmark: make_graphed_callables and torch.compile on a vGPU against local runs.

    .venv/bin/python benchmarks/bench_graphs.py [--steps 100] [--repeat 3] [--json PATH]

One workload, the MLP step of the data-plane benchmark (4 layers of width 64, batch 32:
forward, backward, Adam), run eagerly, with the model graphed by make_graphed_callables,
compiled by torch.compile, and compiled together with the optimizer step. Local and remote
runs alternate in the same run; each number is the median of ``--repeat`` processes, each
process reporting the median of 5 rounds of ``--steps`` steps (a loss read every 20 steps).
Remote = a vGPU on an emulated GPU (CPU). Local eager is measured with default OpenMP
threads (the data-plane benchmark's baseline) and with passive ones (the workers' setting).
Local graphs need CUDA, so make_graphed_callables is compared with local eager only; local
torch.compile uses inductor (needs a C++ compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, print_table, run_json, write_json  # noqa: E402

KINDS = ("eager", "graphed", "compile", "compile_all")


# -- the workload (runs in its own process: python bench_graphs.py --workload KIND N) ------

def workload(kind: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from workloads import mlp_setup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt, x, y = mlp_setup(dev)
    t0 = time.perf_counter()
    fwd = model
    if kind == "graphed":
        fwd = torch.cuda.make_graphed_callables(model, (x,))
    elif kind in ("compile", "compile_all"):
        fwd = torch.compile(model)
    opt_step = torch.compile(opt.step) if kind == "compile_all" else opt.step

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(fwd(x), y)
        loss.backward()
        opt_step()
        return loss

    step().item()  # graphs are made (captured, compiled) here
    setup_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        for i in range(steps):
            loss = step()
            if (i + 1) % 20 == 0:
                loss.item()
        loss.item()
        times.append((time.perf_counter() - t1) / steps)
    return {"ms_per_step": statistics.median(times) * 1e3, "setup_s": setup_s, "device": dev}


# -- the driver ---------------------------------------------------------------------------

def run(env: dict[str, str], kind: str, steps: int) -> dict:
    return run_json([__file__, "--workload", kind, str(steps)], env, timeout=1800)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="processes per configuration")
    ap.add_argument("--json", help="also write the rows as JSON (benchmarks/run_all.py)")
    ap.add_argument("--workload", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        print(json.dumps(workload(a.workload[0], int(a.workload[1]))))
        return
    res = measure(a.steps, a.repeat)
    rows = table(res)
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load average {load:.1f}; remote = vGPU on an emulated "
          f"GPU (CPU); medians of {a.repeat} alternating processes x 5 rounds of {a.steps} steps")
    print_table(rows, "MLP 4x64 step (remote / local)", width=56, fmt="9.2f", missed="NOT met")
    if a.json:
        write_json(a.json, "graphs", rows, load_average=load)


def measure(steps: int, repeat: int) -> dict[tuple[str, str], list[dict]]:
    """Alternating runs, so both sides see the same machine state. Local eager runs twice:
    with the default OpenMP threads (the data-plane benchmark's baseline) and with passive
    ones, the workers' setting (server/workerpool.py): on a loaded host spinning threads
    make a local process measure the load more than the work."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    local = {"default": base, "passive": dict(base, OMP_WAIT_POLICY="PASSIVE")}
    local_runs = [("default", "eager"), ("passive", "eager"), ("default", "compile"),
                  ("default", "compile_all")]
    res: dict[tuple[str, str], list[dict]] = {}
    with local_pool() as env:
        for _ in range(repeat):
            for kind in KINDS:
                res.setdefault(("remote", kind), []).append(run(env, kind, steps))
            for omp, kind in local_runs:
                res.setdefault((f"local-{omp}", kind), []).append(run(local[omp], kind, steps))
    return res


def table(res: dict[tuple[str, str], list[dict]]) -> list[dict]:
    def med(side: str, kind: str, field: str = "ms_per_step") -> float:
        return statistics.median(r[field] for r in res[(side, kind)])

    spec = [("eager", "eager", ""), ("make_graphed_callables", "graphed", "<= 1.0x"),
            ("compiled model", "compile", "<= 1.0x"),
            ("compiled model+optimizer", "compile_all", "<= 1.0x")]
    rows = []
    for omp in ("default", "passive"):
        for name, kind, target in spec:
            rows.append(_row(f"{name} / local eager, {omp} OMP (ms)",
                             med(f"local-{omp}", "eager"), med("remote", kind), target))
    rows.append(_row("compiled model / same locally (ms)",
                     med("local-default", "compile"), med("remote", "compile"), ""))
    rows.append(_row("compiled model+optimizer / same locally (ms)",
                     med("local-default", "compile_all"), med("remote", "compile_all"), ""))
    rows.append(_row("first step with compile, model (s)",
                     med("local-default", "compile", "setup_s"),
                     med("remote", "compile", "setup_s"), ""))
    rows.append(_row("first step with compile, model+optimizer (s)",
                     med("local-default", "compile_all", "setup_s"),
                     med("remote", "compile_all", "setup_s"), ""))
    return rows


def _row(name: str, local: float, remote: float, target: str) -> dict:
    ratio = remote / local
    return {"name": name, "local": local, "remote": remote, "ratio": ratio, "target": target,
            "met": (ratio <= 1.0) if target else None}


if __name__ == "__main__":
    main()
