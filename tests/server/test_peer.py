"""Peer copies between two sessions' executors, in process over real sockets
(``orion_vgpu.server.peer``): stream order, single use, authentication, expiry, memory."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from orion_vgpu.protocol import codec, frames
from orion_vgpu.server import peer
from orion_vgpu.server.executor import Executor, SessionError

CPU = torch.device("cpu")
N = 1 << 16  # float32 elements: 256 KiB
KEY = secrets.token_bytes(16)  # the client's peer key, in the hello of each of its sessions


class Side:
    """One session's executor and peer endpoint."""

    def __init__(self, tag: str, key: bytes = KEY, limit: int = 1 << 30) -> None:
        self.ex = Executor(CPU, limit)
        self.ep = peer.PeerEndpoint(tag, self.ex.ledger, key)
        self.ep.start("127.0.0.1")
        self.seq = 0

    def route(self, kind: str = "unix") -> list:
        if kind == "unix":
            return ["unix", self.ep.address["unix"]]
        host, _, port = str(self.ep.address["tcp"]).rpartition(":")
        return ["tcp", host, int(port)]

    def offer(self, handle: int, xid: bytes) -> int:
        self.seq += 1
        self.ep.offer(self.ex, handle, xid, self.seq)
        return self.seq


def receive(dst: Side, handle: int, xid: bytes, seq: int, route: list,
            shape: list[int] | None = None, dtype: torch.dtype = torch.float32) -> None:
    peer.receive(dst.ex, CPU, [15, handle, xid, seq, route, codec.DTYPE_CODE[dtype],
                               [N] if shape is None else shape], "dst", dst.ep)


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Side, Side]]:
    monkeypatch.setenv("ORION_PEER_TTL_S", "1")
    a, b = Side("a"), Side("b")
    a.ex.store(1, torch.arange(N, dtype=torch.float32))
    try:
        yield a, b
    finally:
        a.ep.close()
        b.ep.close()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_copy_keeps_stream_order_and_frees_the_snapshot(pair: tuple[Side, Side],
                                                        kind: str) -> None:
    a, b = pair
    base = a.ex.ledger.used
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    assert a.ex.ledger.used == base + N * 4  # the snapshot counts on the source
    a.ex.tensor(1).mul_(-1)  # a later in-place op must not reach the copy
    receive(b, 7, xid, seq, a.route(kind))
    assert torch.equal(b.ex.tensor(7), torch.arange(N, dtype=torch.float32))
    assert b.ex.ledger.used == N * 4
    # The source's serving thread releases the snapshot after its last bytes went out,
    # which may be just after the receiver has them all (seen under load in CI).
    deadline = time.monotonic() + 10
    while not a.ep._released and time.monotonic() < deadline:
        time.sleep(0.01)
    a.ep.settle()
    assert a.ex.ledger.used == base and a.ex.ledger.used == a.ex.ledger.recount()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_waiting_puller_copies_out_while_the_snapshot_fills(
        pair: tuple[Side, Side], kind: str, caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    big = 48 << 20  # several chunks
    a.ex.store(2, torch.randint(0, 255, (big,), dtype=torch.uint8))
    xid = secrets.token_bytes(16)
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            receive(b, 7, xid, 1, a.route(kind), shape=[big], dtype=torch.uint8)
        except BaseException as exc:  # reported below
            errors.append(exc)

    caplog.set_level("INFO", logger="orion.session")
    t = threading.Thread(target=pull)
    t.start()
    deadline = time.monotonic() + 10
    while not a.ep._waiters and time.monotonic() < deadline:  # the puller came first
        time.sleep(0.01)
    assert a.ep._waiters
    a.offer(2, xid)
    t.join(30)
    assert not errors and torch.equal(b.ex.tensor(7), a.ex.tensor(2))
    how = "shared memory" if kind == "unix" else "the socket"
    assert f"received {big} bytes from" in caplog.text and f"through {how}" in caplog.text
    # The snapshot's buffer went back to the pool once the puller was done with it; the
    # next copy of that size reuses it (its pages are already there).
    deadline = time.monotonic() + 10
    while not a.ep._pool and time.monotonic() < deadline:
        time.sleep(0.01)
    pooled = list(a.ep._pool)
    assert len(pooled) == 1
    xid2 = secrets.token_bytes(16)
    a.offer(2, xid2)
    assert not a.ep._pool  # taken by the new snapshot
    receive(b, 8, xid2, 2, a.route(kind), shape=[big], dtype=torch.uint8)
    assert torch.equal(b.ex.tensor(8), b.ex.tensor(7))
    # Neither tensor was pinned by a numpy view: an out= op may still grow them.
    for x in (a.ex.tensor(2), b.ex.tensor(7)):
        x.resize_(2 * big)


def test_transfer_ids_are_single_use_and_unknown_ids_refused(pair: tuple[Side, Side]) -> None:
    a, b = pair
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    receive(b, 7, xid, seq, a.route())
    with pytest.raises(SessionError, match="unknown transfer id"):
        receive(b, 8, xid, seq, a.route())
    with pytest.raises(SessionError, match="unknown transfer id"):
        receive(b, 9, secrets.token_bytes(16), seq, a.route("tcp"))
    assert b.ex.tensors.keys() == {7}


def test_a_puller_that_does_not_know_the_id_is_refused(pair: tuple[Side, Side]) -> None:
    a, b = pair
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + a.ep.address["unix"])
        banner, _ = peer._recv_msg(s)
        assert banner["kind"] == "orion-peer"
        nonce = b"\1" * 16
        peer._send_msg(s, {"lookup": peer.lookup_key(xid), "proof": b"\0" * 32,
                           "nonce": nonce, "seq": seq,
                           "member": peer._proof(KEY, b"member", banner["nonce"], nonce)})
        reply, payload = peer._recv_msg(s)
    assert reply == {"ok": False, "error": "authentication failed"} and payload == 0
    receive(b, 7, xid, seq, a.route())  # the real puller still gets it
    assert torch.equal(b.ex.tensor(7), a.ex.tensor(1))


