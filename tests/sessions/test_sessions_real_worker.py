"""The session manager with the real worker (orion_vgpu.server.worker): hand-off, the
worker's welcome, first-op latency from a warm pool, and how its sessions end."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack
import pytest
from sessions_support import Server, make_grant, make_hello, open_session, wait_until

from orion_vgpu.protocol import frames
from orion_vgpu.protocol import messages as m

pytest.importorskip("orion_vgpu.server.worker")


@pytest.fixture(autouse=True)
def real_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORION_WORKER_MODULE", raising=False)


def _cpu_ticks(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])   # state, utime + stime


def _warm(pid: int) -> bool:
    """The worker has imported torch and sits idle, blocked on its control socket."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            if "libtorch" not in f.read():
                return False
        state, before = _cpu_ticks(pid)
        time.sleep(0.2)
        state, after = _cpu_ticks(pid)
    except OSError:
        return False
    return state == "S" and after == before


def command(sock, *cmds: list) -> list:
    body = b"".join(msgpack.packb(c) for c in cmds)
    frames.send_frame(sock, body)
    reply, payload = frames.recv_frame(sock)
    assert payload == 0
    return msgpack.unpackb(bytes(reply), raw=False)


def test_real_worker_session(start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=1)
    pool = server.manager._pool
    pid = wait_until(lambda: pool.idle_pids() and pool.idle_pids()[0])
    wait_until(lambda: _warm(pid), timeout=30)
    time.sleep(0.3)

    grant, claims = make_grant(gmem_mib=256)
    t0 = time.perf_counter()
    sock, welcome = open_session(server.unix_path, make_hello(grant))
    t_welcome = time.perf_counter() - t0
    reply = command(sock, [m.CMD_STATS])
    t_first_op = time.perf_counter() - t0
    print(f"hello->welcome {t_welcome * 1e3:.1f} ms, hello->first op {t_first_op * 1e3:.1f} ms")

    assert welcome["kind"] == m.WELCOME
    assert welcome["device"]["total_memory"] == 256 * 2**20
    assert reply[0] == m.REPLY_OK and reply[1]["limit"] == 256 * 2**20
    # A cold worker needs over a second just to import torch; a warm one is far quicker.
    assert t_first_op < 0.5
    sid = welcome["session_id"]
    log_file = server.log_dir / f"{claims['alloc']}-0-{sid[:8]}.log"
    wait_until(lambda: log_file.exists())

    # The worker reports stats about once a second.
    wait_until(lambda: server.manager.stats()["sessions"], timeout=5)
    frames.send_frame(sock, msgpack.packb([m.CMD_BYE]))
    ended = server.events.ended(claims["alloc"])
    assert ended["reason"] == "client closed the session"
    sock.close()


def test_real_worker_client_disconnect_and_stop(start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=1)
    grant, claims = make_grant()
    sock, welcome = open_session(server.tcp, make_hello(grant))
    assert welcome["kind"] == m.WELCOME
    sock.close()
    assert server.events.ended(claims["alloc"])["reason"] == "client disconnected"

    grant, claims = make_grant(vgpu=1)
    sock, welcome = open_session(server.tcp, make_hello(grant))
    assert welcome["kind"] == m.WELCOME
    server.manager.stop()
    assert server.events.ended(claims["alloc"], timeout=0)["reason"].startswith(
        "server stopped")
    sock.close()
