"""Forked session workers (workerpool.py): an idle real worker forks the pool's new
workers, which share its imported torch copy-on-write. They are still the manager's own
children (reaped here, exit status and all), hold no thread, fd or secret they should not,
and a crash of one ends its session only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from sessions_support import (
    Server,
    child_pids,
    make_grant,
    make_hello,
    open_session,
    wait_until,
)

from orion_vgpu.protocol import frames
from orion_vgpu.protocol import messages as m
from orion_vgpu.server.workerpool import AdoptedProc, Worker, WorkerPool, _send_with_fd

pytest.importorskip("orion_vgpu.server.worker")


@pytest.fixture(autouse=True)
def real_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORION_WORKER_MODULE", raising=False)
    monkeypatch.delenv("ORION_WORKER_FORK", raising=False)
    # In the manager's environment, as in oriond's: no worker may inherit it.
    monkeypatch.setenv("ORION_POOL_TOKEN", "secret-pool-token")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _private_mib(pid: int) -> float:
    kib = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def _warm_forkers(pool: WorkerPool, n: int) -> list[Worker]:
    return wait_until(lambda: len(ws := [w for w in pool._idle if w.can_fork]) >= n and ws,
                      timeout=120)


def _stats(sock) -> list:  # noqa: ANN001
    frames.send_frame(sock, msgpack.packb([m.CMD_STATS]))
    body, _ = frames.recv_frame(sock)
    return msgpack.unpackb(bytes(body), raw=False)


def _session(server: Server, **claims: object) -> tuple[object, dict, dict, int]:
    grant, got = make_grant(**claims)
    sock, welcome = open_session(server.unix_path, make_hello(grant))
    assert welcome["kind"] == m.WELCOME, welcome
    # The worker greets the client itself; the manager may record the session a moment later.
    sessions = server.manager._sessions
    pid = wait_until(lambda: welcome["session_id"] in sessions
                     and sessions[welcome["session_id"]].worker_pid)
    return sock, welcome, got, pid


def test_new_workers_are_forked_children_sharing_imports(
        start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    pool = server.manager._pool
    cold = _warm_forkers(pool, 2)
    assert all(isinstance(w.proc, subprocess.Popen) for w in cold)  # nothing to fork from
    # The first session takes one cold worker; the other is kept to fork the rest.
    a, _, ca, pid_a = _session(server)
    b, _, cb, pid_b = _session(server, vgpu=1)
    assert pid_a in {w.pid for w in cold} and pid_b not in {w.pid for w in cold}
    idle = wait_until(lambda: len(pool._idle) == 2 and list(pool._idle))
    forked = [w for w in idle if isinstance(w.proc, AdoptedProc)]
    assert forked, idle
    template_sid = os.getsid(next(w.pid for w in cold if w.pid != pid_a))
    for pid in [pid_b, *(w.pid for w in forked)]:
        state, ppid, pgrp, sid = _stat(pid)[:4]
        # Our child (adopted), its own process group, in its cold ancestor's session.
        assert (int(ppid), int(pgrp), int(sid)) == (os.getpid(), pid, template_sid)
        assert b"ORION_POOL_TOKEN" not in Path(f"/proc/{pid}/environ").read_bytes()
    for w in forked:
        assert len(os.listdir(f"/proc/{w.pid}/task")) == 1  # no thread: safe to fork
        assert sorted(os.listdir(f"/proc/{w.pid}/fd"), key=int) == ["0", "1", "2", "3"]
        # Its imports are shared: a cold worker holds about 150 MiB of its own.
        assert _private_mib(w.pid) < 16, _private_mib(w.pid)
    assert _stats(b)[0] == m.REPLY_OK and _stats(a)[0] == m.REPLY_OK

    # A crash of the forked worker ends its session only, with its exit status.
    os.kill(pid_b, signal.SIGKILL)
    assert server.events.ended(cb["alloc"])["reason"] == "killed by signal 9"
    assert _stats(a)[0] == m.REPLY_OK
    wait_until(lambda: str(pid_b) not in os.listdir("/proc"))  # reaped, not a zombie
    frames.send_frame(a, msgpack.packb([m.CMD_BYE]))
    assert server.events.ended(ca["alloc"])["reason"] == "client closed the session"
    a.close()
    b.close()


def test_forking_can_be_turned_off(start_server: Callable[..., Server],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_WORKER_FORK", "0")
    server = start_server(warm_workers=2)
    pool = server.manager._pool
    _warm_forkers(pool, 2)
    sock = _session(server)[0]
    # The replacement is started cold (python -m), as every worker before forking.
    wait_until(lambda: len(pool._idle) == 2, timeout=120)
    assert len(pool._all) == 3
    assert all(isinstance(w.proc, subprocess.Popen) for w in pool._all)
    sock.close()


def test_orphans_from_worker_sessions_are_reaped(start_server: Callable[..., Server]) -> None:
    """A copy that cannot report to the pool (here: told to wait for another adopter) dies
    an orphan of ours: the pool reaps it, and no zombie is left behind."""
    server = start_server(warm_workers=1)
    pool = server.manager._pool
    template = _warm_forkers(pool, 1)[0]
    with pool._cond:
        template.forking = True  # ours for the moment: no session, no other fork
    parent, child = socket.socketpair()
    request = msgpack.packb({"type": "fork", "adopter": 1})
    _send_with_fd(template.ctrl, frames.HEADER.pack(len(request), 0) + request,
                  child.fileno())
    child.close()
    sid = os.getsid(template.pid)

    def strays() -> list[int]:
        return [p for p in child_pids() if p not in pool.all_pids() and int(_stat(p)[3]) == sid]

    stray = wait_until(strays)[0]  # adopted by us at once, then waits for pid 1 in vain
    assert _stat(stray)[0] != "Z"
    wait_until(lambda: stray not in child_pids(), timeout=60)
    with pool._cond:
        template.forking = False
    parent.close()