def test_another_programs_session_cannot_pull_or_wait(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    stranger = Side("s", key=secrets.token_bytes(16))
    try:
        for s in (seq, seq + 1):  # even knowing the id; and no waiting for a later one
            with pytest.raises(SessionError, match="not a session of the same program"):
                receive(stranger, 7, xid, s, a.route("tcp"))
        assert not a.ep._waiters and len(a.ep._exports) == 1
    finally:
        stranger.ep.close()


def test_an_unreceived_snapshot_expires_and_its_memory_is_released(
        pair: tuple[Side, Side]) -> None:
    a, b = pair
    base = a.ex.ledger.used
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    assert a.ex.ledger.used == base + N * 4
    deadline = time.monotonic() + 10
    while a.ep._exports and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not a.ep._exports and len(a.ep._pool) == 1  # its buffer is free for the next copy
    a.ep.settle()
    assert a.ex.ledger.used == base and a.ep.counts["expired"] == 1
    with pytest.raises(SessionError, match="expired: not received within 1 s"):
        receive(b, 7, xid, seq, a.route())


def test_session_end_refuses_waiting_pullers_and_frees_snapshots(
        pair: tuple[Side, Side]) -> None:
    a, b = pair
    base = a.ex.ledger.used
    a.offer(1, secrets.token_bytes(16))
    assert a.ex.ledger.used > base
    errors: list[str] = []

    def pull() -> None:
        try:
            receive(b, 7, secrets.token_bytes(16), 99, a.route())
        except SessionError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=pull)
    t.start()
    while not a.ep._waiters and t.is_alive():
        time.sleep(0.01)
    a.ep.close()
    t.join(10)
    assert errors and "session ended" in errors[0], errors
    assert a.ex.ledger.used == base and a.ep.counts["dropped"] == 1


def test_failed_send_is_reported_to_the_puller(pair: tuple[Side, Side]) -> None:
    a, b = pair
    a.ex.store(2, torch.zeros(20 << 20, dtype=torch.uint8))  # 20 MiB
    a.ex.ledger.limit = a.ex.ledger.used + (10 << 20)  # no room for its snapshot
    xid = secrets.token_bytes(16)
    with pytest.raises(SessionError, match="snapshot") as exc:
        a.offer(2, xid)
    assert exc.value.kind == "OutOfMemoryError"
    with pytest.raises(SessionError, match="could not send the tensor"):
        receive(b, 7, xid, a.seq, a.route(), shape=[20 << 20], dtype=torch.uint8)


