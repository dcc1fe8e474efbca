# Tiny ops with a sync every 10, run on the CPUs given as arguments beside a busy process
# (a crowded core): the program waits for its replies in a crowd. Prints RESULT <count>
# and WAITER <the poll kept for a crowd> <the waiter found its core crowded>.
import os
import subprocess
import sys

cpus = {int(c) for c in sys.argv[1:]}
os.sched_setaffinity(0, cpus)
import torch  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.zeros(1, dtype=torch.float64, device=dev)
x.add_(1).item()
rival = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                         preexec_fn=lambda: os.sched_setaffinity(0, cpus))
try:
    for _ in range(300):
        for _ in range(10):
            x.add_(1)
        x.item()
finally:
    rival.kill()
    rival.wait()
print("RESULT", x.item())
if dev == "cuda":
    from orion_vgpu.client.runtime import get_runtime

    waiter = get_runtime().conn(0)._waiter
    print("WAITER", waiter.crowd_spin_s, waiter._crowded)
