"""Server-to-server copies between the vGPUs of one client (``CMD_PEER_SEND``/``RECV``).

The client picks a random 16-byte transfer id and a per-source sequence number, queues
``[PEER_SEND, handle, id, seq]`` on the source session and ``[PEER_RECV, new_handle, id,
seq, address, dtype, shape]`` on the destination; neither waits for an answer. The bytes
go from worker to worker: on one node through shared memory (a memfd passed over an
abstract Unix socket), across nodes over TCP on the server's bind address. See
docs/data-plane.md ("Peer copies").

Both workers run their command streams one command at a time, so the source's command
thread never waits for the destination: ``PEER_SEND`` copies the tensor into a snapshot
(a memfd, reused from a small pool) and publishes it in an export table, chunk by chunk,
so that a puller already there copies each chunk out while the next one is copied in.
Snapshots count in the session's memory ledger and expire when nobody pulls them in time.
The destination's ``PEER_RECV`` does wait (stream order: the tensor is not there before
the source's ``PEER_SEND``); the client queues the send before the receive, which rules
out a cycle.

Wire protocol on a peer connection (frames of ``protocol.frames``, msgpack bodies):
source -> ``{"kind": "orion-peer", "v": 1, "nonce": ns}``; puller -> ``{"member":
HMAC(key, "member" ns nr), "lookup": sha256(id)[:16], "proof": HMAC(id, "pull" ns nr),
"nonce": nr, "seq", "fd": bool}``; source -> ``{"ok": true, "proof": HMAC(id, "serve" nr
ns), "dtype", "shape", "nbytes", "mode"}`` then, mode "stream", the bytes as the frame's
payload, or, mode "fd" (Unix socket, the memfd rides on that frame), ``{"ready": n}``
frames as the snapshot fills, answered by ``{"done": true}``; or ``{"ok": false,
"error"}``. ``key`` is the client's peer key (in the hello of each of its sessions): a
stranger is refused before it can look anything up or wait. The id never crosses the
wire, both ends prove they know it, a transfer is served once, and a puller sends nothing
to an endpoint that does not greet it like a peer.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import hmac
import logging
import math
import mmap
import os
import re
import secrets
import select
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol.shm import prefer_huge_pages
from orion_vgpu.server.executor import Executor, MemoryLedger, SessionError, oom_message
from orion_vgpu.server.netif import advertised_address

log = logging.getLogger("orion.session")

KIND = "orion-peer"
VERSION = 1
ID_BYTES = 16
UNIX_PREFIX = "orion-peer-"
_UNIX_NAME = re.compile(r"orion-peer-[0-9a-f]{32}\Z")
MAX_EXPORTS = 64            # snapshots waiting for their puller, per session
MAX_CONNECTIONS = 16        # peer connections served at once, per session
MAX_FAILED = 256            # reasons kept for pullers of transfers that failed or expired
MAX_MSG = 64 * 1024
HANDSHAKE_S = 10.0
IO_TIMEOUT_S = 60.0         # no progress for this long on a transfer ends it
CHUNK = 4 << 20             # snapshot published, and copied out, this much at a time
FD_MIN_BYTES = 1 << 20      # smaller copies travel inline even on one node
POOL_BYTES = 256 << 20      # idle snapshot buffers kept warm for the next copies
POOL_IDLE_S = 30.0
LOG_BYTES = 1 << 20         # copies at least this large get their own log line
SOCKET_BUFFER_BYTES = 4 << 20
KEEPALIVE_IDLE_S = int(os.environ.get("ORION_KEEPALIVE_S", "10"))
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_UNKNOWN = ("unknown transfer id: never offered by this session, already received, or "
            "expired")


def ttl_s() -> float:
    """How long a snapshot waits for its puller, and a puller for its source (seconds)."""
    try:
        return max(0.1, float(os.environ.get("ORION_PEER_TTL_S", "600")))
    except ValueError:
        return 600.0


def lookup_key(xid: bytes) -> bytes:
    """What names a transfer on the wire: reveals nothing usable about the id."""
    return hashlib.sha256(b"orion-peer-lookup\0" + xid).digest()[:16]


def _proof(xid: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(xid, label + a + b, hashlib.sha256).digest()


# -- wire helpers ------------------------------------------------------------------------

def _send_msg(sock: socket.socket, msg: dict, payload_len: int = 0, fd: int | None = None
              ) -> None:
    data = msgpack.packb(msg)
    data = frames.HEADER.pack(len(data), payload_len) + data
    if fd is None:
        sock.sendall(data)
        return
    sent = socket.send_fds(sock, [data], [fd])  # the fd rides on the frame's first bytes
    sock.sendall(data[sent:])


def _recv_msg(sock: socket.socket, fds: list[int] | None = None) -> tuple[dict, int]:
    """One frame's map and payload length; with ``fds``, also what fds came with it."""
    if fds is None:
        body, payload_len = frames.recv_frame(sock, max_body=MAX_MSG)
    else:
        head = _recv_exact_fds(sock, frames.HEADER.size, fds)
        body_len, payload_len = frames.HEADER.unpack(head)
        if body_len > MAX_MSG:
            raise frames.FrameError(f"peer message of {body_len} bytes")
        body = _recv_exact_fds(sock, body_len, fds)
    msg = msgpack.unpackb(bytes(body), raw=False)
    if not isinstance(msg, dict):
        raise ValueError("peer message is not a map")
    return msg, payload_len


