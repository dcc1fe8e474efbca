"""Errors a user meets say what happened in one line, and nothing leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e.cluster import SCRIPTS, active_allocations, client_env, run_script, wait_for
from pool import ControllerProc, free_port


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, proc.stderr  # one clear line, no traceback
    assert err[0].startswith("orion: error:"), err
    for n in needles:
        assert n in err[0], err


def test_controller_unreachable(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path / "none")
    ctl.port = free_port()  # nothing listens there
    proc = run_script("mlp.py", client_env(ctl, tmp_path / "c"), timeout=60)
    _one_line_error(proc, "cannot reach the Orion Controller", ctl.addr)


def test_pool_exhausted(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="3", ORION_GMEM="16000")
    _one_line_error(run_script("mlp.py", env, timeout=60), "cannot grant 3 vGPU")


def test_server_unreachable(pool, tmp_path: Path) -> None:
    ctl, srv = pool
    srv.kill()  # the controller still lists the node until its heartbeats time out
    proc = run_script("mlp.py", client_env(ctl, tmp_path / "c", ORION_ENABLE_NET="1"),
                      timeout=60)
    assert proc.returncode != 0
    assert "orion: error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sigkill_client_frees_memory_and_grant(pool, tmp_path: Path) -> None:
    ctl, srv = pool
    env = client_env(ctl, tmp_path / "c")
    p = subprocess.Popen([sys.executable, str(SCRIPTS / "hold.py")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("READY")
        assert wait_for(lambda: len(active_allocations(ctl)) == 1, timeout=10)
        used = lambda: sum(g.get("mem_used_bytes") or 0 for g in ctl.get("/pool").json()["gpus"])  # noqa: E731
        wait_for(lambda: used() > 0, timeout=5)
        os.kill(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for(lambda: not active_allocations(ctl), timeout=5), "grant not freed in 5 s"
        freed_in = time.monotonic() - t0
        assert freed_in < 5
        assert ctl.get("/pool").json()["vgpu_free"] == 8
        assert "client disconnected" in "".join(p.read_text() for p in srv.session_logs())
    finally:
        p.kill()
        p.wait()


def test_oom_in_one_program_leaves_neighbour_on_same_gpu_unaffected(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    # vgpu_count 4 with binpack: both programs land on the same emulated GPU.
    n_env = client_env(ctl, tmp_path / "n")
    neighbour = subprocess.Popen([sys.executable, str(SCRIPTS / "neighbour.py")], env=n_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    oom = run_script("oom.py", client_env(ctl, tmp_path / "o", ORION_GMEM="64"))
    out, err = neighbour.communicate(timeout=120)
    assert oom.returncode == 0 and "RESULT oom OutOfMemoryError" in oom.stdout, oom.stderr
    assert neighbour.returncode == 0, err
    assert "RESULT ok" in out
    allocs = ctl.get("/allocations", params={"state": "all"}).json()
    allocs = allocs if isinstance(allocs, list) else allocs.get("allocations", [])
    gpus = {(a["vgpus"][0]["node_id"], a["vgpus"][0]["gpu_index"]) for a in allocs[-2:]}
    assert len(gpus) == 1, "both programs shared one physical GPU"
