# When the server has run every frame sent, a command that makes a large tensor goes out
# at once (with the light ones queued before it); while the server is busy it waits for
# a full frame as before. Prints STARVED <after sync> LIGHT <frames> HEAVY <frames>
# BUSY <frames> DONE <frames run == frames sent after a sync>, for the second of two
# rounds (the first one's ops are new to the session: each is a round trip of its own).
import time

import torch

from orion_vgpu.client.runtime import get_runtime

conn = get_runtime().conn(0)
assert conn.arena is not None, "no shared memory with the server"


def synced() -> bool:
    """Sync, then wait until the server has published the frame it answered as run."""
    torch.cuda.synchronize()
    deadline = time.monotonic() + 5
    while not conn.starved() and time.monotonic() < deadline:
        time.sleep(0.001)
    return conn.starved()


a = torch.ones(1 << 11, 1 << 11, device="cuda")
for _ in range(2):
    starved = synced()
    n0 = conn.frames_sent
    small = torch.ones(8, device="cuda") * 2  # light: queued
    light = conn.frames_sent - n0
    big = torch.ones(1 << 18, device="cuda")  # 1 MiB, server idle: sent now, with the light
    heavy = conn.frames_sent - n0
    synced()
    b = a @ a  # sent at once too (server idle); keeps it busy for a while
    n1 = conn.frames_sent
    c = torch.ones(1 << 18, device="cuda")  # large, but the server is busy: queued
    busy = conn.frames_sent - n1
    done = synced() and conn.arena.frames_done() == conn.frames_sent
    assert small.sum().item() == 16 and big.sum().item() == 1 << 18
    assert c.sum().item() == 1 << 18 and b[0, 0].item() == 1 << 11
print("STARVED", starved, "LIGHT", light, "HEAVY", heavy, "BUSY", busy, "DONE", done)