def _recv_exact_fds(sock: socket.socket, n: int, fds: list[int]) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 1)
        fds.extend(got)
        if not data:
            raise frames.PeerClosed("connection closed by peer")
        buf += data
    return buf


def _address_of(buf: Any) -> int:
    return ctypes.addressof(buf)


def _bytes_at(buf: Any, off: int, n: int) -> memoryview:
    return memoryview(buf).cast("B")[off:off + n]


def _tune(sock: socket.socket, tcp: bool) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
    if tcp:
        # Same settings as client connections: a cut network ends a transfer, not hangs it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 2),
                           ("TCP_KEEPCNT", 3),
                           ("TCP_USER_TIMEOUT", (KEEPALIVE_IDLE_S + 6) * 1000)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- snapshot buffers ----------------------------------------------------------------------

class _Buffer:
    """Shared memory (a memfd) holding one snapshot. Its size is sealed, so a peer that
    maps it can never fault on a truncated file; it is reused through the pool, so the
    pages of the next copy are already there."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("orion-peer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.mm = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.buf = (ctypes.c_char * size).from_buffer(self.mm)
        self.addr = _address_of(self.buf)
        self.size = size
        self.idle_since = 0.0

    def close(self) -> None:
        del self.buf
        try:
            self.mm.close()
        except BufferError:  # a view is still out; unmapped when it goes
            pass
        os.close(self.fd)


def _buffer_size(nbytes: int) -> int:
    # Powers of two: pages are only touched up to what a copy writes, and reuse is likely.
    return max(64 << 10, 1 << max(0, nbytes - 1).bit_length())


@dataclass
class _Export:
    xid: bytes
    dtype: torch.dtype
    shape: list[int]
    nbytes: int
    buf: _Buffer
    count: torch.Tensor         # a meta tensor of nbytes: the snapshot's entry in the ledger
    deadline: float
    ready: int = 0              # bytes copied in so far (under the endpoint's lock)
    complete: bool = False      # the command thread is done with it (or failed: ``failed``)
    failed: bool = False
    release: str = ""           # "pool" / "close" once its puller is done, before complete


@dataclass
class _Waiter:
    """A puller that came before the source's command stream reached its PEER_SEND."""

    seq: int
    deadline: float
    # waiting -> ready (its snapshot is there: match again) | answered (error)
    state: str = "waiting"
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class PeerEndpoint:
    """One session's peer listeners, export table, buffer pool and peer-copy counters.

    The command thread calls ``offer``, ``settle`` and ``close``; the listener and
    connection threads never touch the ledger (it is the command thread's): a snapshot
    they served or dropped leaves the ledger at the command thread's next ``settle``.
    """

    def __init__(self, tag: str, ledger: MemoryLedger, key: bytes) -> None:
        self.tag = tag
        self.ledger = ledger
        self.key = key  # the client's peer key (its hello): shared by its sessions only
        self.ttl_s = ttl_s()
        self.address: dict[str, str | None] = {"unix": None, "tcp": None}
        self._cond = threading.Condition()
        self._exports: dict[bytes, _Export] = {}
        self._waiters: dict[bytes, _Waiter] = {}
        self._failed: OrderedDict[bytes, str] = OrderedDict()
        self._pool: list[_Buffer] = []
        self._done_seq = 0
        self._released: deque[torch.Tensor] = deque()
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._listeners: list[socket.socket] = []
        self._threads: set[threading.Thread] = set()
        self.counts = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0,
                       "expired": 0, "dropped": 0}

    # set-up and tear-down ----------------------------------------------------------
    def start(self, bind_addr: str | None) -> None:
        name = UNIX_PREFIX + secrets.token_hex(16)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Abstract name: nothing on disk to clean up, gone with the process.
        unix.bind("\0" + name)
        unix.listen(MAX_CONNECTIONS)
        self._listeners.append(unix)
        self.address["unix"] = name
        if bind_addr:
            try:
                self.address["tcp"] = self._listen_tcp(bind_addr)
            except OSError as exc:
                log.info("session %s peer copies across nodes unavailable: cannot listen on "
                         "%s (%s)", self.tag, bind_addr, exc)
        for listener in self._listeners:
            self._spawn(self._accept_loop, listener)
        self._spawn(self._expire_loop)

    def _listen_tcp(self, bind_addr: str) -> str:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            bind_addr, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            _tune(sock, tcp=False)  # buffers before listen(): accepted sockets inherit them
            sock.bind(sockaddr)
            sock.listen(MAX_CONNECTIONS)
        except OSError:
            sock.close()
            raise
        self._listeners.append(sock)
        return _host_port(advertised_address(bind_addr), sock.getsockname()[1])

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name="orion-peer", daemon=True)
        with self._cond:
            self._threads.add(t)
        t.start()

    def close(self) -> None:
        """Session end: refuse waiting pullers, free every snapshot, stop listening."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            exports, self._exports = list(self._exports.values()), {}
            for w in self._waiters.values():
                self._answer(w, "the source vGPU's session ended before the copy")
            self._waiters = {}
            for e in exports:
                self._release(e, "close")
            pool, self._pool = self._pool, []
            self._cond.notify_all()
        for b in pool:
            b.close()
        self.counts["dropped"] += len(exports)
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        self.settle()
        deadline = time.monotonic() + 1.0  # let waiting pullers read why, briefly
        with self._cond:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._log_summary(sum(e.nbytes for e in exports), len(exports))

    def _log_summary(self, dropped_bytes: int, dropped: int) -> None:
        c = self.counts
        if c["sent"] or c["received"] or c["expired"] or dropped:
            log.info("session %s peer copies: sent %d (%s), received %d (%s), %d expired "
                     "unreceived, %d dropped at session end (%s freed)", self.tag, c["sent"],
                     _mib(c["sent_bytes"]), c["received"], _mib(c["received_bytes"]),
                     c["expired"], dropped, _mib(dropped_bytes))

    # the command thread ------------------------------------------------------------
    def settle(self) -> None:
        """Take served and dropped snapshots out of the ledger (command thread only)."""
        while self._released:
            self.ledger.remove(self._released.popleft())

    def offer(self, ex: Executor, handle: Any, xid: bytes, seq: int) -> None:
        """PEER_SEND: snapshot the tensor, publishing it to its puller as it fills."""
        lookup = lookup_key(xid)
        try:
            self._snapshot(ex.tensor(handle), lookup, xid)
        except Exception as exc:
            with self._cond:
                self._remember_failure(lookup, f"the source could not send the tensor: {exc}")
            raise
        finally:
            self._advance(seq)

    def _snapshot(self, src: torch.Tensor, lookup: bytes, xid: bytes) -> None:
        nbytes = src.numel() * src.element_size()
        with self._cond:
            if self._closed:
                raise SessionError("RuntimeError", "the session is ending")
            if len(self._exports) >= MAX_EXPORTS:
                raise SessionError("RuntimeError", f"more than {MAX_EXPORTS} copies to other "
                                   "vGPUs wait for their destination")
        if nbytes > self.ledger.limit - self.ledger.used:
            raise SessionError("OutOfMemoryError", oom_message(nbytes, self.ledger) + (
                " (a copy to another vGPU holds a snapshot of the tensor on the source "
                "until the destination takes it)"))
        try:
            buf = self._take_buffer(nbytes)
        except OSError as exc:
            raise SessionError("OutOfMemoryError", f"no shared memory for a copy of "
                               f"{_mib(nbytes)} to another vGPU ({exc})") from None
        count = torch.empty(nbytes, dtype=torch.uint8, device="meta")
        self.ledger.add(count)
        e = _Export(xid, src.dtype, list(src.shape), nbytes, buf, count,
                    time.monotonic() + self.ttl_s)
        with self._cond:
            self._exports[lookup] = e
            w = self._waiters.pop(lookup, None)
            if w is not None:  # its puller is already here: it copies out as we copy in
                w.state = "ready"
                w.done.set()
        try:
            # Stream order: later in-place ops on ``src`` must not change what the peer
            # gets, so the copy is done before the next command runs.
            _fill(buf, src.detach(), nbytes, lambda n: self._publish(e, n))
        except Exception:
            with self._cond:
                e.failed = True
                if self._exports.pop(lookup, None) is e:  # no puller took it
                    self._release(e, "close")
            raise
        finally:
            with self._cond:
                e.complete = True
                self._cond.notify_all()
                if e.release:  # its puller is already done (or gone)
                    self._free(e, e.release)

    def _publish(self, e: _Export, ready: int) -> None:
        with self._cond:
            e.ready = ready
            self._cond.notify_all()

    def _take_buffer(self, nbytes: int) -> _Buffer:
        size = _buffer_size(nbytes)
        with self._cond:
            for b in self._pool:
                if size <= b.size <= 4 * size:
                    self._pool.remove(b)
                    return b
        return _Buffer(size)

    def _advance(self, seq: int) -> None:
        """The stream is past send ``seq``: pullers of earlier ids still waiting get the
        failure, or 'unknown' (their id was never offered)."""
        with self._cond:
            self._done_seq = max(self._done_seq, seq)
            for lookup, w in list(self._waiters.items()):
                if w.seq <= self._done_seq:
                    del self._waiters[lookup]
                    self._answer(w, self._failed.get(lookup, _UNKNOWN))

    def _remember_failure(self, lookup: bytes, reason: str) -> None:
        """For the puller of a transfer that failed or expired (caller holds the lock)."""
        self._failed[lookup] = reason
        while len(self._failed) > MAX_FAILED:
            self._failed.popitem(last=False)

    @staticmethod
    def _answer(w: _Waiter, error: str) -> None:
        w.state, w.error = "answered", error
        w.done.set()

    # snapshots leaving -------------------------------------------------------------
    def _release(self, e: _Export, how: str) -> None:
        """Its puller is done with it (caller holds the lock): the ledger lets it go at the
        next settle; the buffer goes back to the pool (or is closed) once complete."""
        if e.release:
            return
        e.release = how
        if e.complete:
            self._free(e, how)

    def _free(self, e: _Export, how: str) -> None:
        self._released.append(e.count)
        if how == "pool" and not self._closed and not e.failed \
                and sum(b.size for b in self._pool) + e.buf.size <= POOL_BYTES:
            e.buf.idle_since = time.monotonic()
            self._pool.append(e.buf)
        else:
            e.buf.close()

    def _expire_loop(self) -> None:
        try:
            with self._cond:
                while not self._closed:
                    self._cond.wait(1.0)
                    self._expire(time.monotonic())
        finally:
            self._forget_thread()

    def _expire(self, now: float) -> None:
        for lookup, e in list(self._exports.items()):
            if e.deadline <= now and e.complete:
                del self._exports[lookup]
                self._remember_failure(lookup, f"the transfer expired: not received within "
                                               f"{self.ttl_s:.0f} s")
                self.counts["expired"] += 1
                self._release(e, "pool")
                log.info("session %s peer copy of %d bytes expired unreceived", self.tag,
                         e.nbytes)
        for b in [b for b in self._pool if now - b.idle_since > POOL_IDLE_S]:
            self._pool.remove(b)
            b.close()

    # serving pullers ---------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        tcp = listener.family != socket.AF_UNIX
        try:
            while not self._closed:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    if self._closed:
                        return
                    time.sleep(0.1)  # out of fds: do not spin
                    continue
                if not self._slots.acquire(blocking=False):
                    log.warning("session %s peer copy refused: %d connections already being "
                                "served", self.tag, MAX_CONNECTIONS)
                    conn.close()  # a flood, not a client's copies
                    continue
                try:
                    self._spawn(self._serve_conn, conn, tcp)
                except RuntimeError as exc:  # no thread: out of memory or of threads
                    log.warning("session %s peer copy refused: %s", self.tag, exc)
                    self._slots.release()
                    conn.close()
        finally:
            self._forget_thread()

    def _serve_conn(self, conn: socket.socket, tcp: bool) -> None:
        try:
            if tcp or _same_user(conn):
                _tune(conn, tcp)
                self._handle_pull(conn, tcp)
        except (OSError, frames.FrameError, ValueError, TypeError, KeyError,
                msgpack.UnpackException) as exc:
            log.debug("session %s peer connection ended: %s", self.tag, exc)
        finally:
            conn.close()
            self._slots.release()
            self._forget_thread()

    def _handle_pull(self, conn: socket.socket, tcp: bool) -> None:
        conn.settimeout(HANDSHAKE_S)
        nonce_s = secrets.token_bytes(16)
        _send_msg(conn, {"kind": KIND, "v": VERSION, "nonce": nonce_s})
        req, payload = _recv_msg(conn)
        lookup, proof, nonce_r, seq = (req["lookup"], req["proof"], req["nonce"], req["seq"])
        member = req["member"]
        if payload or type(seq) is not int or not all(
                isinstance(x, bytes) and len(x) == n
                for x, n in ((lookup, 16), (proof, 32), (nonce_r, 16), (member, 32))):
            raise ValueError("malformed pull request")
        if not hmac.compare_digest(member, _proof(self.key, b"member", nonce_s, nonce_r)):
            # Not a session of this client: refused before it can look anything up or wait.
            self._refuse(conn, "not a session of the same program")
            return
        export, error = self._find(lookup, proof, nonce_s, nonce_r, seq)
        if export is None:
            self._refuse(conn, error)
            return
        fd_mode = not tcp and req.get("fd") is True and export.nbytes >= FD_MIN_BYTES
        how = "close"
        t0 = time.perf_counter()
        try:
            conn.settimeout(IO_TIMEOUT_S)
            head = {"ok": True, "proof": _proof(export.xid, b"serve", nonce_r, nonce_s),
                    "dtype": codec.DTYPE_CODE[export.dtype], "shape": export.shape,
                    "nbytes": export.nbytes, "mode": "fd" if fd_mode else "stream"}
            if fd_mode:
                self._serve_fd(conn, export, head)
            else:
                self._serve_stream(conn, export, head)
            how = "pool"  # the puller is done with the buffer: reuse it
            self._sent(export.nbytes, t0, "shared memory" if fd_mode else "the socket")
        finally:
            with self._cond:
                self._release(export, how)

    def _find(self, lookup: bytes, proof: bytes, nonce_s: bytes, nonce_r: bytes,
              seq: int) -> tuple[_Export | None, str]:
        """The export this puller may take (single use), waiting for the source's stream
        to reach it if need be; or why not."""
        while True:
            with self._cond:
                export = self._exports.get(lookup)
                if export is not None:
                    if not hmac.compare_digest(proof, _proof(export.xid, b"pull", nonce_s,
                                                             nonce_r)):
                        return None, "authentication failed"
                    del self._exports[lookup]
                    return export, ""
                if lookup in self._failed:
                    return None, self._failed[lookup]
                if self._closed:
                    return None, "the source vGPU's session ended before the copy"
                if seq <= self._done_seq:
                    return None, _UNKNOWN
                if lookup in self._waiters:
                    return None, "this transfer is already being received"
                w = _Waiter(seq, time.monotonic() + self.ttl_s)
                self._waiters[lookup] = w
            self._wait(lookup, w)
            if w.state != "ready":
                return None, w.error

    def _wait(self, lookup: bytes, w: _Waiter) -> None:
        if w.done.wait(max(0.0, w.deadline - time.monotonic())):
            return
        with self._cond:
            if w.state == "waiting":
                self._waiters.pop(lookup, None)
                self._answer(w, f"the source vGPU did not reach the copy within "
                                f"{self.ttl_s:.0f} s")

    def _ready_beyond(self, e: _Export, sent: int) -> int:
        """Bytes of ``e`` copied in, once more than ``sent`` are (the source is copying)."""
        deadline = time.monotonic() + IO_TIMEOUT_S
        with self._cond:
            while e.ready <= sent and not e.failed and not self._closed:
                if time.monotonic() > deadline:
                    raise TimeoutError("the source stopped filling its snapshot")
                self._cond.wait(1.0)
            if e.failed or e.ready <= sent:
                raise OSError("the source's snapshot failed or its session ended")
            return e.ready

    def _serve_stream(self, conn: socket.socket, e: _Export, head: dict) -> None:
        _send_msg(conn, head, e.nbytes)
        sent = 0
        while sent < e.nbytes:
            ready = self._ready_beyond(e, sent)
            conn.sendall(_bytes_at(e.buf.buf, sent, ready - sent))
            sent = ready

    def _serve_fd(self, conn: socket.socket, e: _Export, head: dict) -> None:
        _send_msg(conn, head, fd=e.buf.fd)
        sent = 0
        while sent < e.nbytes:
            sent = self._ready_beyond(e, sent)
            _send_msg(conn, {"ready": sent})
        reply, _ = _recv_msg(conn)  # the puller is done with our memory: we may reuse it
        if reply.get("done") is not True:
            raise ValueError("peer did not confirm the copy")

    @staticmethod
    def _refuse(conn: socket.socket, error: str) -> None:
        try:
            _send_msg(conn, {"ok": False, "error": error})
        except OSError:
            pass

    def _sent(self, nbytes: int, t0: float, how: str) -> None:
        with self._cond:
            self.counts["sent"] += 1
            self.counts["sent_bytes"] += nbytes
        if nbytes >= LOG_BYTES:
            log.info("session %s peer copy: sent %d bytes through %s in %.1f ms", self.tag,
                     nbytes, how, (time.perf_counter() - t0) * 1e3)

    def _forget_thread(self) -> None:
        with self._cond:
            self._threads.discard(threading.current_thread())


def _fill(buf: _Buffer, src: torch.Tensor, nbytes: int, publish: Any) -> None:
    """Copy ``src`` into the snapshot chunk by chunk, publishing each."""
    if nbytes == 0:
        return
    if src.device.type == "cpu" and not src.is_contiguous():
        src = src.contiguous()  # one temporary host copy; the bytes then go in order
    flat = host = None
    if src.device.type != "cpu":
        flat = src.reshape(-1).view(torch.uint8)
        host = torch.frombuffer(_bytes_at(buf.buf, 0, nbytes), dtype=torch.uint8)
    for off in range(0, nbytes, CHUNK):
        k = min(CHUNK, nbytes - off)
        if host is None:
            # A plain memcpy: torch's copy_ runs an OpenMP region whose threads wait for
            # a core on a loaded host.
            ctypes.memmove(buf.addr + off, src.data_ptr() + off, k)
        else:
            assert flat is not None
            host[off:off + k].copy_(flat[off:off + k])  # device to host, this chunk
        publish(off + k)


def _same_user(conn: socket.socket) -> bool:
    """Abstract Unix names are visible to every process of the network namespace: serve
    only processes of the server's own user (its workers)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    return struct.unpack("3i", creds)[1] == os.getuid()


