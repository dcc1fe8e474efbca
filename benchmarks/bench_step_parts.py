"""Where an eager MLP step's time goes: zero_grad, forward, backward and Adam's step, each
timed on the client (no sync inside a step), locally and on a vGPU, in the same run.

    .venv/bin/python benchmarks/bench_step_parts.py [--steps 2000] [--repeat 3]

The data-plane benchmark's MLP (4 layers of width 64, batch 32, mse, Adam with its default
implementation: a for-loop on the CPU, for-each on a vGPU, as PyTorch picks for CUDA).
A loss is read every 20 steps (that step is left out); each figure is the median over the
steps of one process, then the median over ``--repeat`` processes, local and remote
alternating. Remote = a vGPU on an emulated GPU (CPU): the time is the client's, the
server runs the ops meanwhile on the other core.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, run_json, step_args  # noqa: E402

PARTS = ("zero_grad", "forward", "backward", "optimizer")


def workload(steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from workloads import mlp_setup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt, x, y = mlp_setup(dev)
    spent: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(steps + 100):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if (i + 1) % 20 == 0:
            loss.item()  # the sync waits for the server: not part of any phase
        elif i >= 100:
            for part, a, b in zip(PARTS, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                spent[part].append(b - a)
    return {p: statistics.median(v) * 1e6 for p, v in spent.items()}


def run(env: dict[str, str], steps: int) -> dict:
    return run_json([__file__, "--workload", str(steps)], env, timeout=600)


def main() -> None:
    a = step_args(__doc__, 2000, workload)
    if a is None:
        return
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    loc: list[dict] = []
    rem: list[dict] = []
    with local_pool() as env:
        for _ in range(a.repeat):
            loc.append(run(local_env, a.steps))
            rem.append(run(env, a.steps))
    print(f"{'phase (us per step, client side)':34} {'local':>8} {'remote':>8} {'ratio':>7}")
    tl = tr = 0.0
    for p in PARTS:
        lv = statistics.median(d[p] for d in loc)
        rv = statistics.median(d[p] for d in rem)
        tl, tr = tl + lv, tr + rv
        print(f"{p:34} {lv:8.1f} {rv:8.1f} {rv / lv:7.2f}")
    print(f"{'sum':34} {tl:8.1f} {tr:8.1f} {tr / tl:7.2f}")


if __name__ == "__main__":
    main()
