"""Session lifetime: how sessions end, stats, the warm pool, start() errors and stop()."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest
from sessions_support import (
    DEVICES,
    TOKEN,
    Events,
    FakeServerConfig,
    Server,
    child_pids,
    make_grant,
    make_hello,
    open_session,
    recv_msg,
    send_msg,
    wait_until,
)

from orion_vgpu.server.sessions import Session, SessionManager

pytestmark = pytest.mark.usefixtures("fake_worker")


@pytest.mark.parametrize(("command", "reason"), [
    ({"end": "client said goodbye"}, "client said goodbye"),
    ({"exit": 3}, "worker exited with code 3"),
    ({"signal": signal.SIGKILL}, "killed by signal 9"),
    (None, "client disconnected"),  # the client connection dies
])
def test_session_ended_reason(start_server: Callable[..., Server], command: dict | None,
                              reason: str) -> None:
    server = start_server()
    sock, reply, claims = server.session()
    if command is None:
        sock.close()
    else:
        send_msg(sock, command)
    ended = server.events.ended(claims["alloc"])
    assert ended == {"type": "session_ended", "allocation_id": claims["alloc"],
                     "vgpu_index": 0, "reason": reason}
    kinds = [e["type"] for e in server.events.items if e["allocation_id"] == claims["alloc"]]
    assert kinds == ["session_started", "session_ended"]
    # Reaped: the worker is no child of ours any more (not even a zombie).
    wait_until(lambda: reply["pid"] not in child_pids(), timeout=5)
    assert server.manager.stats()["sessions"] == []
    sock.close()


def test_stats_aggregates_sessions_per_gpu(start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    a, _, ca = server.session()
    b, _, cb = server.session()
    grant, cc = make_grant(gpu_index=1, gpu="GPU-fake-1", vgpu=1)
    c, reply = open_session(server.tcp, make_hello(grant))
    assert reply["kind"] == "orion-welcome"
    time.sleep(0.3)
    for sock, mem, busy in ((a, 100, 0.3), (b, 50, 0.3), (c, 7, 0.0)):
        send_msg(sock, {"stats": {"mem_used_bytes": mem, "busy_s": busy, "ops": 5}})
        assert recv_msg(sock) == {"ok": True}
    # The worker's control message and its reply to us race: wait for the manager.
    stats = wait_until(lambda: (st := server.manager.stats()) and sorted(
        s["mem_used_bytes"] for s in st["sessions"]) == [7, 50, 100] and st)
    by_alloc = {s["allocation_id"]: s for s in stats["sessions"]}
    assert set(by_alloc) == {ca["alloc"], cb["alloc"], cc["alloc"]}
    assert by_alloc[cc["alloc"]] == {"allocation_id": cc["alloc"], "vgpu_index": 1,
                                     "mem_used_bytes": 7, "busy_pct": 0.0}
    # 0.3 s busy within ~0.3-0.5 s of session life
    for alloc in (ca["alloc"], cb["alloc"]):
        assert 40.0 <= by_alloc[alloc]["busy_pct"] <= 100.0
    gpus = {g["uuid"]: g for g in stats["gpus"]}
    assert gpus["GPU-fake-0"]["mem_used_bytes"] == 150
    assert gpus["GPU-fake-0"]["busy_pct"] == 100.0 or gpus["GPU-fake-0"]["busy_pct"] == round(
        by_alloc[ca["alloc"]]["busy_pct"] + by_alloc[cb["alloc"]]["busy_pct"], 1)
    assert gpus["GPU-fake-1"] == {"uuid": "GPU-fake-1", "mem_used_bytes": 7, "busy_pct": 0.0}
    a.close()
    server.events.ended(ca["alloc"])
    assert {s["allocation_id"] for s in server.manager.stats()["sessions"]} == {
        cb["alloc"], cc["alloc"]}
    b.close()
    c.close()


def test_busy_pct_from_deltas() -> None:
    s = Session("s", "a", 0, "u")
    assert s.busy_pct() == 0.0
    s.busy_samples = deque([(10.0, 1.0), (11.0, 1.25), (12.0, 1.5)], maxlen=6)
    assert s.busy_pct() == 25.0
    s.busy_samples.append((13.0, 3.0))  # more busy than wall time (clock skew): capped
    assert s.busy_pct() == 66.7
    s.busy_samples = deque([(10.0, 0.0), (11.0, 5.0)], maxlen=6)
    assert s.busy_pct() == 100.0


def test_stats_lists_every_gpu_when_idle(start_server: Callable[..., Server]) -> None:
    server = start_server()
    assert server.manager.stats() == {
        "sessions": [],
        "gpus": [{"uuid": d.uuid, "mem_used_bytes": 0, "busy_pct": 0.0} for d in DEVICES]}


def test_warm_pool_refills_and_replaces_dead_idle_worker(
        start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    pool = server.manager._pool
    idle = wait_until(lambda: len(pool.idle_pids()) == 2 and pool.idle_pids())
    sock, reply, _ = server.session()
    assert reply["pid"] in idle  # served by a pre-started worker
    wait_until(lambda: len(pool.idle_pids()) == 2)  # replacement started
    victim = pool.idle_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(pool.idle_pids()) == 2 and victim not in pool.idle_pids())
    wait_until(lambda: victim not in child_pids())  # reaped
    sock.close()
    assert not [e for e in server.events.items if e["type"] == "session_ended"
                and "signal" in e["reason"]]


def test_ready_workers_preferred(start_server: Callable[..., Server],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER_START", "ready")
    server = start_server(warm_workers=1)
    pool = server.manager._pool
    wait_until(lambda: any(w.ready for w in pool._idle))
    sock, reply, _ = server.session()
    sock.close()


def test_broken_worker_module_refuses_clients(start_server: Callable[..., Server],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER_START", "exit3")
    server = start_server(warm_workers=1)
    # Early clients may be handed to a worker that dies before it greets them (they see
    # the connection close); once the failures pile up the server refuses with a reason.
    deadline = time.monotonic() + 15
    while True:
        grant, _ = make_grant()
        sock, reply = _try_session(server, grant)
        sock.close()
        if reply is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert reply["kind"] == "orion-refused"
    assert reply["reason"] == ("session workers keep failing to start (worker exited with "
                               "code 3); see the server log")


def _try_session(server: Server, grant: str) -> tuple[socket.socket, dict | None]:
    from orion_vgpu.protocol import frames
    sock = socket.create_connection(server.tcp, timeout=10)
    send_msg(sock, make_hello(grant))
    try:
        return sock, recv_msg(sock)
    except frames.PeerClosed:
        return sock, None


def test_unstartable_worker_refuses_client(start_server: Callable[..., Server],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # No warm workers: each client needs a worker started for it.
    server = start_server(warm_workers=0)
    pool = server.manager._pool
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    grant, claims = make_grant()
    sock, reply = _try_session(server, grant)
    assert reply is not None and reply["kind"] == "orion-refused"
    assert (reply["reason"].startswith("could not start a session worker: [Errno 2]")
            or "keep failing to start" in reply["reason"]), reply
    sock.close()
    # The grant was not burnt: once workers start again the same grant is accepted.
    monkeypatch.undo()
    monkeypatch.setenv("ORION_WORKER_MODULE", "orion_fake_worker")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pool._failures = 0
    pool._retry_at = 0.0
    sock, reply = _try_session(server, grant)
    assert reply is not None and reply["kind"] == "orion-welcome"
    sock.close()


def test_stop_ends_sessions_and_leaves_no_children(start_server: Callable[..., Server]) -> None:
    before = child_pids()
    server = start_server(warm_workers=2)
    sock, reply, claims = server.session()
    pids = set(server.manager._pool.all_pids()) | {reply["pid"]}
    unix = server.unix_path
    assert unix is not None and unix.exists()
    t0 = time.monotonic()
    server.manager.stop()
    assert time.monotonic() - t0 < 2.0
    assert not pids & child_pids()
    assert child_pids() <= before
    assert server.events.ended(claims["alloc"], timeout=0)["reason"] == (
        "server stopped (killed by signal 15)")
    assert not unix.exists()
    with pytest.raises(OSError):
        socket.create_connection(server.tcp, timeout=2)
    server.manager.stop()  # idempotent
    sock.close()


def test_stop_kills_workers_that_ignore_sigterm(start_server: Callable[..., Server],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER_START", "ignore-term")
    server = start_server(warm_workers=1, stop_grace_s=0.5)
    sock, reply, claims = server.session()
    t0 = time.monotonic()
    server.manager.stop()
    assert 0.4 < time.monotonic() - t0 < 3.0
    assert reply["pid"] not in child_pids()
    assert server.events.ended(claims["alloc"], timeout=0)["reason"] == (
        "server stopped (killed by signal 9)")
    sock.close()


def test_refused_after_stop_began(start_server: Callable[..., Server]) -> None:
    server = start_server()
    server.manager.stop()
    assert server.manager._pool.all_pids() == []


# -- start() errors ------------------------------------------------------------------------


def _manager(tmp_path: Path, **cfg: object) -> SessionManager:
    return SessionManager(devices=DEVICES, server_cfg=FakeServerConfig(**cfg),
                          pool_token=TOKEN, session_log_dir=tmp_path / "s", on_event=Events())


def test_start_fails_clearly_when_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = _manager(tmp_path, unix_socket=None, listen_port=port)
        with pytest.raises(OSError) as info:
            m.start()
        m.stop()
    assert info.value.errno == errno.EADDRINUSE
    assert f"cannot listen for sessions on 127.0.0.1:{port}" in str(info.value)


def test_start_refuses_non_socket_and_live_socket(tmp_path: Path) -> None:
    short = Path(os.environ.get("TMPDIR", "/tmp")) / f"orion-t-{os.getpid()}"
    short.mkdir(exist_ok=True)
    try:
        regular = short / "file.sock"
        regular.write_text("keep me")
        m = _manager(tmp_path, unix_socket=regular)
        with pytest.raises(OSError, match="exists and is not a socket"):
            m.start()
        m.stop()
        assert regular.read_text() == "keep me"

        live = short / "live.sock"
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(live))
            other.listen()
            m = _manager(tmp_path, unix_socket=live)
            with pytest.raises(OSError, match="another server is already listening") as info:
                m.start()
            m.stop()
        assert info.value.errno == errno.EADDRINUSE

        # `live` is now stale (nobody listens): it is replaced.
        m = _manager(tmp_path, unix_socket=live)
        m.start()
        try:
            assert stat_mode(live) == 0o666
        finally:
            m.stop()
    finally:
        for p in short.iterdir():
            p.unlink()
        short.rmdir()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_socket_options(start_server: Callable[..., Server]) -> None:
    server = start_server()
    for listener, _kind in server.manager._listeners:
        # Linux doubles the requested size for bookkeeping.
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 4 * 2**20
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 * 2**20


def test_stop_cuts_pending_handshakes_short(start_server: Callable[..., Server]) -> None:
    server = start_server(hello_timeout_s=10.0)
    silent = socket.create_connection(server.tcp, timeout=5)
    wait_until(lambda: server.manager._pending)
    t0 = time.monotonic()
    server.manager.stop()
    assert time.monotonic() - t0 < 2.0
    assert not server.manager._pending
    silent.close()