# -- the destination side -------------------------------------------------------------------

def receive(ex: Executor, device: torch.device, cmd: list, tag: str,
            endpoint: PeerEndpoint | None) -> None:
    """PEER_RECV: pull a transfer from the source's endpoint into a new tensor."""
    if len(cmd) != 7:
        raise SessionError("ProtocolError", "peer receive needs 7 fields")
    _, handle, xid, seq, addr, dtype_code, shape = cmd
    if type(handle) is not int or handle <= 0:
        raise SessionError("ProtocolError", f"tensor handle {handle!r} is not a positive integer")
    _check_xid(xid, seq)
    if type(dtype_code) is not int:
        raise SessionError("ProtocolError", "peer receive needs a dtype code")
    dtype = codec.dtype_from_code(dtype_code)
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise SessionError("ValueError", f"invalid shape {shape!r:.80}")
    nbytes = math.prod(shape) * dtype.itemsize
    where, family, sockaddr = _parse_address(addr)
    if endpoint is None:
        raise SessionError("RuntimeError", "copies from other vGPUs are not available in this "
                           "session (no peer endpoint)")
    ex.check_alloc(nbytes)  # before the source sends a byte
    t0 = time.perf_counter()
    sock = _connect(where, family, sockaddr)
    pull = _Pull(sock, where, xid, dtype, shape, nbytes)
    try:
        t = pull.run(seq, device, endpoint.key)
    except (OSError, frames.FrameError) as exc:
        raise SessionError("RuntimeError", f"copy from another vGPU failed: the connection to "
                           f"{where} broke ({exc})") from None
    finally:
        sock.close()
    ex.store(handle, t)
    dt = time.perf_counter() - t0
    endpoint.counts["received"] += 1
    endpoint.counts["received_bytes"] += nbytes
    if nbytes >= LOG_BYTES:
        log.info("session %s peer copy: received %d bytes from %s through %s in %.1f ms "
                 "(%.0f MB/s)", tag, nbytes, where, pull.how, dt * 1e3,
                 nbytes / max(dt, 1e-9) / 1e6)


