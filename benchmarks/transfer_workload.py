"""Transfer timings inside one client process; prints one JSON line (MB/s per size)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def timed(fn, reps: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    remote = torch.cuda.is_available()
    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        reps = 5 if n >= 1 << 26 else 20
        host = torch.empty(n, dtype=torch.uint8).fill_(7)
        row = {"memcpy": n / timed(lambda: host.clone(), reps) / 1e6}  # noqa: B023
        if remote:
            dev = host.to("cuda")
            dev.sum().item()
            row["h2d"] = n / timed(lambda: (host.to("cuda"), torch.cuda.synchronize()), reps) / 1e6  # noqa: B023
            row["d2h"] = n / timed(lambda: dev.cpu(), reps) / 1e6  # noqa: B023
            if torch.cuda.device_count() > 1:
                row["d2d"] = n / timed(lambda: (dev.to("cuda:1"), torch.cuda.synchronize()), reps) / 1e6  # noqa: B023
        out[str(n)] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
