"""Handshake over real sockets: what is accepted, what is refused and why, and that the
listener keeps serving whatever a client sends."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
from sessions_support import (
    NODE,
    Server,
    connect,
    make_grant,
    make_hello,
    open_session,
    recv_msg,
    send_msg,
)

import orion_vgpu
from orion_vgpu.protocol import frames
from orion_vgpu.server import handshake

pytestmark = pytest.mark.usefixtures("fake_worker")
REFUSED = "orion-refused"


def assert_still_serving(server: Server) -> None:
    sock, _reply, _claims = server.session()
    sock.close()


def refusal(reply: dict[str, Any]) -> str:
    assert reply.get("kind") == REFUSED, reply
    return reply["reason"]


def test_accepted_hello_hands_fd_and_spec_to_worker(start_server: Callable[..., Server]) -> None:
    server = start_server(throttle_level=80, enable_computation_throttle=False)
    grant, claims = make_grant(gpu_index=1, gpu="GPU-fake-1", vgpu=2, gmem_mib=3000, ratio=25)
    hello = make_hello(grant, shm={"path": "/orion-x", "nonce": "abc", "size": 4096})
    sock, reply = open_session(server.tcp, hello)

    assert reply["kind"] == "orion-welcome"
    spec = reply["spec"]
    sid = spec["session_id"]
    assert len(sid) == 32 and int(sid, 16) >= 0 and reply["session_id"] == sid
    expected_hello = {k: v for k, v in hello.items() if k != "grant"}
    assert spec == {
        "session_id": sid, "allocation_id": claims["alloc"], "vgpu_index": 2,
        "device": "cpu", "device_index": 1, "device_name": "Orion emulated GPU (CPU)",
        "device_uuid": "GPU-fake-1", "emulated": True, "gmem_bytes": 3000 * 2**20,
        "ratio": 25,
        "log_file": str(server.log_dir / f"{claims['alloc']}-2-{sid[:8]}.log"),
        "hello": expected_hello, "enable_shm": True, "throttle_level": 80,
        "enable_computation_throttle": False, "bind_addr": "127.0.0.1",
    }
    assert reply["fd_nonblocking"] is False  # the worker gets a plain blocking socket
    # The worker owns the connection now: it answers on it.
    send_msg(sock, {"echo": "hi"})
    assert recv_msg(sock) == {"echo": "hi"}
    started = server.events.wait_for(lambda e: e["type"] == "session_started")
    assert started == {"type": "session_started", "allocation_id": claims["alloc"],
                       "vgpu_index": 2, "reason": ""}
    sock.close()


def test_accepted_over_unix_socket(start_server: Callable[..., Server]) -> None:
    server = start_server()
    assert server.unix_path is not None
    assert stat.S_IMODE(server.unix_path.stat().st_mode) == 0o666
    grant, _ = make_grant()
    sock, reply = open_session(server.unix_path, make_hello(grant))
    assert reply["kind"] == "orion-welcome"
    send_msg(sock, {"echo": 1})
    assert recv_msg(sock) == {"echo": 1}
    sock.close()


def _other_torch() -> str:
    major, minor = torch.__version__.split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


REFUSALS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "protocol": (
        lambda: make_hello(make_grant()[0], protocol=orion_vgpu.PROTOCOL_VERSION + 1,
                           version="9.9.9"),
        f"client protocol {orion_vgpu.PROTOCOL_VERSION + 1} does not match server protocol "
        f"{orion_vgpu.PROTOCOL_VERSION}: install the same orion-vgpu version "
        f"(server {orion_vgpu.__version__}, client 9.9.9) on both"),
    "torch": (
        lambda: make_hello(make_grant()[0], torch=_other_torch()),
        f"client torch {_other_torch()} does not match server torch {torch.__version__}: "
        "install the same torch major.minor version on both"),
    "forged": (
        lambda: make_hello(make_grant(token="another-pool")[0]),
        "grant signature does not match this pool (forged or other pool)"),
    "expired": (
        lambda: make_hello(make_grant(exp=time.time() - 1)[0]),
        "grant expired; ask the controller for a new allocation"),
    "other-node": (
        lambda: make_hello(make_grant(node="node-elsewhere")[0]),
        "grant is for another node"),
    "unknown-gpu": (
        lambda: make_hello(make_grant(gpu_index=7)[0]),
        "grant names GPU index 7, which this server does not have"),
    "gpu-uuid": (
        lambda: make_hello(make_grant(gpu="GPU-other")[0]),
        "grant names GPU GPU-other but GPU index 0 here is GPU-fake-0"),
    "malformed-grant": (
        lambda: make_hello("not-a-grant"),
        "malformed grant"),
    "missing-field": (
        lambda: {k: v for k, v in make_hello(make_grant()[0]).items() if k != "client"},
        "malformed hello: field 'client' is missing or has the wrong type"),
    "wrong-kind": (
        lambda: {**make_hello(make_grant()[0]), "kind": "hello"},
        "hello rejected: first frame must be a map with kind 'orion-hello'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_with_exact_reason(start_server: Callable[..., Server], case: str) -> None:
    server = start_server()
    make, reason = REFUSALS[case]
    sock, reply = open_session(server.tcp, make())
    assert refusal(reply) == reason
    assert sock.recv(1) == b""  # then the server closes
    sock.close()
    assert_still_serving(server)
    assert not [e for e in server.events.items if e["type"] == "session_ended"]


def test_refused_when_not_registered(start_server: Callable[..., Server]) -> None:
    server = start_server(node_id=None)
    sock, reply = open_session(server.tcp, make_hello(make_grant()[0]))
    assert refusal(reply) == "server is not registered with a controller yet; retry shortly"
    sock.close()


def test_replayed_grant_refused_while_live_and_after(start_server: Callable[..., Server]) -> None:
    server = start_server()
    grant, claims = make_grant()
    first, reply = open_session(server.tcp, make_hello(grant))
    assert reply["kind"] == "orion-welcome"
    expected = (f"grant already used: allocation {claims['alloc']} vGPU 0 already had a "
                "session here")
    second, reply = open_session(server.tcp, make_hello(grant))
    assert refusal(reply) == expected
    first.close()
    server.events.ended(claims["alloc"])
    third, reply = open_session(server.unix_path, make_hello(grant))
    assert refusal(reply) == expected
    second.close()
    third.close()
    # Same allocation, other vGPU: a different grant, accepted.
    grant2, _ = make_grant(alloc=claims["alloc"], vgpu=1)
    sock, reply = open_session(server.tcp, make_hello(grant2))
    assert reply["kind"] == "orion-welcome"
    sock.close()


def raw_exchange(server: Server, data: bytes) -> dict[str, Any]:
    sock = connect(server.tcp)
    sock.sendall(data)
    reply = recv_msg(sock)
    sock.close()
    return reply


def test_garbage_bytes_refused(start_server: Callable[..., Server]) -> None:
    server = start_server()
    http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    body_len = frames.HEADER.unpack(http[:12])[0]
    assert refusal(raw_exchange(server, http)) == (
        f"hello rejected: frame body of {body_len} bytes exceeds the 65536-byte limit")
    junk = b"\xc1\xff\x00garbage"
    assert refusal(raw_exchange(server, frames.HEADER.pack(len(junk), 0) + junk)) == (
        "hello rejected: not a msgpack map")
    body = msgpack.packb([1, 2, 3])
    assert refusal(raw_exchange(server, frames.HEADER.pack(len(body), 0) + body)) == (
        "hello rejected: first frame must be a map with kind 'orion-hello'")
    body = msgpack.packb(make_hello(make_grant()[0]))
    assert refusal(raw_exchange(server, frames.HEADER.pack(len(body), 5) + body + b"xxxxx")) == (
        "hello rejected: a hello carries no payload")
    assert_still_serving(server)


def test_oversized_hello_refused(start_server: Callable[..., Server]) -> None:
    server = start_server()
    hello = make_hello(make_grant()[0])
    hello["client"]["command"] = "x" * handshake.MAX_HELLO_BYTES
    body = msgpack.packb(hello)
    sock = connect(server.tcp)
    # The client sends it all; the server reads only the header and still gets its
    # refusal across (no reset from closing with unread data).
    threading.Thread(target=lambda: _send_quietly(sock, frames.HEADER.pack(len(body), 0) + body),
                     daemon=True).start()
    assert refusal(recv_msg(sock)) == (
        f"hello rejected: frame body of {len(body)} bytes exceeds the 65536-byte limit")
    sock.close()
    assert_still_serving(server)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_silent_client_times_out_without_blocking_others(
        start_server: Callable[..., Server]) -> None:
    server = start_server(hello_timeout_s=1.0)
    silent = connect(server.tcp)
    t0 = time.monotonic()
    # Another client is served at once while the silent one waits for its timeout.
    sock, reply, _ = server.session()
    assert time.monotonic() - t0 < 0.9
    sock.close()
    assert refusal(recv_msg(silent)) == "no hello within 1 s"
    assert 0.9 < time.monotonic() - t0 < 3.0
    silent.close()
    assert_still_serving(server)


def test_dribbling_client_cut_off_at_total_deadline(start_server: Callable[..., Server]) -> None:
    server = start_server(hello_timeout_s=0.6)
    body = msgpack.packb(make_hello(make_grant()[0]))
    data = frames.HEADER.pack(len(body), 0) + body
    sock = connect(server.tcp)
    t0 = time.monotonic()
    stop = threading.Event()

    def dribble() -> None:
        for i in range(len(data)):  # one byte every 0.1 s: each recv is quick, total is not
            if stop.wait(0.1):
                return
            try:
                sock.send(data[i:i + 1])
            except OSError:
                return

    threading.Thread(target=dribble, daemon=True).start()
    assert refusal(recv_msg(sock)) == "no hello within 0.6 s"
    assert time.monotonic() - t0 < 2.0
    stop.set()
    sock.close()


def test_client_closing_mid_hello_is_logged_not_fatal(
        start_server: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    server = start_server()
    caplog.set_level("INFO", logger="orion.server")
    for data in (b"", b"\x05\x00", frames.HEADER.pack(100, 0) + b"abc"):
        sock = connect(server.tcp)
        sock.sendall(data)
        sock.close()
    assert_still_serving(server)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("connection closed before the hello was complete" in m for m in msgs) == 3


def test_logs_name_allocation_and_never_the_grant(
        start_server: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="orion.server")
    server = start_server()
    grant, claims = make_grant()
    sock, reply = open_session(server.tcp, make_hello(grant))
    other, _ = make_grant(node="elsewhere")
    sock2, _ = open_session(server.tcp, make_hello(other))
    sock.close()
    sock2.close()
    server.events.ended(claims["alloc"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert grant not in text and other not in text and "test-pool-token" not in text
    assert grant.split(".")[1] not in text
    lines = [m for m in text.splitlines() if claims["alloc"] in m]
    assert any("handshake accepted" in m for m in lines)
    assert any("session started" in m for m in lines)
    assert any("session ended" in m and "client disconnected" in m for m in lines)
    assert any("handshake refused" in m and "grant is for another node" in m
               for m in text.splitlines())


def test_many_concurrent_handshakes(start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    results: list[str] = []

    def one(good: bool) -> None:
        grant = make_grant()[0] if good else make_grant(node="x")[0]
        sock, reply = open_session(server.tcp, make_hello(grant))
        results.append(reply["kind"])
        sock.close()

    threads = [threading.Thread(target=one, args=(i % 4 == 0,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(["orion-welcome"] * 6 + [REFUSED] * 18)


# -- the pure checks ---------------------------------------------------------------------


def test_torch_major_minor_comparison() -> None:
    assert handshake.torch_major_minor("2.13.0+cpu") == handshake.torch_major_minor("2.13.1")
    assert handshake.torch_major_minor("2.13.0") != handshake.torch_major_minor("2.12.0")
    hello = make_hello("g", torch="2.13.0+cu121")
    handshake.check_versions(hello, "2.13.1+cpu")  # same major.minor: fine


@pytest.mark.parametrize("value", [True, "1", None, 1.0])
def test_protocol_field_must_be_an_int(value: Any) -> None:
    with pytest.raises(handshake.Refused, match="field 'protocol'"):
        handshake.check_versions(make_hello("g", protocol=value), torch.__version__)


def test_claims_types_checked() -> None:
    from orion_vgpu.protocol.grant import grant_key, sign_grant
    key = grant_key("k")
    grant = sign_grant(key, {"alloc": "a", "vgpu": "0", "node": NODE, "gpu_index": 0,
                             "gmem_mib": 1, "ratio": 10, "exp": time.time() + 9})
    with pytest.raises(handshake.Refused, match="malformed grant claims: 'vgpu'"):
        handshake.check_grant(grant, key, NODE, {0: "u"})


def test_refusal_frame_sent_even_if_client_is_gone() -> None:
    a, b = socket.socketpair()
    b.close()
    handshake.send_refusal(a, "whatever")  # must not raise
    assert a.fileno() == -1


def test_pid_of_welcome_is_a_child(start_server: Callable[..., Server]) -> None:
    server = start_server()
    sock, reply, _ = server.session()
    assert os.getpgid(reply["pid"]) == reply["pid"]  # own session/process group
    sock.close()


def test_client_strings_in_reasons_are_sanitised(start_server: Callable[..., Server]) -> None:
    server = start_server()
    hello = make_hello(make_grant()[0], torch="1.0\n[ERROR] fake log line" + "x" * 100)
    sock, reply = open_session(server.tcp, hello)
    reason = refusal(reply)
    assert "\n" not in reason
    assert reason.startswith("client torch 1.0[ERROR] fake log linexxx")
    assert "x" * 60 not in reason
    sock.close()