def offer(endpoint: PeerEndpoint | None, ex: Executor, cmd: list) -> None:
    """PEER_SEND, checked."""
    if len(cmd) != 4:
        raise SessionError("ProtocolError", "peer send needs 4 fields")
    _, handle, xid, seq = cmd
    _check_xid(xid, seq)
    if endpoint is None:
        raise SessionError("RuntimeError", "copies to other vGPUs are not available in this "
                           "session (no peer endpoint)")
    endpoint.offer(ex, handle, xid, seq)


def _check_xid(xid: Any, seq: Any) -> None:
    if not isinstance(xid, bytes) or len(xid) != ID_BYTES:
        raise SessionError("ProtocolError", f"a transfer id is {ID_BYTES} bytes")
    if type(seq) is not int or not 0 < seq < 2**63:
        raise SessionError("ProtocolError", "a transfer sequence number is a positive integer")


def _parse_address(addr: Any) -> tuple[str, int, Any]:
    """Only our own endpoints: abstract names of the peer pattern (never a socket file
    such as a daemon's), or a TCP host and port."""
    if isinstance(addr, list) and len(addr) == 2 and addr[0] == "unix" \
            and isinstance(addr[1], str) and _UNIX_NAME.match(addr[1]):
        return f"unix:@{addr[1]}", socket.AF_UNIX, "\0" + addr[1]
    if isinstance(addr, list) and len(addr) == 3 and addr[0] == "tcp" \
            and isinstance(addr[1], str) and 0 < len(addr[1]) <= 255 \
            and type(addr[2]) is int and 0 < addr[2] < 65536:
        host = addr[1].strip("[]")
        return _host_port(host, addr[2]), 0, (host, addr[2])
    raise SessionError("ProtocolError", f"peer address {addr!r:.100} is not a peer endpoint "
                       "(['unix', 'orion-peer-<32 hex>'] or ['tcp', host, port])")


