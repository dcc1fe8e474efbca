"""Graphs benchmark: make_graphed_callables and torch.compile on a vGPU against local runs.

    .venv/bin/python benchmarks/bench_graphs.py [--steps 100] [--repeat 3] [--json PATH]

One workload, the MLP step of the data-plane benchmark (4 layers of width 64, batch 32:
forward, backward, Adam), run eagerly, with the model graphed by make_graphed_callables,
compiled by torch.compile, and compiled together with the optimizer step. Local and remote
runs alternate in the same run; each number is the median of ``--repeat`` processes, each
process reporting the median of 5 rounds of ``--steps`` steps (a loss read every 20 steps).
Remote = a vGPU on an emulated GPU (CPU). Local runs use the workers' OpenMP setting
(``OMP_WAIT_POLICY=PASSIVE`` unless set). Local graphs need CUDA, so make_graphed_callables
is compared with local eager only; local torch.compile uses inductor (needs a C++ compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool  # noqa: E402

KINDS = ("eager", "graphed", "compile", "compile_all")


# -- the workload (runs in its own process: python bench_graphs.py --workload KIND N) ------

def workload(kind: str, steps: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64).to(dev), torch.randn(32, 64).to(dev)
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
    out = subprocess.run([sys.executable, __file__, "--workload", kind, str(steps)], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"workload {kind} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    # the workers' OpenMP setting (server/workerpool.py): on a loaded host, spinning OpenMP
    # threads make the local side measure the load rather than the work
    local_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    local_kinds = ("eager", "compile", "compile_all")
    res: dict[tuple[str, str], list[dict]] = {}
    with local_pool() as env:
        for _ in range(a.repeat):  # alternate, so both sides see the same machine state
            for kind in KINDS:
                if kind in local_kinds:
                    res.setdefault(("local", kind), []).append(run(local_env, kind, a.steps))
                res.setdefault(("remote", kind), []).append(run(env, kind, a.steps))

    def med(side: str, kind: str, field: str = "ms_per_step") -> float:
        return statistics.median(r[field] for r in res[(side, kind)])

    base = med("local", "eager")
    rows = [
        ("MLP step, eager (ms)", base, med("remote", "eager"), "", None),
        ("MLP step, make_graphed_callables (ms)", base, med("remote", "graphed"), "<= 1.0x", None),
        ("MLP step, torch.compile model (ms)", base, med("remote", "compile"), "<= 1.0x", None),
        ("MLP step, compile model+optimizer (ms)", base, med("remote", "compile_all"), "<= 1.0x",
         None),
        ("  same, vs local torch.compile model (ms)", med("local", "compile"),
         med("remote", "compile"), "", None),
        ("  same, vs local compile model+optimizer (ms)", med("local", "compile_all"),
         med("remote", "compile_all"), "", None),
        ("first step incl. compile, model (s)", med("local", "compile", "setup_s"),
         med("remote", "compile", "setup_s"), "", None),
        ("first step incl. compile, model+opt (s)", med("local", "compile_all", "setup_s"),
         med("remote", "compile_all", "setup_s"), "", None),
    ]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; remote = vGPU on an emulated GPU (CPU); medians of "
          f"{a.repeat} alternating processes x 5 rounds of {a.steps} steps")
    print(f"{'workload':46} {'local':>9} {'remote':>9} {'ratio':>6}  target")
    out_rows = []
    for name, loc, rem, target, _ in rows:
        ratio = rem / loc
        met = ratio <= 1.0 if target else None
        print(f"{name:46} {loc:9.2f} {rem:9.2f} {ratio:6.2f}  {target}"
              + ("" if met is None else (" met" if met else " NOT met")))
        out_rows.append({"name": name.strip(), "local": loc, "remote": rem, "ratio": ratio,
                         "target": target, "met": met})
    if a.json:
        import localpool
        writer = getattr(localpool, "write_json", None)
        if writer is not None:
            writer(a.json, "graphs", out_rows)
        else:
            Path(a.json).write_text(json.dumps({"benchmark": "graphs", "rows": out_rows}))


if __name__ == "__main__":
    main()