def test_receiver_checks_quota_and_metadata_before_taking_bytes(
        pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.ex.ledger.limit = 1024
    xid = secrets.token_bytes(16)
    seq = a.offer(1, xid)
    with pytest.raises(SessionError) as exc:
        receive(b, 7, xid, seq, a.route())
    assert exc.value.kind == "OutOfMemoryError"
    b.ex.ledger.limit = 64 << 20
    with pytest.raises(SessionError, match="expected torch.float32 \\[3\\]"):
        receive(b, 7, xid, seq, a.route(), shape=[3])
    assert not b.ex.tensors


def test_only_peer_endpoints_are_dialled(pair: tuple[Side, Side]) -> None:
    _, b = pair
    xid = secrets.token_bytes(16)
    for bad in (["unix", "/run/docker.sock"], ["unix", "orion-peer-../x"], ["tcp", "h", 0],
                ["tcp", "", 80], "127.0.0.1:80"):
        with pytest.raises(SessionError, match="is not a peer endpoint") as exc:
            receive(b, 7, xid, 1, bad)  # type: ignore[arg-type]
        assert exc.value.kind == "ProtocolError"
    junk = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        c, _ = junk.accept()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        c.settimeout(2)
        try:
            got.append(c.recv(100))
        except OSError:
            pass
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(SessionError, match="is not an Orion peer endpoint"):
        receive(b, 7, xid, 1, ["tcp", "127.0.0.1", junk.getsockname()[1]])
    t.join(5)
    junk.close()
    assert got in ([], [b""])  # the puller sent nothing to a service that is not a peer
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(SessionError, match="cannot reach its server"):
        receive(b, 7, xid, 1, ["tcp", "127.0.0.1", port])


def test_malformed_commands_are_protocol_errors(pair: tuple[Side, Side]) -> None:
    a, b = pair
    for cmd in ([14], [14, 1, b"short", 1], [14, 1, secrets.token_bytes(16), 0],
                [14, 1, secrets.token_bytes(16), "1"]):
        with pytest.raises(SessionError) as exc:
            peer.offer(a.ep, a.ex, cmd)
        assert exc.value.kind == "ProtocolError"
    with pytest.raises(SessionError, match="not available"):
        peer.offer(None, a.ex, [14, 1, secrets.token_bytes(16), 1])
    for cmd in ([15], [15, 0, secrets.token_bytes(16), 1, a.route(), 0, [1]],
                [15, 7, secrets.token_bytes(16), 1, a.route(), 99, [1]],
                [15, 7, secrets.token_bytes(16), 1, a.route(), 0, [-1]]):
        with pytest.raises((SessionError, codec.CodecError)):
            peer.receive(b.ex, CPU, cmd, "dst", b.ep)
    assert not b.ex.tensors


def test_a_stranger_gets_the_banner_and_nothing_else(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    a.offer(1, secrets.token_bytes(16))
    host, _, port = str(a.ep.address["tcp"]).rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        peer._recv_msg(s)
        s.sendall(frames.HEADER.pack(4, 0) + b"\x93\x01\x02\x03")  # not a pull request
        s.settimeout(5)
        assert s.recv(100) == b""  # closed, nothing sent


def test_shared_memory_must_come_sealed(pair: tuple[Side, Side]) -> None:
    """A source whose memfd could shrink under the destination's mapping (a crash on
    access) is refused before anything is mapped."""
    _, b = pair
    xid = secrets.token_bytes(16)
    name = peer.UNIX_PREFIX + secrets.token_hex(16)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + name)
    listener.listen(1)

    def fake_source() -> None:
        conn, _ = listener.accept()
        with conn:
            nonce_s = secrets.token_bytes(16)
            peer._send_msg(conn, {"kind": "orion-peer", "v": 1, "nonce": nonce_s})
            req, _ = peer._recv_msg(conn)
            fd = os.memfd_create("unsealed")
            os.ftruncate(fd, N * 4)
            peer._send_msg(conn, {"ok": True, "proof": peer._proof(xid, b"serve", req["nonce"],
                                                                   nonce_s),
                                  "dtype": codec.DTYPE_CODE[torch.float32], "shape": [N],
                                  "nbytes": N * 4, "mode": "fd"}, fd=fd)
            os.close(fd)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(100)

    t = threading.Thread(target=fake_source)
    t.start()
    with pytest.raises(SessionError, match="not a sealed snapshot"):
        receive(b, 7, xid, 1, ["unix", name])
    t.join(10)
    listener.close()
    assert not b.ex.tensors
