"""One session with one vGPU: connection, handshake, command buffer, requests.

Commands are packed into a buffer and sent without waiting for the server (pipelining);
the client blocks only on requests that need an answer (sync points).
"""

from __future__ import annotations

import getpass
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.client.errors import OrionError, raise_remote
from orion_vgpu.client.hostpool import (
    ONE_COPY_MIN,
    UPLOAD_MIN,
    HostBuffer,
    HostPool,
    cache_bytes,
)
from orion_vgpu.protocol import codec, frames, waiting
from orion_vgpu.protocol import messages as m
from orion_vgpu.protocol import settings as settings_protocol
from orion_vgpu.protocol.shm import (
    STREAM_MIN_BYTES,
    Arena,
    ShmError,
    ShmPeerGone,
    chunks,
    copy_bytes,
    prefer_huge_pages,
    shm_dir,
    stream_chunk,
)

FLUSH_BYTES = 256 * 1024


def _nothing() -> None:
    pass


# Hands the handles of tensors the program dropped to their connections' ``frees``, before
# frees are queued (frontend._drain_frees: once a frame, not once an op; set by frontend,
# which this module does not import).
collect_frees: Callable[[], None] = _nothing
_UNSET = object()
# The commands still in the buffer at a sync point are work the server starts only then,
# after it finishes the frame before them: an MLP synced every 20 steps waited 5 ms in its
# item() at 512, 2.6 ms at 128, 1.0 ms at 32 (0.6 at 16), 7 % of its step; the tiny-op
# loop and the transformer step measured the same at 32 as at 128.
FLUSH_OPS = 32
# After a sync point the server has nothing to do: the first frame goes out after this
# many commands, each next one after twice as many, up to FLUSH_OPS. The server then starts
# on the first ops while the program is still issuing the rest (compute-bound steps).
FLUSH_FIRST = 8
# A command that makes a tensor this large (its kernel takes longer than a frame costs)
# goes out at once, with those before it, when the server has nothing left to run.
FLUSH_WORK_BYTES = 256 * 1024
# A reply expected within this is waited for awake (protocol.waiting): a process blocked in
# recv took 0.1-0.4 ms to run again after its reply came (a 2-vCPU VM), an MLP loop's
# item() 889 -> 742 us. Slower replies are waited for asleep, as before.
SPIN_MAX_S = 0.002
SHM_MIN_BYTES = 32 * 1024
# Uploads up to this size sent in the socket's frames are copied and queued with the
# commands; larger ones are sent from the caller's memory at once (one copy fewer).
INLINE_COPY_BYTES = 64 * 1024
DEFAULT_SHM_BYTES = 256 * 1024 * 1024
# Stream large transfers through shared memory in chunks (protocol.shm); off: whole copies.
SHM_STREAM = True


class _Exchange(threading.local):
    depth = 0  # exchanges with a server under way in this thread
    pending = False  # a Ctrl-C came during one (main thread)
    conn: Connection | None = None


_exchange = _Exchange()
_prev_sigint: Any = None
INTERRUPTED = ("this program's vGPU session was interrupted in the middle of a message (a "
               "second Ctrl-C): what it computed is lost; rerun the program")


def install_interrupt_guard() -> None:
    """Ctrl-C in the middle of a message would leave half a frame on the socket, or a reply
    nobody reads, and every later op of the session would read the wrong bytes (a Jupyter
    kernel goes on after an interrupt). As a CUDA sync finishes before Python sees the
    signal, an exchange finishes before the KeyboardInterrupt; a second Ctrl-C during one
    gives the session up at once. Installed once, from the main thread, over a Python
    handler (SIG_IGN and SIG_DFL are left alone)."""
    global _prev_sigint
    if _prev_sigint is not None or threading.current_thread() is not threading.main_thread():
        return
    prev = signal.getsignal(signal.SIGINT)
    if callable(prev):
        _prev_sigint = prev
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum: int, frame: Any) -> Any:
    ex = _exchange  # the main thread's: Python runs signal handlers there
    if ex.depth:
        if not ex.pending:
            ex.pending = True
            return None
        if ex.conn is not None:
            ex.conn.broken = INTERRUPTED
    ex.pending = False
    return _prev_sigint(signum, frame)


