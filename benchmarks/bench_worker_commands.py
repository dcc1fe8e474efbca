"""What a session worker's own Python costs per command: a worker ``Session`` (no client,
no socket traffic) runs frames of a linear-layer pattern (``mm`` of an input by a
client-made view of a weight, bias ``add``, ``relu``, then a free of the dropped
tensors), 24 ops and 9 frees a frame, as the worker loop does (decode with handles and
views resolved as they are read, compute-share turns, outputs bound, memory ledger kept).
Not in the suite: a diagnosis of the worker's per-command overhead.

    .venv/bin/python benchmarks/bench_worker_commands.py [--frames 2000] [--repeat 3]

Prints, per run, the worker's Python time per command (its time in ``_run_frame`` less the
kernels' own), warm and with caches evicted the way a large op evicts them (a 4 MiB
``add_`` after every third op, not counted), against the kernels of the same ops called
directly in this process (the local cost of the op; its ratio).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import msgpack
import torch

from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m
from orion_vgpu.server import worker

H = codec.handle_ext
MM, ADD, RELU, THRASH = 1, 2, 3, 4
W, X, B, BIG = 1, 2, 3, 5


def _session() -> worker.Session:
    mine, _client = socket.socketpair()
    spec = {"device": "cpu", "gmem_bytes": 1 << 30, "session_id": "b" * 32,
            "device_uuid": "bench-worker-commands", "ratio": 100}
    s = worker.Session(spec, mine, control=None)  # type: ignore[arg-type]
    s._bench_client = _client  # type: ignore[attr-defined]  # kept open for the run
    for oid, name in ((MM, "aten::mm.default"), (ADD, "aten::add.Tensor"),
                      (RELU, "aten::relu.default"), (THRASH, "aten::add_.Scalar")):
        s.ex.define(oid, name)
    s.ex.store(W, torch.randn(64, 64))
    s.ex.store(X, torch.randn(32, 64))
    s.ex.store(B, torch.randn(64))
    s.ex.store(BIG, torch.empty(1 << 20))
    return s


def _frame(base: int, cold: bool) -> tuple[bytearray, int]:
    """One frame's commands and how many of them are counted (the thrash ops are not)."""
    cmds: list[list] = []
    h, x = base, X
    for _ in range(8):
        cmds.append([m.CMD_OP, MM, [H(x), codec.view_ext(W, (64, 64), (1, 64), 0)], {}, [h]])
        cmds.append([m.CMD_OP, ADD, [H(h), H(B)], {"alpha": 1}, [h + 1]])
        cmds.append([m.CMD_OP, RELU, [H(h + 1)], {}, [h + 2]])
        if cold:
            cmds.append([m.CMD_OP, THRASH, [H(BIG), 1.0], {}, [0]])
        cmds.append([m.CMD_FREE, [h, h + 1] + ([x] if x != X else [])])
        x, h = h + 2, h + 3
    cmds.append([m.CMD_FREE, [x]])
    body = bytearray(b"".join(msgpack.packb(c, default=codec.encode_default) for c in cmds))
    return body, len(cmds) - (8 if cold else 0)


def worker_us(s: worker.Session, frames: int, cold: bool) -> float:
    """The worker's Python per command (us): time in _run_frame less the kernels'."""
    ex = s.ex
    bodies = [_frame(1000 + 100 * i, cold) for i in range(50)]
    spent, commands, busy0 = 0.0, 0, ex.busy_s
    for i in range(frames):
        body, n = bodies[i % 50]
        t0 = time.perf_counter()
        s._run_frame(bytearray(body))
        spent += time.perf_counter() - t0
        commands += n
    if s.pending is not None:
        raise RuntimeError(f"a command failed: {s.pending}")
    return (spent - (ex.busy_s - busy0)) / commands * 1e6


def kernel_us(n: int) -> float:
    """The same three ops called directly (the local cost of an op), us per op."""
    w, x, b = torch.randn(64, 64), torch.randn(32, 64), torch.randn(64)
    mm, add, relu = (torch.ops.aten.mm.default, torch.ops.aten.add.Tensor,
                     torch.ops.aten.relu.default)
    t0 = time.perf_counter()
    for _ in range(n):
        relu(add(mm(x, w.t()), b))
    return (time.perf_counter() - t0) / (3 * n) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    s = _session()
    worker_us(s, 200, False)  # warm-up
    rows = []
    for _ in range(a.repeat):
        local = kernel_us(a.frames * 8)
        warm = worker_us(s, a.frames, False)
        cold = worker_us(s, max(1, a.frames // 4), True)
        rows.append((warm, cold, local))
        print(f"worker python per command: warm {warm:.2f} us, caches evicted {cold:.2f} us;"
              f" the op's own kernel called locally {local:.2f} us"
              f" (warm python / local op {warm / local:.2f})", flush=True)
    print("median: warm {:.2f} us, evicted {:.2f} us, local op {:.2f} us".format(
        *(statistics.median(r[i] for r in rows) for i in range(3))))
    if s.ex.throttle is not None:
        s.ex.throttle.close()  # leaves the share table (removed with its last session)


if __name__ == "__main__":
    main()
