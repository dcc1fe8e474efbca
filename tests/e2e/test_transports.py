"""Unix socket, TCP, shared memory and an `orion shm` arena all carry the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.cluster import ServerProc, client_env, result_lines, run_local, run_script
from orion_vgpu.protocol import waiting
from pool import ControllerProc


def _client_log(home: Path) -> str:
    return "".join(p.read_text() for p in sorted((home / "log").glob("client-*.log")))


@pytest.mark.parametrize(("net", "shm", "expect_where", "expect_shm"), [
    ("0", "", "via unix:", "shm yes"),
    ("1", "", "via 127.0.0.1:", "shm yes"),
    ("1", "off", "via 127.0.0.1:", "shm no"),
])
def test_transfers_bit_exact(pool, tmp_path: Path, net: str, shm: str, expect_where: str,
                             expect_shm: str) -> None:
    ctl, _ = pool
    home = tmp_path / "c"
    env = client_env(ctl, home, ORION_ENABLE_NET=net, ORION_SHM=shm)
    proc = run_script("transfer.py", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("RESULT ok")
    log = _client_log(home)
    assert expect_where in log and expect_shm in log, log


def test_orion_shm_arena_for_containers(pool, tmp_path: Path) -> None:
    """A container that mounts only /dev/shm/orionsock<N> uses that file as its arena."""
    ctl, _ = pool
    shm_dir = Path("/dev/shm")
    index = 900 + (hash(str(tmp_path)) % 90)
    arena = shm_dir / f"orionsock{index}"
    made = subprocess.run([sys.executable, "-m", "orion_vgpu.cli", "shm", "-i", str(index),
                           "-s", "64"], capture_output=True, text=True)
    try:
        assert made.returncode == 0, made.stderr
        assert arena.exists() and arena.stat().st_size == 64 << 20
        home = tmp_path / "c"
        env = client_env(ctl, home, ORION_SHM=str(arena), ORION_ENABLE_NET="1")
        proc = run_script("transfer.py", env)
        assert proc.returncode == 0, proc.stderr
        assert "shm yes" in _client_log(home)
        # Host buffers are files the server could not see from such a container: not used.
        proc = run_script("host_buffers.py", env)
        assert proc.returncode == 0, proc.stderr
        assert "BUFFERS 0" in proc.stdout, proc.stdout
    finally:
        arena.unlink(missing_ok=True)


def test_uploads_the_program_dropped_are_freed_before_the_next(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c")
    proc = run_script("upload_loop.py", env)
    assert proc.returncode == 0, proc.stderr
    most = int(proc.stdout.split("MOST")[1])
    # One upload held (plus, for a moment, the one before it): 16 x 4 MiB + 4 x 36 MiB if
    # dropped tensors waited for the next op.
    assert most <= 2 * 36, proc.stdout


@pytest.mark.parametrize("cache", ["", "0"])
def test_host_buffers_carry_large_transfers_as_local(pool, tmp_path: Path, cache: str) -> None:
    """Uploads and downloads of 16 MiB go through host buffers (``ORION_HOST_CACHE_MB=0``:
    through the arena): same results as the script run locally, a few buffers reused for a
    loop of twenty, none left in the shm directory when the program is gone."""
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_HOST_CACHE_MB=cache)
    proc = run_script("host_buffers.py", env)
    assert proc.returncode == 0, proc.stderr
    local = run_local("host_buffers.py")
    assert local.returncode == 0, local.stderr

    def field(out: str, key: str) -> str:
        return out.split(key + " ", 1)[1].split("\n", 1)[0]

    assert field(proc.stdout, "SUMS") == field(local.stdout, "SUMS")
    made = int(field(proc.stdout, "BUFFERS"))
    assert (1 <= made <= 8) if cache == "" else made == 0, proc.stdout
    for name in field(proc.stdout, "NAMES").split():
        assert not (Path("/dev/shm") / name).exists(), name


def test_the_server_sees_when_a_program_waits(pool, tmp_path: Path) -> None:
    """An emulated GPU gives a co-located program's core back to its ops only while the
    program waits for a reply: the arena carries that state (Executor.client_running)."""
    ctl, _ = pool
    proc = run_script("client_waiting.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["WAITING", "True", "RUNNING", "True", "True"], proc.stdout


def test_a_large_op_goes_out_at_once_when_the_server_is_idle(pool, tmp_path: Path) -> None:
    """The server publishes the frames it has run in the arena; a command that makes a
    large tensor while it has run them all is sent at once instead of waiting for a full
    frame (the worker sat idle at each step's start); light commands, and large ones while
    the server is busy, are batched as before."""
    ctl, _ = pool
    proc = run_script("starved_flush.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["STARVED", "True", "LIGHT", "0", "HEAVY", "1", "BUSY", "0",
                                   "DONE", "True"], proc.stdout


def _split_pool(tmp_path: Path, server_cpus: set[int]) -> tuple[ControllerProc, ServerProc]:
    ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10})
    ctl.start()
    try:
        srv = ServerProc(ctl, tmp_path / "server", cpus=server_cpus).start()
    except BaseException:
        ctl.stop()
        raise
    return ctl, srv


def test_a_program_on_cores_apart_from_its_server_polls_in_a_crowd(tmp_path: Path) -> None:
    """The server says where it runs (the welcome's placement); a program on other cores
    polls for its replies even on a crowded core (protocol.waiting.CROWD_SPIN_S), one on
    the server's cores sleeps there; both compute what the CPU computes."""
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this test needs 2 CPUs: one for the server, one for the program"
    client = [str(c) for c in cpus[:-1]]
    local = result_lines(run_local("crowd_wait.py", *client))
    ctl, srv = _split_pool(tmp_path, {cpus[-1]})
    try:
        apart = run_script("crowd_wait.py", client_env(ctl, tmp_path / "a"), *client)
        shared = run_script("crowd_wait.py", client_env(ctl, tmp_path / "b"), str(cpus[-1]))
    finally:
        srv.stop()
        ctl.stop()
    assert result_lines(apart) == local == [f"RESULT {1 + 300 * 10:.1f}"]
    assert result_lines(shared) == local
    assert f"WAITER {waiting.CROWD_SPIN_S} True" in apart.stdout, apart.stdout
    assert "WAITER 0.0 True" in shared.stdout, shared.stdout
    assert "server on other cores" in _client_log(tmp_path / "a")
    assert "server on these cores" in _client_log(tmp_path / "b")
