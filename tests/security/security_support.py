"""A raw data-plane client for security tests: it speaks frames and commands directly, so
it can send anything a hostile client could."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack
import torch
from sessions_support import Server, make_grant, make_hello, open_session, wait_until

from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol import messages as m


class H:
    """A tensor handle in an argument tree (encoded as the handle ext value)."""

    def __init__(self, h: int) -> None:
        self.h = h


def _default(obj: Any) -> Any:
    return codec.handle_ext(obj.h) if isinstance(obj, H) else codec.encode_default(obj)


def pack(*cmds: Any) -> bytes:
    return b"".join(msgpack.packb(c, default=_default) for c in cmds)


class RawClient:
    """One session: the welcome, then commands; op names are defined on first use."""

    def __init__(self, sock: socket.socket, welcome: dict[str, Any], server: Server) -> None:
        self.sock = sock
        self.welcome = welcome
        self.server = server
        self.op_ids: dict[str, int] = {}

    @property
    def worker_pid(self) -> int:
        # The manager records the session right after the hand-off, maybe after the welcome.
        sessions = self.server.manager._sessions
        sid = self.welcome["session_id"]
        return wait_until(lambda: sid in sessions and sessions[sid].worker_pid)

    def send(self, *cmds: Any, payload: bytes = b"") -> None:
        frames.send_frame(self.sock, pack(*cmds), [memoryview(payload)] if payload else ())

    def recv(self) -> tuple[list[Any], bytes]:
        body, n = frames.recv_frame(self.sock)
        data = bytes(frames.recv_exact(self.sock, n)) if n else b""
        return msgpack.unpackb(bytes(body), raw=False, ext_hook=codec.client_ext_hook), data

    def ask(self, *cmds: Any, payload: bytes = b"") -> list[Any]:
        self.send(*cmds, payload=payload)
        return self.recv()[0]

    def sync(self) -> list[Any]:
        """[REPLY_OK] or the first error since the last answer."""
        return self.ask([m.CMD_SYNC])

    def define(self, name: str) -> list[Any]:
        if name not in self.op_ids:
            self.op_ids[name] = len(self.op_ids) + 1
            self.send([m.CMD_DEF, self.op_ids[name], name])
        return [self.op_ids[name]]

    def op(self, name: str, args: list, kwargs: dict | None = None,
           outs: list[int] | None = None) -> list[Any]:
        """Run one op, then sync: the op's error or [REPLY_OK]."""
        op_id = self.define(name)[0]
        return self.ask([m.CMD_OP, op_id, args, kwargs or {}, outs or []], [m.CMD_SYNC])

    def call(self, name: str, args: list, outs: list[int]) -> list[Any]:
        op_id = self.define(name)[0]
        return self.ask([m.CMD_CALL, op_id, args, {}, outs])

    def upload(self, handle: int, t: torch.Tensor) -> list[Any]:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.send([m.CMD_UPLOAD, handle, codec.DTYPE_CODE[t.dtype], list(t.shape), len(raw),
                   None], payload=raw)
        return self.sync()

    def fetch(self, handle: int) -> torch.Tensor | list[Any]:
        """The tensor's value, or the error reply."""
        reply, data = self.ask_raw([m.CMD_FETCH, handle, None])
        if reply[0] != m.REPLY_OK:
            return reply
        _ok, dtype, shape, _nbytes, shm_off = reply
        assert shm_off is None, "tests run without shared memory"
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)

    def ask_raw(self, *cmds: Any) -> tuple[list[Any], bytes]:
        self.send(*cmds)
        return self.recv()

    def stats(self) -> dict[str, int]:
        reply = self.ask([m.CMD_STATS])
        assert reply[0] == m.REPLY_OK, reply
        return reply[1]

    def alive(self) -> bool:
        """The session answers a round trip with an upload and a fetch of the same bytes."""
        probe = torch.arange(7, dtype=torch.int64)
        h = 900_001
        if self.upload(h, probe) != [m.REPLY_OK]:
            return False
        back = self.fetch(h)
        self.send([m.CMD_FREE, [h]])
        return isinstance(back, torch.Tensor) and torch.equal(back, probe)

    def close(self) -> None:
        self.sock.close()


def open_client(server: Server, gmem_mib: int = 64, **over: Any) -> RawClient:
    grant, _claims = make_grant(gmem_mib=gmem_mib, **over)
    sock, welcome = open_session(server.tcp, make_hello(grant))
    assert welcome.get("kind") == m.WELCOME, welcome
    sock.settimeout(30)
    return RawClient(sock, welcome, server)


def error_of(reply: list[Any]) -> tuple[str, str]:
    assert reply[0] == m.REPLY_ERROR, reply
    return reply[1], reply[2]


def closed_with_reason(client: RawClient) -> tuple[str, str] | None:
    """After an unparseable stream: the session's last word, then the connection ends."""
    try:
        reply, _ = client.recv()
    except frames.PeerClosed:
        return None
    try:
        client.recv()
    except (frames.PeerClosed, OSError):
        return error_of(reply)
    raise AssertionError("the session kept going after a protocol error")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
