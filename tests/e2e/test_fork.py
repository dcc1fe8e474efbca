"""A vGPU program that forks (multiprocessing's default start method, DataLoader workers)
gets CUDA's behaviour: a child forked before the parent used its vGPU has a session of
its own, one forked after cannot reach the parent's (it would write into the parent's
socket and shared memory), and the parent goes on."""

from __future__ import annotations

import re
from pathlib import Path

from e2e.cluster import active_allocations, client_env, run_script, wait_for

FORKED = ("OrionError: Cannot re-initialize CUDA in forked subprocess: this process was "
          "forked after its parent opened its vGPU session. To use CUDA with multiprocessing, "
          "you must use the 'spawn' start method")


def test_forked_children_get_cuda_semantics(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    proc = run_script("fork.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [
        "RESULT fresh-child 6.0",
        "RESULT fresh-child-exit 0",
        "RESULT loader orion_vgpu.client.errors." + FORKED,
        "RESULT fork-child " + FORKED,
        "RESULT parent 51.0",  # a + (b + 1), b = 2a: the parent's session is intact
    ]
    granted = re.findall(r"allocation (\S+) granted", proc.stderr)
    exited = re.findall(r"Client exits with allocation ID (\S+)", proc.stderr)
    assert len(set(granted)) == 2, proc.stderr  # the fresh child's, then the parent's
    assert sorted(exited) == sorted(granted), proc.stderr  # the child's, though it os._exit()s
    assert wait_for(lambda: not active_allocations(ctl), timeout=15)
