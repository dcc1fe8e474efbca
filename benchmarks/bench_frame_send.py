"""What sending a frame of commands costs the client: each ``sendmsg`` of an eager MLP
loop (the data-plane benchmark's step, a loss read every 20 steps), timed on the client,
on a vGPU of a throwaway pool. Not in the suite: a diagnosis of the wake-up cost (a send
that wakes a worker asleep in recv; protocol/waiting.py).

    .venv/bin/python benchmarks/bench_frame_send.py [--steps 3000] [--repeat 3]

Prints per run the percentiles of one send (us), its mean, the frames sent a step and the
frame's median size; local execution sends nothing, so there is no local column.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, run_json, step_args  # noqa: E402

WARMUP = 500  # sends left out: the first steps probe every op


def workload(steps: int) -> dict:
    import torch.nn.functional as F

    from orion_vgpu.client import transport
    from workloads import mlp_setup

    model, opt, x, y = mlp_setup("cuda")
    send = transport.frames.send_frame
    took: list[int] = []
    sizes: list[int] = []

    def timed(sock, body, payload=()):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter_ns()
        send(sock, body, payload)
        took.append(time.perf_counter_ns() - t0)
        sizes.append(len(body))

    transport.frames.send_frame = timed
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if (i + 1) % 20 == 0:
            loss.item()
    q = sorted(took[WARMUP:])
    return {"pcts_us": {p: q[int(p / 100 * len(q))] / 1e3 for p in (10, 50, 90, 99)},
            "mean_us": statistics.fmean(q) / 1e3, "frames_per_step": len(took) / steps,
            "median_bytes": statistics.median(sizes)}


def main() -> None:
    a = step_args(__doc__, 3000, workload)
    if a is None:
        return
    with local_pool() as env:
        for _ in range(a.repeat):
            r = run_json([__file__, "--workload", str(a.steps)], env, timeout=600)
            pcts = "  ".join(f"p{p} {v:.1f}" for p, v in r["pcts_us"].items())
            print(f"send (us): {pcts}  mean {r['mean_us']:.1f}  frames/step "
                  f"{r['frames_per_step']:.2f}  {r['median_bytes']:.0f} B a frame")


if __name__ == "__main__":
    main()