def _connect(where: str, family: int, sockaddr: Any) -> socket.socket:
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(HANDSHAKE_S)
                sock.connect(sockaddr)
            except OSError:
                sock.close()
                raise
            _tune(sock, tcp=False)
        else:
            sock = socket.create_connection(sockaddr, timeout=HANDSHAKE_S)
            _tune(sock, tcp=True)
        return sock
    except OSError as exc:
        raise SessionError("RuntimeError", f"copy from another vGPU failed: cannot reach its "
                           f"server at {where} ({exc.strerror or exc})") from None


class _Pull:
    """The destination's side of one transfer."""

    def __init__(self, sock: socket.socket, where: str, xid: bytes, dtype: torch.dtype,
                 shape: list[int], nbytes: int) -> None:
        self.sock, self.where, self.xid = sock, where, xid
        self.dtype, self.shape, self.nbytes = dtype, shape, nbytes
        self.how = "the socket"

    def _error(self, what: str) -> SessionError:
        return SessionError("RuntimeError", f"copy from another vGPU failed: {self.where}"
                            f"{what}")

    def run(self, seq: int, device: torch.device, key: bytes) -> torch.Tensor:
        nonce_s = self._banner()
        nonce_r = secrets.token_bytes(16)
        unix = self.sock.family == socket.AF_UNIX
        _send_msg(self.sock, {"lookup": lookup_key(self.xid), "nonce": nonce_r, "seq": seq,
                              "proof": _proof(self.xid, b"pull", nonce_s, nonce_r),
                              "member": _proof(key, b"member", nonce_s, nonce_r), "fd": unix})
        _await(self.sock, ttl_s() + HANDSHAKE_S)  # the source may be busy before its send
        self.sock.settimeout(IO_TIMEOUT_S)
        fds: list[int] = []
        try:
            try:
                reply, payload = _recv_msg(self.sock, fds if unix else None)
            except (ValueError, msgpack.UnpackException):
                raise self._error(" is not an Orion peer endpoint") from None
            self._check_reply(reply, payload, nonce_s, nonce_r)
            t = _fresh(self.shape, self.dtype, device)
            if reply.get("mode") == "fd":
                if len(fds) != 1:
                    raise self._error(" sent no shared memory")
                self._copy_shared(fds[0], t)
                self.how = "shared memory"
            elif payload == self.nbytes and not fds:
                _recv_payload(self.sock, t, self.nbytes)
            else:
                raise self._error(" sent a malformed answer")
            return t
        finally:
            for fd in fds:
                os.close(fd)

    def _banner(self) -> bytes:
        not_peer = self._error(" is not an Orion peer endpoint")
        try:
            banner, payload = _recv_msg(self.sock)
        except frames.PeerClosed:
            raise self._error(" closed the connection before greeting (see the source "
                              "server's log)") from None
        except TimeoutError:
            raise self._error(f" did not greet within {HANDSHAKE_S:.0f} s") from None
        except (frames.FrameError, ValueError, msgpack.UnpackException):
            raise not_peer from None
        nonce_s = banner.get("nonce")
        if banner.get("kind") != KIND or banner.get("v") != VERSION or payload \
                or not isinstance(nonce_s, bytes) or len(nonce_s) != 16:
            raise not_peer
        return nonce_s

    def _check_reply(self, reply: dict, payload: int, nonce_s: bytes, nonce_r: bytes) -> None:
        if reply.get("ok") is not True:
            raise self._error(f": {str(reply.get('error'))[:300]}")
        proof = reply.get("proof")
        if not isinstance(proof, bytes) or not hmac.compare_digest(
                proof, _proof(self.xid, b"serve", nonce_r, nonce_s)):
            raise self._error(" could not prove it holds the transfer")
        got = (reply.get("dtype"), reply.get("shape"), reply.get("nbytes"))
        if got != (codec.DTYPE_CODE[self.dtype], self.shape, self.nbytes):
            raise self._error(f" sent {got!r:.100}, expected {self.dtype} {self.shape}")

    def _copy_shared(self, fd: int, t: torch.Tensor) -> None:
        """Map the source's snapshot and copy it out as the source publishes it."""
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        # A sealed size: the mapping can never fault on a file truncated under it.
        if not stat.S_ISREG(st.st_mode) or st.st_size < self.nbytes or seals & _SEALS != _SEALS:
            raise self._error(" sent shared memory that is not a sealed snapshot")
        # Populated at once (one call, not a fault per page); shared, so a page mapped
        # before the source wrote it is the page the source then writes.
        mm = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        try:
            src = (ctypes.c_char * self.nbytes).from_buffer(mm)
            try:
                self._copy_out(_address_of(src), src, t)
            finally:
                del src
        finally:
            mm.close()
        _send_msg(self.sock, {"done": True})

    def _copy_out(self, addr: int, src: Any, t: torch.Tensor) -> None:
        flat = t.reshape(-1).view(torch.uint8) if self.nbytes else t
        done = 0
        while done < self.nbytes:
            msg, payload = _recv_msg(self.sock)
            ready = msg.get("ready")
            if payload or type(ready) is not int or not done < ready <= self.nbytes:
                raise self._error(" sent a malformed progress message")
            if t.device.type == "cpu":
                ctypes.memmove(t.data_ptr() + done, addr + done, ready - done)
            else:
                chunk = torch.frombuffer(_bytes_at(src, done, ready - done), dtype=torch.uint8)
                flat[done:ready].copy_(chunk)
            done = ready