class _Guard:
    """``with conn.guard``: one exchange with the server (see install_interrupt_guard)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        ex = _exchange
        ex.depth += 1
        ex.conn = self.conn

    def __exit__(self, *exc: object) -> None:
        ex = _exchange
        ex.depth -= 1
        if ex.pending and not ex.depth:
            ex.pending = False
            _prev_sigint(signal.SIGINT, None)


class Connection:
    """A session on one vGPU of an allocation."""

    def __init__(self, vgpu: dict, *, enable_net: bool = False, use_shm: bool = True,
                 shm_path: str | None = None) -> None:
        self.vgpu = vgpu
        self.where = vgpu.get("node_addr", "?")
        self.opened = time.monotonic()  # the session's start, for torch.cuda.utilization
        self.sock = self._connect(vgpu, enable_net)
        self.packer = msgpack.Packer(default=codec.encode_default, autoreset=True)
        self.buf = bytearray()
        self.payload: list[memoryview] = []
        self.payload_bytes = 0  # of queued small uploads, copied into ``payload``
        self.n_cmds = 0
        self.flush_at = FLUSH_FIRST
        self.frames_sent = 0  # against the server's frames_done (shared memory)
        self._frames_done: Arena | None = None  # the arena that counts them, if ours alone
        self.frees: list[int] = []
        # What the session has: PyTorch's defaults, then what send_settings sent.
        self.settings: dict[str, Any] = dict(settings_protocol.DEFAULTS)
        self.arena: Arena | None = None
        self.host_pool: HostPool | None = None  # buffers downloads land in (arena sessions)
        self.defined: set[int] = set()
        self.closed = False
        # the server cannot run on this process's cores (protocol.waiting.cores_apart)
        self.cores_apart = False
        self.broken: str | None = None  # why the byte stream can no longer be trusted
        self.ooms = 0  # OutOfMemoryErrors the server reported (torch.cuda.memory_stats)
        self._def_at: tuple[int | None, int] = (None, 0)  # the last CMD_DEF: op, offset in buf
        self._def_end = 0
        self.guard = _Guard(self)
        self.capture: bytearray | None = None  # commands recorded by a CUDA graph capture
        self.kept: list[int] = []
        # Programs may drive one vGPU from several threads (DataLoader pinning, DataParallel).
        self.lock = threading.RLock()
        self._created_shm: str | None = None
        self._payload_left = 0
        self._waiter = waiting.Waiter(self.sock, SPIN_MAX_S)  # replies awaited awake
        # Tensor bytes this process moved to and from the server (tests, diagnostics).
        self.bytes_up = 0
        self.bytes_down = 0
        self.peer_seq = 0  # copies offered to sibling vGPUs (CMD_PEER_SEND), in stream order
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
                 "shm": None, "peer_key": PEER_KEY}
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
        self.cores_apart = waiting.cores_apart(reply.get("placement"))
        if self.cores_apart:
            self._waiter.crowd_spin_s = waiting.CROWD_SPIN_S
        if own is not None and reply.get("shm"):
            self.arena = own[0]
            # With an `orion shm` file (a container that mounts only that file) the server
            # cannot see files this process makes in its shm directory.
            private = os.path.basename(own[0].path).startswith("orion-")
            cache = cache_bytes()
            if cache > 0 and private:
                self.host_pool = HostPool(cache, own[1])
            # An `orion shm` file is one arena for all of a program's sessions: its header's
            # frame count is no single session's.
            self._frames_done = own[0] if private else None
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
            try:  # inline: the hot path (a try costs nothing in 3.11, a call 0.1 us)
                data = self.packer.pack(cmd)
            except Exception:
                self._undefine(cmd)
                raise
            if self.capture is not None:
                self.capture += data
                return
            self.buf += data
            self.n_cmds += 1
            if self.n_cmds >= self.flush_at or len(self.buf) + self.payload_bytes >= FLUSH_BYTES:
                self.flush()
                self.flush_at = min(max(2 * self.flush_at, 2 * FLUSH_FIRST), FLUSH_OPS)

    def starved(self) -> bool:
        """The server has run every frame sent and waits for the next (a co-located one
        says so in the session's own arena; otherwise it is taken as busy)."""
        arena = self._frames_done
        return arena is not None and arena.frames_done() == self.frames_sent

    def define(self, op_id: int, name: str) -> None:
        with self.lock:
            if op_id not in self.defined:
                self.defined.add(op_id)
                self._def_at = (op_id, len(self.buf))
                self.buf += self.packer.pack([m.CMD_DEF, op_id, name])  # never captured
                self._def_end = len(self.buf)
                self.n_cmds += 1

    def _pack(self, cmd: list) -> bytes:
        try:
            return self.packer.pack(cmd)
        except Exception:
            self._undefine(cmd)
            raise

    def _undefine(self, cmd: list) -> None:
        """The op ``define`` just named could not be packed (an argument the protocol cannot
        carry): take the name back, or the server's refusal of it (a storage op is not
        allowed) would fail the program's next, unrelated op."""
        op_id, at = self._def_at
        if len(cmd) > 1 and cmd[1] == op_id and self._def_end == len(self.buf):
            del self.buf[at:]
            self.defined.discard(op_id)
            self.n_cmds -= 1
        self._def_at = (None, 0)

    # graph capture ---------------------------------------------------------------
    def begin_capture(self) -> None:
        with self.lock:
            self.flush()
            self.capture = bytearray()
            self.kept: list[int] = []

    def end_capture(self) -> tuple[bytes, list[int]]:
        """The captured commands, and handles freed meanwhile (the graph still uses them)."""
        with self.lock:
            collect_frees()  # tensors dropped during the capture: kept, not freed after it
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
        self._queue_frees()
        if not self.buf:
            return
        if self.broken:
            raise OrionError(self.broken)
        with self.guard:
            body, self.buf = self.buf, bytearray()
            payload, self.payload = self.payload, []
            self.payload_bytes = 0
            self.n_cmds = 0
            try:
                frames.send_frame(self.sock, body, payload)
                self.frames_sent += 1
            except OSError as exc:
                raise self._lost(exc) from None

    def queue_frees(self) -> None:
        """The frees collected so far go after the commands queued so far, now."""
        with self.lock:
            self._queue_frees()

    def _queue_frees(self) -> None:
        """Frees after everything queued so far (which may still use those handles)."""
        collect_frees()
        if self.frees and self.capture is None:
            frees, self.frees = self.frees, []
            self.buf += self.packer.pack([m.CMD_FREE, frees])

    def request(self, cmd: list) -> list:
        """Send ``cmd`` (which asks for an answer) after everything queued; wait for it."""
        with self.lock, self.guard:
            self._not_capturing()
            self.buf += self._pack(cmd)
            self.flush()
            return self._read_reply()

    def _read_reply(self) -> list:
        arena = self.arena
        if arena is not None:
            arena.set_waiting(True)  # a co-located emulated GPU may have our core meanwhile
        t0 = time.perf_counter()
        try:
            self._waiter.before(t0)
            body, self._payload_left = frames.recv_frame(self.sock)
        except (OSError, frames.FrameError) as exc:
            raise self._lost(exc) from None
        finally:
            if arena is not None:
                arena.set_waiting(False)
        self._waiter.after(t0)
        self.flush_at = FLUSH_FIRST  # the server has caught up with everything sent
        reply = msgpack.unpackb(body, ext_hook=codec.client_ext_hook, strict_map_key=False)
        if reply[0] == m.REPLY_ERROR:
            if self._payload_left:
                frames.discard(self.sock, self._payload_left)
            self.closed = self.closed or reply[1] == m.ERR_SESSION_ENDED
            self.ooms += reply[1] == "OutOfMemoryError"
            raise_remote(reply[1], reply[2])
        return reply

    def _lost(self, exc: BaseException) -> OrionError:
        self.closed = True
        last = self._last_words()
        if last is not None:
            return OrionError(last)
        return OrionError(f"lost the session with Orion Server {self.where} ({exc or 'closed'}); "
                          "the server stopped or the network failed: rerun the program")

    def _last_words(self) -> str | None:
        """The server's reason, when it ended the session and closed the connection while
        we were still sending (its error reply is still in our receive buffer)."""
        try:
            self.sock.settimeout(0.2)
            body, _ = frames.recv_frame(self.sock)
            reply = msgpack.unpackb(body, strict_map_key=False)
        except (OSError, frames.FrameError, ValueError, msgpack.UnpackException):
            return None
        if isinstance(reply, list) and len(reply) == 3 and reply[:2] == [m.REPLY_ERROR,
                                                                         m.ERR_SESSION_ENDED]:
            return str(reply[2])
        return None

    # bulk data ---------------------------------------------------------------
    def upload(self, handle: int, t: torch.Tensor) -> None:
        with self.lock, self.guard:
            self._upload(handle, t)

    def _upload(self, handle: int, t: torch.Tensor) -> None:
        self._not_capturing()
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        code = codec.DTYPE_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"dtype {t.dtype} is not supported on a vGPU")
        self.bytes_up += nbytes
        raw = t.reshape(-1).view(torch.uint8) if nbytes else None
        pool = self.host_pool
        if pool is not None and nbytes >= UPLOAD_MIN:
            buf = pool.take(nbytes)
            if buf is not None:
                copy_bytes(torch.from_numpy(buf.data(nbytes)), raw)
                pool.lend(buf)
                self._queue_frees()  # before the upload: the server may reuse that memory
                self.push([m.CMD_UPLOAD, handle, code, list(t.shape), nbytes, None, None,
                           pool.destination(buf)])
                return
        arena = self.arena
        if SHM_STREAM and arena is not None and raw is not None and nbytes >= STREAM_MIN_BYTES \
                and stream_chunk(arena.ring_size):
            self._upload_streamed(arena, [m.CMD_UPLOAD, handle, code, list(t.shape), nbytes], raw)
            return
        if arena is not None and raw is not None and SHM_MIN_BYTES <= nbytes <= arena.ring_size:
            if not arena.fits(nbytes):
                self.flush()  # the server frees ring space only for commands it has seen
            pos = arena.reserve(nbytes)
            copy_bytes(arena.ring_region(pos, nbytes), raw)
            self._queue_frees()  # before the upload: the server may reuse that memory for it
            self.push([m.CMD_UPLOAD, handle, code, list(t.shape), nbytes, pos])
            return
        data = memoryview(raw.numpy()) if raw is not None else None  # fails before queueing
        self._queue_frees()
        cmd = [m.CMD_UPLOAD, handle, code, list(t.shape), nbytes, None]
        if nbytes <= INLINE_COPY_BYTES:
            # A copy of a small tensor's bytes rides with the next frame, as the ops do (a
            # frame of its own cost a system call and a worker wake-up per upload).
            if data is not None:
                self.payload.append(memoryview(data.tobytes()))
                self.payload_bytes += nbytes
            self.push(cmd)
            return
        self.buf += self.packer.pack(cmd)
        if data is not None:
            self.payload.append(data)
        self.flush()  # the caller may modify its tensor right after .to("cuda") returns

    def _upload_streamed(self, arena: Arena, cmd: list, raw: torch.Tensor) -> None:
        """Send the command first, then copy chunk after chunk into the ring while the
        worker copies the previous ones out (``[..., start, chunk]``, see protocol.shm)."""
        nbytes = raw.numel()
        chunk = stream_chunk(arena.ring_size)
        start = arena.place(min(chunk, nbytes))[0]
        self.flush()  # queued frees go first: the server may reuse that memory for this one
        self.buf += self.packer.pack([*cmd, start, chunk])
        self.flush()  # the worker must be reading this stream before the ring fills up
        done = 0
        try:
            for pos, c in chunks(start, nbytes, chunk, arena.ring_size):
                if arena.reserve_chunk(c, self._peer_alive) != pos:
                    raise ShmError("shared-memory ring out of step with the upload")
                copy_bytes(arena.ring_region(pos, c), raw[done:done + c])
                arena.set_published(pos + c)
                done += c
        except ShmPeerGone as exc:
            raise self._lost(exc) from None

    def _peer_alive(self) -> bool:
        """False once the server closed the connection (a worker that died mid-stream)."""
        return frames.still_connected(self.sock)

    def fetch(self, handle: int, nbytes: int = 0) -> torch.Tensor:
        """The tensor's bytes in a host tensor; ``nbytes`` (its size, when the caller knows
        it) lets a large one land in a host buffer with one copy (client.hostpool)."""
        with self.lock, self.guard:
            pool = self.host_pool
            buf = pool.take(nbytes) if pool is not None and nbytes >= ONE_COPY_MIN else None
            if buf is None:
                return self._fetch(handle)
            return self._fetch_into(handle, buf)

    def _fetch_into(self, handle: int, buf: HostBuffer) -> torch.Tensor:
        pool = self.host_pool
        assert pool is not None
        try:
            reply = self.request([m.CMD_FETCH, handle, None, SHM_STREAM, pool.destination(buf)])
        except BaseException:
            pool.forget(buf)
            raise
        if reply[4] == m.IN_HOST_BUFFER:
            _, dtype, shape, nbytes = reply[:4]
            self.bytes_down += nbytes
            return pool.wrap(buf, dtype, shape, nbytes)
        pool.give_back(buf)  # larger than the caller said (or an older server): the usual way
        return self._fetched(reply)

    def _fetch(self, handle: int) -> torch.Tensor:
        return self._fetched(self.request([m.CMD_FETCH, handle, None, SHM_STREAM]))

    def _fetched(self, reply: list) -> torch.Tensor:
        _, dtype, shape, nbytes, off = reply[:5]
        self.bytes_down += nbytes
        out = torch.empty(shape, dtype=dtype, device="cpu")  # whatever the default device
        if nbytes:
            prefer_huge_pages(out)
            raw = out.reshape(-1).view(torch.uint8)
            if off is None:
                frames.recv_exact_into(self.sock, memoryview(raw.numpy()))
            elif len(reply) > 5:
                self._fetch_streamed(raw, int(reply[5]))
            else:
                assert self.arena is not None
                copy_bytes(raw, self.arena.region(off, nbytes))
        return out

    def _fetch_streamed(self, raw: torch.Tensor, chunk: int) -> None:
        """Copy a streamed reply out of the download area chunk by chunk while the worker
        writes the next ones (positions from 0 on, wrapping around the area)."""
        arena = self.arena
        if arena is None or not 4096 <= chunk <= arena.download_size:
            raise self._lost(ShmError("server streamed a reply without usable shared memory"))
        area, base, done = arena.download_size, arena.download_off, 0
        try:
            for pos, c in chunks(0, raw.numel(), chunk, area):
                arena.wait_dl_published(pos + c, self._peer_alive)
                copy_bytes(raw[done:done + c], arena.region(base + pos % area, c))
                arena.set_dl_consumed(pos + c)
                done += c
        except ShmPeerGone as exc:
            raise self._lost(exc) from None

    def call(self, cmd: list) -> list:
        return self.request(cmd)

    # copies between vGPUs, server to server (docs/data-plane.md, "Peer copies") ----------
    def peer_route(self, dst: Connection) -> list | None:
        """How ``dst``'s worker reaches this session's worker for a copy, or None when the
        bytes must come through this process (an older server, or ORION_PEER_COPY=0)."""
        mode = PEER_COPY_MODE
        mine = self.welcome.get("peer")
        if mode in ("0", "off", "no", "false") or not isinstance(mine, dict) \
                or not isinstance(dst.welcome.get("peer"), dict):
            return None
        same_node = self.vgpu.get("node_id") is not None \
            and self.vgpu.get("node_id") == dst.vgpu.get("node_id")
        if same_node and mode != "tcp" and mine.get("unix"):
            return ["unix", mine["unix"]]
        tcp = mine.get("tcp")
        if not tcp:
            return None
        host, _, port = str(tcp).rpartition(":")
        return ["tcp", host.strip("[]"), int(port)]

    def peer_send(self, handle: int, xid: bytes) -> int:
        """Offer ``handle`` to the peer that pulls ``xid``; sent at once (the receive
        that follows on the other vGPU waits for it). Returns its sequence number."""
        with self.lock, self.guard:
            self._not_capturing()
            self.peer_seq += 1
            self.buf += self.packer.pack([m.CMD_PEER_SEND, handle, xid, self.peer_seq])
            self.flush()
            return self.peer_seq

    def peer_recv(self, handle: int, xid: bytes, seq: int, route: list, t: torch.Tensor) -> None:
        """Pull transfer ``xid`` into a new tensor ``handle`` shaped like ``t``; sent at
        once so the source's snapshot is taken early."""
        with self.lock, self.guard:
            self._not_capturing()
            self.buf += self.packer.pack([m.CMD_PEER_RECV, handle, xid, seq, route,
                                          codec.DTYPE_CODE[t.dtype], list(t.shape)])
            self.flush()

    def stats(self) -> dict:
        return self.request([m.CMD_STATS])[1]

    def rng_state(self, gid: int = 0) -> torch.Tensor:
        """The state of the vGPU's default generator, or of the program's generator ``gid``."""
        with self.lock, self.guard:
            reply = self.request([m.CMD_RNG_GET, gid] if gid else [m.CMD_RNG_GET])
            state = torch.empty(int(reply[1]), dtype=torch.uint8, device="cpu")
            frames.recv_exact_into(self.sock, memoryview(state.numpy()))
            return state

    def set_rng_state(self, state: torch.Tensor, gid: int = 0) -> None:
        state = state.contiguous().view(torch.uint8)
        with self.lock, self.guard:
            cmd = [m.CMD_RNG_SET, state.numel(), gid] if gid else [m.CMD_RNG_SET, state.numel()]
            self.buf += self.packer.pack(cmd)
            self.payload.append(memoryview(state.numpy()))
            self.flush()

    def send_settings(self, values: dict) -> None:
        """The program's torch settings (client/settings.py) the session does not have yet."""
        with self.lock:  # never part of a graph capture: it sets how later ops run
            diff = {k: v for k, v in values.items() if self.settings.get(k, _UNSET) != v}
            if diff:
                self.buf += self.packer.pack([m.CMD_SETTINGS, diff])
                self.n_cmds += 1
                self.settings.update(diff)

    def seed(self, seed: int, gid: int = 0) -> None:
        """Seed the vGPU's default generator, or the program's generator ``gid``."""
        self.push([m.CMD_SEED, seed, gid] if gid else [m.CMD_SEED, seed])

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
            if self.host_pool is not None:
                self.host_pool.close()
            if self.arena is not None:
                self.arena.close()


KEEPALIVE_IDLE_S = int(os.environ.get("ORION_KEEPALIVE_S", "10"))
# Copies between vGPUs: "auto" (server to server, Unix socket on one node, TCP across
# nodes), "tcp" (TCP even on one node), "0"/"off" (through this process, the old way).
PEER_COPY_MODE = os.environ.get("ORION_PEER_COPY", "auto").strip().lower()
# Given to every session of this process: their workers prove it to each other before a
# copy (server/peer.py), so a stranger reaching a peer port cannot even wait there.
PEER_KEY = secrets.token_bytes(16)


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
