# Works on every granted vGPU and checks each result; prints READY, then TICK n after
# each round. Runs until SIGUSR1 (or for SECONDS = argv[1]), then prints RESULT ok.
import signal
import sys
import time

import torch

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
n = torch.cuda.device_count()
xs = [torch.full((1 << 20,), float(d + 1), device=f"cuda:{d}") for d in range(n)]  # 4 MiB each
ys = [torch.empty_like(x) for x in xs]  # results go here (out=): memory in use stays flat
print("READY", n, flush=True)
start = time.monotonic()
tick = 0
while not stop and (not seconds or time.monotonic() - start < seconds):
    for d, (x, y) in enumerate(zip(xs, ys, strict=True)):
        got = torch.mul(x, 2, out=y).sum().item()
        assert got == 2.0 * (d + 1) * (1 << 20), (d, got)
    tick += 1
    print("TICK", tick, flush=True)
    time.sleep(0.05)
print("RESULT ok", tick, flush=True)
