"""The frame reader on hostile bytes: only FrameError (or PeerClosed), never a crash, and
never an allocation the header asked for beyond the limits."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol import frames

SMALL_BODY = 1 << 16  # keeps each example cheap; the default limit is tested on its own


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _feed(data: bytes) -> socket.socket:
    """A socket whose peer sent ``data`` and hung up."""
    reader, writer = socket.socketpair()
    reader.settimeout(5)
    threading.Thread(target=_send_and_close, args=(writer, data), daemon=True).start()
    return reader


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_frame_errors(data: bytes) -> None:
    sock = _feed(data)
    try:
        while True:
            body, payload = frames.recv_frame(sock, max_body=SMALL_BODY)
            assert len(body) <= SMALL_BODY
            frames.discard(sock, payload)
    except frames.FrameError:
        pass  # PeerClosed is one: every stream ends with it or with a refused header
    finally:
        sock.close()


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=8192),
       payload=st.lists(st.binary(max_size=2048), max_size=4))
def test_valid_frames_round_trip(body: bytes, payload: list[bytes]) -> None:
    a, b = socket.socketpair()
    try:
        sender = threading.Thread(
            target=frames.send_frame, args=(a, body, [memoryview(p) for p in payload]))
        sender.start()
        got, n = frames.recv_frame(b)
        assert bytes(got) == body and n == sum(len(p) for p in payload)
        assert bytes(frames.recv_exact(b, n)) == b"".join(payload)
        sender.join()
    finally:
        a.close()
        b.close()


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=frames.HEADER.size + 63))
def test_truncated_frame_is_peer_closed(cut: int) -> None:
    whole = frames.HEADER.pack(64, 0) + b"x" * 64
    sock = _feed(whole[:cut])
    with pytest.raises(frames.PeerClosed):
        frames.recv_frame(sock)
    sock.close()


@pytest.mark.parametrize("body_len,payload_len,message", [
    (frames.MAX_BODY + 1, 0, "frame body of"),
    (2**32 - 1, 0, "frame body of"),
    (0, frames.MAX_PAYLOAD + 1, "frame payload of"),
    (0, 2**64 - 1, "frame payload of"),
])
def test_oversized_headers_refused_before_reading(pair: tuple[socket.socket, socket.socket],
                                                  body_len: int, payload_len: int,
                                                  message: str) -> None:
    a, b = pair
    a.sendall(frames.HEADER.pack(body_len, payload_len))  # and nothing else: no body follows
    with pytest.raises(frames.FrameError, match=message):
        frames.recv_frame(b)


def test_discard_drops_exactly_the_payload(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frames.send_frame(a, b"first", [memoryview(b"p" * 3000)])
    frames.send_frame(a, b"second")
    body, n = frames.recv_frame(b)
    frames.discard(b, n)
    assert bytes(frames.recv_frame(b)[0]) == b"second"
