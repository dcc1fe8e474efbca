"""The NVML-backed queries of ``torch.cuda`` (utilization, device_memory_used,
list_gpu_processes, ...) for vGPUs.

A client host has no GPU and no NVML, and the GPU's own counters would describe every
tenant of it anyway. What a vGPU can answer truthfully comes from its session: the share of
time its ops kept the device busy, and the memory the session holds on the server. Each
answer is one round trip to the server (after the ops queued before it, as a sync would
be). What only the hardware knows (temperature, power, clocks, memory bandwidth use) raises
an error that says so, instead of NVML's "library not found".
"""

from __future__ import annotations

import os
import time
from typing import Any

from orion_vgpu.client.runtime import get_runtime

# (monotonic time, busy seconds) of each vGPU at the previous utilization() call.
_samples: dict[int, tuple[float, float]] = {}


def session_stats(idx: int) -> dict | None:
    """The session's CMD_STATS reply (allocated, peak, limit, ops, busy_s); None before
    the program's first CUDA work."""
    rt = get_runtime()
    if not rt.started:
        return None  # no CUDA work yet: nothing has run, and no session is opened for it
    return rt.conn(idx).stats()


def utilization(idx: int) -> int:
    """Percent of the time since the previous call (the first: since the session opened)
    that this program's ops kept its vGPU busy, as nvidia-smi's GPU utilization."""
    stats = session_stats(idx)
    if stats is None:
        return 0
    now, busy = time.monotonic(), float(stats.get("busy_s", 0.0))
    t0, busy0 = _samples.get(idx, (get_runtime().conn(idx).opened, 0.0))
    _samples[idx] = (now, busy)
    wall = now - t0
    if wall <= 0:
        return 0
    return max(0, min(100, round(100.0 * (busy - busy0) / wall)))


def device_memory_used(idx: int) -> int:
    """Bytes this program's session holds on the server (its share of the GPU's memory)."""
    stats = session_stats(idx)
    return 0 if stats is None else int(stats.get("allocated", 0))


def list_gpu_processes(idx: int) -> str:
    """torch.cuda.list_gpu_processes' text for a vGPU: this program is its only process."""
    used = device_memory_used(idx)
    if get_runtime().started:
        where = get_runtime().conn(idx).where
        proc = f"process {os.getpid():>10d} uses {used / 2**20:>12.3f} MB GPU memory"
        return f"GPU:{idx} (vGPU on Orion Server {where})\n{proc}"
    return f"GPU:{idx} (vGPU, no session yet)\nno processes are running"


def hardware_only(name: str, instead: str) -> Any:
    """A torch.cuda query only the GPU's hardware counters can answer."""
    def query(device: Any = None) -> int:
        raise RuntimeError(f"torch.cuda.{name}() reads the GPU's hardware counters (NVML), "
                           f"which a vGPU does not expose; use {instead} instead")
    query.__name__ = query.__qualname__ = name
    return query
