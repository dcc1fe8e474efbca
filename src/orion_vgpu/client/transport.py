"""One session with one vGPU: connection, handshake, command buffer, requests.

Commands are packed into a buffer and sent without waiting for the server (pipelining);
the client blocks only on requests that need an answer (sync points).
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import sys
import threading
from typing import Any

import msgpack
import torch

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.client.errors import OrionError, raise_remote
from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol import messages as m
from orion_vgpu.protocol.shm import Arena, ShmError, shm_dir

FLUSH_BYTES = 256 * 1024
FLUSH_OPS = 512
SHM_MIN_BYTES = 32 * 1024
DEFAULT_SHM_BYTES = 256 * 1024 * 1024


class Connection:
    """A session on one vGPU of an allocation."""

    def __init__(self, vgpu: dict, *, enable_net: bool = False, use_shm: bool = True,
                 shm_path: str | None = None) -> None:
        self.vgpu = vgpu
        self.where = vgpu.get("node_addr", "?")
        self.sock = self._connect(vgpu, enable_net)
        self.packer = msgpack.Packer(default=codec.encode_default, autoreset=True)
        self.buf = bytearray()
        self.payload: list[memoryview] = []
        self.n_cmds = 0
        self.frees: list[int] = []
        self.arena: Arena | None = None
        self.defined: set[int] = set()
        self.closed = False
        self.capture: bytearray | None = None  # commands recorded by a CUDA graph capture
        self.kept: list[int] = []
        # Programs may drive one vGPU from several threads (DataLoader pinning, DataParallel).
        self.lock = threading.RLock()
        self._created_shm: str | None = None
        self._payload_left = 0
        own_arena = self._make_arena(use_shm, shm_path)
        self.welcome = self._handshake(own_arena)

    # set-up ------------------------------------------------------------------
    def _connect(self, vgpu: dict, enable_net: bool) -> socket.socket:
        path = vgpu.get("unix_socket")
        if path and not enable_net and os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                self.where = f"unix:{path}"
                return self._tune(s)
            except OSError:
                s.close()
        host, _, port = str(vgpu["node_addr"]).rpartition(":")
        try:
            s = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError as exc:
            raise OrionError(f"cannot reach Orion Server {vgpu['node_addr']} for vGPU "
                             f"{vgpu.get('index', 0)} ({exc}); check the server's bind_addr/"
                             "listen_port and firewall (orion check runtime server)") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(s)
        return self._tune(s)

    @staticmethod
    def _tune(s: socket.socket) -> socket.socket:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        s.settimeout(None)
        return s

    def _make_arena(self, use_shm: bool, shm_path: str | None) -> tuple[Arena, str] | None:
        if not use_shm:
            return None
        nonce = secrets.token_hex(16)
        try:
            if shm_path:
                arena = Arena(shm_path)
            else:
                path = os.path.join(shm_dir(), f"orion-{secrets.token_hex(8)}")
                arena = Arena(path, DEFAULT_SHM_BYTES, create=True)
                self._created_shm = path
        except (OSError, ShmError):
            return None
        arena.write_nonce(nonce)
        return arena, nonce

    def _handshake(self, own: tuple[Arena, str] | None) -> dict:
        hello = {"kind": m.HELLO, "protocol": PROTOCOL_VERSION, "version": __version__,
                 "torch": torch.__version__, "grant": self.vgpu["grant"],
                 "client": {"host": socket.gethostname(), "pid": os.getpid(),
                            "user": _user(), "command": " ".join(sys.argv)[:1000]},
                 "shm": None}
        if own is not None:
            hello["shm"] = {"path": own[0].path, "nonce": own[1], "size": own[0].size}
        try:
            frames.send_frame(self.sock, msgpack.packb(hello))
            body, _ = frames.recv_frame(self.sock)
            reply = msgpack.unpackb(body)
        except (OSError, frames.FrameError) as exc:
            self._unlink_shm()
            raise OrionError(f"Orion Server {self.where} closed the session during the handshake "
                             f"({exc}); see the server's server.log") from None
        self._unlink_shm()  # both sides have it mapped; nothing is left behind if we die
        if reply.get("kind") == m.REFUSED:
            raise OrionError(f"Orion Server {self.where} refused the session: {reply.get('reason')}")
        if reply.get("kind") != m.WELCOME:
            raise OrionError(f"{self.where} is not an Orion Server (unexpected handshake reply)")
        if own is not None and reply.get("shm"):
            self.arena = own[0]
        elif own is not None:
            own[0].close()
        return reply

    def _unlink_shm(self) -> None:
        path, self._created_shm = self._created_shm, None
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    # commands ----------------------------------------------------------------
    def push(self, cmd: list) -> None:
        with self.lock:
            if self.capture is not None:
                self.capture += self.packer.pack(cmd)
                return
            self.buf += self.packer.pack(cmd)
            self.n_cmds += 1
            if self.n_cmds >= FLUSH_OPS or len(self.buf) >= FLUSH_BYTES:
                self.flush()

    def define(self, op_id: int, name: str) -> None:
        with self.lock:
            if op_id not in self.defined:
                self.defined.add(op_id)
                self.buf += self.packer.pack([m.CMD_DEF, op_id, name])  # never captured
                self.n_cmds += 1

    # graph capture ---------------------------------------------------------------
    def begin_capture(self) -> None:
        with self.lock:
            self.flush()
            self.capture = bytearray()
            self.kept: list[int] = []

    def end_capture(self) -> tuple[bytes, list[int]]:
        """The captured commands, and handles freed meanwhile (the graph still uses them)."""
        with self.lock:
            data, self.capture = bytes(self.capture or b""), None
            kept, self.kept = self.kept + self.frees, []
            self.frees = []
            return data, kept

    def replay(self, data: bytes) -> None:
        with self.lock:
            self.buf += data
            self.n_cmds += 1
            self.flush()

    def _not_capturing(self) -> None:
        if self.capture is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing "
                               "(a sync or host transfer inside torch.cuda.graph capture)")

    def flush(self) -> None:
        if self.capture is not None:
            self.kept.extend(self.frees)  # a graph being captured may still use them
            self.frees = []
        if self.frees:
            frees, self.frees = self.frees, []
            self.buf += self.packer.pack([m.CMD_FREE, frees])
        if not self.buf:
            return
        body, self.buf = self.buf, bytearray()
        payload, self.payload = self.payload, []
        self.n_cmds = 0
        try:
            frames.send_frame(self.sock, body, payload)
        except OSError as exc:
            raise self._lost(exc) from None

    def request(self, cmd: list) -> list:
        """Send ``cmd`` (which asks for an answer) after everything queued; wait for it."""
        with self.lock:
            self._not_capturing()
            self.buf += self.packer.pack(cmd)
            self.flush()
            return self._read_reply()

    def _read_reply(self) -> list:
        try:
            body, self._payload_left = frames.recv_frame(self.sock)
        except (OSError, frames.FrameError) as exc:
            raise self._lost(exc) from None
        reply = msgpack.unpackb(body, ext_hook=codec.client_ext_hook, strict_map_key=False)
        if reply[0] == m.REPLY_ERROR:
            if self._payload_left:
                frames.discard(self.sock, self._payload_left)
            raise_remote(reply[1], reply[2])
        return reply

    def _lost(self, exc: BaseException) -> OrionError:
        self.closed = True
        return OrionError(f"lost the session with Orion Server {self.where} ({exc or 'closed'}); "
                          "the server stopped or the network failed: rerun the program")

    # bulk data ---------------------------------------------------------------
    def upload(self, handle: int, t: torch.Tensor) -> None:
        with self.lock:
            self._upload(handle, t)

    def _upload(self, handle: int, t: torch.Tensor) -> None:
        self._not_capturing()
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        code = codec.DTYPE_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"dtype {t.dtype} is not supported on a vGPU")
        raw = t.reshape(-1).view(torch.uint8) if nbytes else None
        arena = self.arena
        if arena is not None and raw is not None and SHM_MIN_BYTES <= nbytes <= arena.ring_size:
            if not arena.fits(nbytes):
                self.flush()  # the server frees ring space only for commands it has seen
            pos = arena.reserve(nbytes)
            arena.ring_region(pos, nbytes).copy_(raw)
            self.push([m.CMD_UPLOAD, handle, code, list(t.shape), nbytes, pos])
            return
        self.buf += self.packer.pack([m.CMD_UPLOAD, handle, code, list(t.shape), nbytes, None])
        if raw is not None:
            self.payload.append(memoryview(raw.numpy()))
        self.flush()  # the caller may modify its tensor right after .to("cuda") returns

    def fetch(self, handle: int) -> torch.Tensor:
        with self.lock:
            return self._fetch(handle)

    def _fetch(self, handle: int) -> torch.Tensor:
        reply = self.request([m.CMD_FETCH, handle, None])
        _, dtype, shape, nbytes, off = reply
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            raw = out.reshape(-1).view(torch.uint8)
            if off is None:
                frames.recv_exact_into(self.sock, memoryview(raw.numpy()))
            else:
                assert self.arena is not None
                raw.copy_(self.arena.region(off, nbytes))
        return out

    def call(self, cmd: list) -> list:
        return self.request(cmd)

    def stats(self) -> dict:
        return self.request([m.CMD_STATS])[1]

    def rng_state(self) -> torch.Tensor:
        with self.lock:
            reply = self.request([m.CMD_RNG_GET])
            state = torch.empty(int(reply[1]), dtype=torch.uint8)
            frames.recv_exact_into(self.sock, memoryview(state.numpy()))
            return state

    def set_rng_state(self, state: torch.Tensor) -> None:
        state = state.contiguous().view(torch.uint8)
        with self.lock:
            self.buf += self.packer.pack([m.CMD_RNG_SET, state.numel()])
            self.payload.append(memoryview(state.numpy()))
            self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.buf += self.packer.pack([m.CMD_BYE])
            self.flush()
        except (OSError, OrionError):
            pass
        try:
            self.sock.close()
        finally:
            if self.arena is not None:
                self.arena.close()


KEEPALIVE_IDLE_S = int(os.environ.get("ORION_KEEPALIVE_S", "10"))


def _keepalive(s: socket.socket) -> None:
    """A cut network must end in an error, not a hang: probe an idle link and give up."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 2),
                       ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", (KEEPALIVE_IDLE_S + 6) * 1000)):
        if hasattr(socket, opt):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def describe(reply: dict) -> dict[str, Any]:
    return dict(reply.get("device") or {})
