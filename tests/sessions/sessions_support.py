"""Helpers for the session-manager tests: stand-in config, grants, a tiny client."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch

import orion_vgpu
from orion_vgpu.protocol import frames
from orion_vgpu.protocol.grant import grant_key, sign_grant

TOKEN = "test-pool-token"
NODE = "node-test-1"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FakeDevice:
    """Plain-data stand-in for orion_vgpu.server.devices.Device."""

    index: int
    uuid: str
    name: str = "Orion emulated GPU (CPU)"
    memory_mib: int = 16384
    emulated: bool = True
    torch_device: str = "cpu"


@dataclass(frozen=True)
class FakeServerConfig:
    """Plain-data stand-in for orion_vgpu.config.ServerConfig (flat throttle keys)."""

    unix_socket: Path | None
    bind_addr: str = "127.0.0.1"
    listen_port: int = 0
    enable_shm: bool = True
    throttle_level: int = 80
    enable_computation_throttle: bool = False


DEVICES = [FakeDevice(0, "GPU-fake-0"), FakeDevice(1, "GPU-fake-1")]


class Events:
    """Collects on_event calls (from any thread) and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.items.append(event)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout: float = 10.0) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(pred(e) for e in self.items), timeout)
            assert ok, f"no matching event within {timeout} s; got {self.items}"
            return next(e for e in self.items if pred(e))

    def ended(self, alloc: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_for(
            lambda e: e["type"] == "session_ended" and e["allocation_id"] == alloc, timeout)


def make_claims(**over: Any) -> dict[str, Any]:
    claims = {"alloc": str(uuid.uuid4()), "vgpu": 0, "node": NODE, "gpu": "GPU-fake-0",
              "gpu_index": 0, "gmem_mib": 1024, "ratio": 50, "exp": time.time() + 60,
              "nonce": uuid.uuid4().hex}
    claims.update(over)
    return claims


def make_grant(token: str = TOKEN, **over: Any) -> tuple[str, dict[str, Any]]:
    claims = make_claims(**over)
    return sign_grant(grant_key(token), claims), claims


def make_hello(grant: str, **over: Any) -> dict[str, Any]:
    hello = {"kind": "orion-hello", "protocol": orion_vgpu.PROTOCOL_VERSION,
             "version": orion_vgpu.__version__, "torch": torch.__version__, "grant": grant,
             "client": {"host": "client-host", "pid": 4242, "user": "alice",
                        "command": "python train.py"},
             "shm": None}
    hello.update(over)
    return hello


def connect(target: tuple[str, int] | Path, timeout: float = 10.0) -> socket.socket:
    if isinstance(target, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(target))
    else:
        sock = socket.create_connection(target, timeout=timeout)
    return sock


def send_msg(sock: socket.socket, msg: Any) -> None:
    frames.send_frame(sock, msgpack.packb(msg))


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    body, payload = frames.recv_frame(sock)
    assert payload == 0
    return msgpack.unpackb(bytes(body), raw=False)


def open_session(target: tuple[str, int] | Path, hello: dict[str, Any]
                 ) -> tuple[socket.socket, dict[str, Any]]:
    """Connect, say hello, return the socket and the server's first reply."""
    sock = connect(target)
    send_msg(sock, hello)
    return sock, recv_msg(sock)


def child_pids() -> set[int]:
    """Direct children of this process, zombies included (from /proc)."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me:
            kids.add(int(entry))
    return kids


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


@dataclass
class Server:
    """A running SessionManager plus what tests need to talk to it."""

    manager: Any
    events: Events
    log_dir: Path
    unix_path: Path | None
    children_before: set[int] = field(default_factory=set)

    @property
    def tcp(self) -> tuple[str, int]:
        return self.manager.tcp_address

    def session(self, **hello_over: Any) -> tuple[socket.socket, dict[str, Any], dict]:
        grant, claims = make_grant()
        sock, reply = open_session(self.tcp, make_hello(grant, **hello_over))
        assert reply.get("kind") == "orion-welcome", reply
        return sock, reply, claims
