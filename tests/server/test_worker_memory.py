"""An emulated GPU's worker process: its memory cap (RLIMIT_DATA) and the cache that keeps
what its tensors freed must leave room for the threads a session starts (peer copies,
stats, collectives). Each case runs in a fresh process: the settings are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The worker's own set-up order: the cache (mallopt) first, then the cap.
_SCRIPT = """
import json, resource, threading
import torch
from orion_vgpu.server import worker

spec = {"device": "cpu", "gmem_bytes": 64 << 20}
worker._cache_freed_memory(spec)
worker._cap_process_memory(spec)
limit = resource.getrlimit(resource.RLIMIT_DATA)[0]


def data_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmData"))


release = threading.Event()
started, failed = [], []


def serve():
    try:
        held = [bytearray(100_000) for _ in range(8)]  # what a peer-copy thread allocates
        started.append(len(held))
    except MemoryError as exc:
        failed.append(repr(exc))
    release.wait()


threads = []
for _ in range(THREADS):
    t = threading.Thread(target=serve)
    try:
        t.start()
    except RuntimeError as exc:
        failed.append(repr(exc))
        break
    threads.append(t)
while len(started) + len(failed) < len(threads):
    pass
with_threads = data_kib()
release.set()
for t in threads:
    t.join()
big = torch.ones(64 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
big.fill_(1)
del big
print(json.dumps({"started": len(started), "failed": failed, "limit_kib": limit >> 10,
                  "with_threads_kib": with_threads, "after_free_kib": data_kib()}))
"""


def _run(threads: int, env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.replace("THREADS", str(threads))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")
def test_a_capped_worker_with_its_memory_cache_still_starts_threads() -> None:
    out = _run(24)
    # 24 threads is more than a session starts (16 peer connections at most, plus its own);
    # each once took a 64 MiB arena under the cap and the 16th failed to start.
    assert out["failed"] == [] and out["started"] == 24, out
    assert out["with_threads_kib"] < out["limit_kib"] - (256 << 10), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")
def test_the_memory_cache_keeps_freed_blocks_and_can_be_turned_off() -> None:
    cached = _run(1)
    uncached = _run(1, {"ORION_EMULATED_MEMORY_CACHE": "0"})
    # A freed 64 MiB block stays in the process with the cache, and is unmapped without it.
    assert cached["after_free_kib"] - uncached["after_free_kib"] >= 48 << 10, (cached, uncached)
