"""Length-prefixed frames on a stream socket.

A frame is a 12-byte header (body length u32, payload length u64), a msgpack body, then
``payload`` raw bytes (tensor data, never pickled). The reader pulls the body into memory
and leaves the payload on the socket so callers can ``recv_into`` the tensor's own memory.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

HEADER = struct.Struct("<IQ")
MAX_BODY = 64 * 1024 * 1024
MAX_PAYLOAD = 64 * 1024 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a valid frame, or went away."""


class PeerClosed(FrameError):
    """The peer closed the connection."""


def send_frame(sock: socket.socket, body: bytes | bytearray | memoryview,
               payload: Sequence[memoryview] = ()) -> None:
    total = sum(p.nbytes for p in payload)
    bufs: list[bytes | bytearray | memoryview] = [HEADER.pack(len(body), total), body]
    bufs.extend(payload)
    _sendall_vec(sock, bufs)


def _sendall_vec(sock: socket.socket, bufs: list) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed("connection closed by peer")
        got += k


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return buf


def recv_frame(sock: socket.socket, max_body: int = MAX_BODY) -> tuple[bytearray, int]:
    """Read one frame's header and body; return (body, payload length still on the socket)."""
    header = recv_exact(sock, HEADER.size)
    body_len, payload_len = HEADER.unpack(header)
    if body_len > max_body:
        raise FrameError(f"frame body of {body_len} bytes exceeds the {max_body}-byte limit")
    if payload_len > MAX_PAYLOAD:
        raise FrameError(f"frame payload of {payload_len} bytes exceeds the limit")
    return recv_exact(sock, body_len), payload_len


def discard(sock: socket.socket, n: int) -> None:
    """Drop ``n`` payload bytes nobody wants (e.g. after a refused upload)."""
    chunk = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        k = min(n, chunk.nbytes)
        recv_exact_into(sock, chunk[:k])
        n -= k


def still_connected(sock: socket.socket) -> bool:
    """False once the peer closed the connection (or it broke); never blocks or reads."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
