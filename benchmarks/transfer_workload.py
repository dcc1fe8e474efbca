"""Transfer timings inside one client process; prints one JSON line.

    python transfer_workload.py SIZE[,SIZE...] [--reps N]

Per size (bytes): ``memcpy`` (numpy copy of the same bytes into a preallocated host
buffer: the local equivalent), and on a vGPU ``h2d`` (``.to("cuda")`` then
``torch.cuda.synchronize()``, after one untimed round) and ``d2h`` (``.cpu()``). Each
figure is a median of ``reps`` timed rounds in MB/s (10^6 bytes); a round moves enough
copies that small sizes are not one timer tick. Every size is checked bit-exact both ways once, untimed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

ROUND_BYTES = 16 << 20  # at least this much per timed round for small sizes (max 64 copies)


def mbps(n: int, copies: int, reps: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(copies):
            fn()
        times.append(time.perf_counter() - t0)
    return n * copies / statistics.median(times) / 1e6


def pattern(n: int) -> torch.Tensor:
    """Random-looking bytes (a bit error anywhere shows), cheap to build for 1 GiB."""
    block = np.random.default_rng(n).integers(0, 256, min(n, 1 << 20), dtype=np.uint8)
    return torch.from_numpy(np.resize(block, n))


def measure(n: int, reps: int, remote: bool) -> dict[str, float]:
    copies = max(1, min(64, ROUND_BYTES // n))
    src = pattern(n)
    src_np, dst = src.numpy(), np.empty(n, dtype=np.uint8)
    dst[:] = 0  # fault the pages in: the local baseline copies into warm memory
    row = {"memcpy": mbps(n, copies, reps, lambda: np.copyto(dst, src_np))}
    if not remote:
        return row
    dev = src.to("cuda")
    if not torch.equal(dev.cpu(), src):
        raise SystemExit(f"transfer of {n} bytes is not bit-exact")
    outs: list[torch.Tensor] = []

    def h2d() -> None:
        outs.append(src.to("cuda"))
        if len(outs) == copies:
            torch.cuda.synchronize()
            outs.clear()

    # One untimed round first, as the local baseline's destination is faulted in: the
    # worker then reuses the memory of dropped uploads (an emulated GPU keeps freed memory,
    # as CUDA's caching allocator does) instead of faulting fresh pages in.
    mbps(n, copies, 1, h2d)
    row["h2d"] = mbps(n, copies, reps, h2d)
    row["d2h"] = mbps(n, copies, reps, dev.cpu)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    remote = torch.cuda.is_available()
    out = {}
    for n in (int(s) for s in a.sizes.split(",")):
        out[str(n)] = measure(n, a.reps if n < 256 << 20 else max(3, a.reps // 2), remote)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
