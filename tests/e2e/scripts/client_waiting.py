# A program's waits for its vGPU are visible to the server: while the main thread waits for
# a reply (synchronize), the shared arena says so; before and after, it says "running".
# Prints WAITING <seen while synchronizing> RUNNING <before> <after>.
import threading

import torch

from orion_vgpu.client.runtime import get_runtime

x = torch.randn(512, 512, device="cuda")
arena = get_runtime().conn(0).arena
assert arena is not None, "no shared memory with the server"
before = arena.client_running()
for _ in range(200):
    x = torch.tanh(x @ x)  # work the server is still doing when synchronize() starts
seen = set()
stop = threading.Event()


def watch() -> None:
    while not stop.is_set():
        seen.add(arena.client_running())


t = threading.Thread(target=watch)
t.start()
torch.cuda.synchronize()
stop.set()
t.join()
print("WAITING", False in seen, "RUNNING", before, arena.client_running())