def _recv_payload(sock: socket.socket, t: torch.Tensor, n: int) -> None:
    if n == 0:
        return
    if t.device.type == "cpu":
        # Not through Tensor.numpy(): a numpy view would leave the new tensor's storage
        # non-resizable for good (an out= op could no longer grow it).
        frames.recv_exact_into(
            sock, memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B"))
        return
    flat = t.reshape(-1).view(torch.uint8)
    staging = torch.empty(min(n, CHUNK), dtype=torch.uint8)
    view = memoryview((ctypes.c_char * staging.numel()).from_address(staging.data_ptr()))
    for off in range(0, n, CHUNK):
        k = min(CHUNK, n - off)
        frames.recv_exact_into(sock, view.cast("B")[:k])
        flat[off:off + k].copy_(staging[:k])


def _fresh(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu":
        prefer_huge_pages(t)  # about to be filled whole: fault it in 2 MiB at a time
    return t


def _await(sock: socket.socket, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(int(timeout_s * 1000)):
        raise SessionError("RuntimeError", "copy from another vGPU failed: the source did not "
                           f"answer within {timeout_s:.0f} s")


def open_endpoint(spec: dict, ledger: MemoryLedger) -> PeerEndpoint | None:
    """The session's peer endpoint, or None (then the client copies through itself)."""
    tag = str(spec.get("session_id", "?"))[:8]
    key = (spec.get("hello") or {}).get("peer_key")
    if not isinstance(key, bytes) or len(key) != ID_BYTES:
        return None  # a client that cannot do peer copies
    endpoint = PeerEndpoint(tag, ledger, key)
    try:
        endpoint.start(spec.get("bind_addr"))
    except OSError as exc:
        log.info("session %s peer copies unavailable: %s", tag, exc)
        endpoint.close()
        return None
    return endpoint
