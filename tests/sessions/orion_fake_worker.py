"""Throwaway session worker for the session-manager tests (``ORION_WORKER_MODULE``).

Speaks the manager's control protocol like the real worker, but instead of running ATen
ops it greets the client with the session spec it received and obeys test commands,
so tests can see exactly what was handed over and make the worker end in chosen ways.

Client frames are msgpack maps: ``{"echo": x}``, ``{"stats": {...}}`` (forwarded to the
manager as a stats message), ``{"end": reason}``, ``{"exit": code}``, ``{"signal": n}``.
Environment: ``FAKE_WORKER_START`` = ``exit3`` (die at start), ``ready`` (send a ready
message), ``ignore-term`` (survive SIGTERM); ``FAKE_WORKER_IMPORT_TORCH=1``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import selectors
import signal
import socket
import sys
from typing import Any

import msgpack

from orion_vgpu.protocol import frames


def send(sock: socket.socket, msg: dict[str, Any]) -> None:
    frames.send_frame(sock, msgpack.packb(msg))


def receive_session(ctrl: socket.socket) -> tuple[dict[str, Any], socket.socket]:
    data, fds, _flags, _addr = socket.recv_fds(ctrl, 1 << 20, 1)
    if not data:
        sys.exit(0)  # the manager closed us while idle
    buf = bytearray(data)
    while len(buf) < frames.HEADER.size:
        buf += frames.recv_exact(ctrl, frames.HEADER.size - len(buf))
    body_len, _ = frames.HEADER.unpack_from(buf)
    end = frames.HEADER.size + body_len
    if len(buf) < end:
        buf += frames.recv_exact(ctrl, end - len(buf))
    spec = msgpack.unpackb(bytes(buf[frames.HEADER.size:end]), raw=False)
    assert len(fds) == 1, fds
    return spec, socket.socket(fileno=fds[0])


def serve(ctrl: socket.socket, conn: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(conn, selectors.EVENT_READ, "client")
    sel.register(ctrl, selectors.EVENT_READ, "ctrl")
    while True:
        for key, _ in sel.select():
            if key.data == "ctrl":
                os._exit(0)  # manager gone
            try:
                body, _payload = frames.recv_frame(conn)
            except (frames.PeerClosed, OSError):
                send(ctrl, {"type": "end", "reason": "client disconnected"})
                return
            command(ctrl, conn, msgpack.unpackb(bytes(body), raw=False))


def command(ctrl: socket.socket, conn: socket.socket, cmd: dict[str, Any]) -> None:
    if "echo" in cmd:
        send(conn, {"echo": cmd["echo"]})
    elif "stats" in cmd:
        send(ctrl, {"type": "stats", **cmd["stats"]})
        send(conn, {"ok": True})
    elif "end" in cmd:
        send(ctrl, {"type": "end", "reason": cmd["end"]})
        sys.exit(0)
    elif "exit" in cmd:
        os._exit(cmd["exit"])
    elif "signal" in cmd:
        os.kill(os.getpid(), cmd["signal"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args()
    mode = os.environ.get("FAKE_WORKER_START", "")
    if mode == "exit3":
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_WORKER_IMPORT_TORCH") == "1":
        import torch  # noqa: F401  (as slow to start as the real worker)
    ctrl = socket.socket(fileno=args.control_fd)
    if mode == "ready":
        send(ctrl, {"type": "ready"})
    spec, conn = receive_session(ctrl)
    nonblocking = bool(fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
    conn.setblocking(True)
    send(conn, {"kind": "orion-welcome", "session_id": spec["session_id"], "spec": spec,
                "pid": os.getpid(), "fd_nonblocking": nonblocking})
    serve(ctrl, conn)


if __name__ == "__main__":
    main()
