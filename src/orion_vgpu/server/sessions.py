"""Session listener of ``oriond``: accept clients, check their hello, start their sessions.

The daemon owns one ``SessionManager``. It listens on TCP and (optionally) a Unix socket;
each connection gets its own handshake thread, so a slow or hostile client never blocks
the listener. An accepted connection is handed, fd and all, to a warm worker process
(``workerpool``) that runs the session; the manager then only follows the worker's
control messages for stats and the session's end. See docs/data-plane.md.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from orion_vgpu.protocol.frames import HEADER
from orion_vgpu.protocol.grant import grant_key
from orion_vgpu.server import handshake
from orion_vgpu.server.handshake import Accepted, Refused
from orion_vgpu.server.workerpool import WorkerPool, WorkerUnavailable

if TYPE_CHECKING:
    from orion_vgpu.config import ServerConfig
    from orion_vgpu.server.devices import Device

log = logging.getLogger("orion.server")

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Connections still in their handshake; more than this at once is a flood, not clients.
MAX_PENDING_HANDSHAKES = 64
# A client cut off by the network never sends FIN or RST: without probes its worker would
# wait for it forever, holding the session, its memory and its grant. Same settings as the
# client's side (client/transport.py), so both ends give up on a dead link alike.
KEEPALIVE_IDLE_S = int(os.environ.get("ORION_KEEPALIVE_S", "10"))
# A session told to end (its allocation is over) that has not ended by then is killed.
END_GRACE_S = 10.0
# busy_pct is averaged over the worker's last few stats messages (about one a second).
_BUSY_SAMPLES = 6


@dataclass
class Session:
    session_id: str
    allocation_id: str
    vgpu_index: int
    device_uuid: str
    worker_pid: int = 0
    mem_used_bytes: int = 0
    ops: int = 0
    revoked: bool = False   # told to end (end_sessions)
    # (monotonic time, cumulative busy seconds) as reported by the worker.
    busy_samples: deque[tuple[float, float]] = field(
        default_factory=lambda: deque([(time.monotonic(), 0.0)], maxlen=_BUSY_SAMPLES))

    def busy_pct(self) -> float:
        (t0, b0), (t1, b1) = self.busy_samples[0], self.busy_samples[-1]
        if t1 <= t0:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * (b1 - b0) / (t1 - t0))), 1)


class SessionManager:
    """Listens for clients and runs each accepted session in its own worker process."""

    def __init__(self, *, devices: list[Device], server_cfg: ServerConfig, pool_token: str,
                 session_log_dir: Path, on_event: Callable[[dict], None],
                 warm_workers: int = 2, hello_timeout_s: float = 10.0,
                 stop_grace_s: float = 3.0) -> None:
        self._devices = {d.index: d for d in devices}
        self._cfg = server_cfg
        self._key = grant_key(pool_token)   # the token itself is not kept
        self._log_dir = Path(session_log_dir)
        self._on_event = on_event
        self._hello_timeout_s = hello_timeout_s
        self._stop_grace_s = stop_grace_s
        self._server_torch = _torch_version()
        self._lock = threading.Lock()
        self._node_id: str | None = None
        self._sessions: dict[str, Session] = {}
        self._used: set[tuple[str, int]] = set()   # (alloc, vgpu) ever accepted: no replays
        self._listeners: list[tuple[socket.socket, str]] = []
        self._threads: list[threading.Thread] = []
        self._pending: dict[socket.socket, threading.Thread] = {}   # in their handshake
        self._started = False
        self._stopping = False
        self._unix_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None   # as bound (port 0 → real port)
        self._pool = WorkerPool(warm=warm_workers, on_message=self._on_worker_message,
                                on_exit=self._on_worker_exit)

    # -- daemon-facing API -------------------------------------------------------------

    def start(self) -> None:
        """Bind the listeners (OSError with a clear message), start workers and accepting."""
        if self._started:
            raise RuntimeError("SessionManager.start() called twice")
        self._started = True
        self._log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._bind_all()
        except OSError:
            self._close_listeners()
            raise
        self._pool.start()
        for listener, kind in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(listener, kind),
                                 name=f"orion-accept-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("accepting sessions on %s%s (worker module %s)", self.tcp_address,
                 f" and unix:{self._unix_path}" if self._unix_path else "", self._pool.module)

    def set_node_id(self, node_id: str) -> None:
        with self._lock:
            self._node_id = node_id

    def stats(self) -> dict:
        with self._lock:   # one consistent snapshot of (session, memory, busy %)
            rows = [(s, s.mem_used_bytes, s.busy_pct()) for s in self._sessions.values()]
        gpus = []
        for dev in self._devices.values():
            mine = [(mem, pct) for s, mem, pct in rows if s.device_uuid == dev.uuid]
            gpus.append({"uuid": dev.uuid, "mem_used_bytes": sum(m for m, _ in mine),
                         "busy_pct": round(min(100.0, sum(p for _, p in mine)), 1)})
        return {"sessions": [{"allocation_id": s.allocation_id, "vgpu_index": s.vgpu_index,
                              "mem_used_bytes": mem, "busy_pct": pct} for s, mem, pct in rows],
                "gpus": gpus}

    def end_sessions(self, ended: list[dict[str, Any]]) -> None:
        """End the sessions of allocations the controller says are over (its vGPU may be
        someone else's now): the worker tells its client why at its next command and
        exits; one that does not within END_GRACE_S (stuck in a long op) is killed."""
        for item in ended:
            key = (item.get("allocation_id"), item.get("vgpu_index"))
            reason = str(item.get("reason") or "allocation ended")
            with self._lock:
                mine = [s for s in self._sessions.values()
                        if (s.allocation_id, s.vgpu_index) == key and not s.revoked]
                for s in mine:
                    s.revoked = True
            for s in mine:
                log.warning("session %s (alloc %s vgpu %d): ending it: %s", s.session_id,
                            s.allocation_id, s.vgpu_index, reason)
                self._pool.end_session(s, reason, END_GRACE_S)

    def stop(self) -> None:
        """Close the listeners and end every session; returns when all workers are reaped."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._close_listeners()
        for t in self._threads:
            t.join(2.0)
        self._end_handshakes()
        self._pool.stop(self._stop_grace_s)
        if self._unix_path is not None:
            _unlink_socket(self._unix_path)
        log.info("session listener stopped")

    # -- listening ---------------------------------------------------------------------

    def _bind_all(self) -> None:
        # bind_addr is None only for an unresolved bind_net; the daemon resolves it first,
        # and falls back to loopback like this in its own checks.
        tcp = _listen_tcp(self._cfg.bind_addr or "127.0.0.1", int(self._cfg.listen_port))
        self._listeners.append((tcp, "tcp"))
        self.tcp_address = tcp.getsockname()[:2]
        if self._cfg.unix_socket:
            path = Path(self._cfg.unix_socket)
            self._listeners.append((_listen_unix(path), "unix"))
            self._unix_path = path

    def _close_listeners(self) -> None:
        for listener, _ in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()

    def _accept_loop(self, listener: socket.socket, kind: str) -> None:
        while not self._stopping:
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                # Out of fds or memory: wait a moment instead of spinning on the error.
                log.error("accepting a %s connection failed: %s", kind, exc)
                time.sleep(0.1)
                continue
            self._start_handshake(conn, _peer_name(peer, kind), kind)

    def _start_handshake(self, conn: socket.socket, peer: str, kind: str) -> None:
        thread = threading.Thread(target=self._handshake, args=(conn, peer, kind),
                                  name="orion-handshake", daemon=True)
        with self._lock:
            full = len(self._pending) >= MAX_PENDING_HANDSHAKES
            if not full:
                self._pending[conn] = thread
        if full:
            log.warning("handshake refused from %s: too many pending handshakes", peer)
            conn.close()
            return
        try:
            thread.start()
        except RuntimeError:   # cannot start a thread: shed this connection
            with self._lock:
                self._pending.pop(conn, None)
            conn.close()

    def _end_handshakes(self) -> None:
        """Cut short handshakes still in progress, so stop() need not wait for hellos."""
        with self._lock:
            pending = dict(self._pending)
        for conn in pending:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in pending.values():
            thread.join(2.0)

    # -- handshake and hand-off --------------------------------------------------------

    def _handshake(self, conn: socket.socket, peer: str, kind: str) -> None:
        try:
            self._handle(conn, peer, kind)
        finally:
            with self._lock:
                self._pending.pop(conn, None)

    def _handle(self, conn: socket.socket, peer: str, kind: str) -> None:
        try:
            accepted = self._admit(conn, kind)
        except Refused as exc:
            self._refuse(conn, peer, exc)
            return
        except Exception:
            log.exception("handshake from %s failed", peer)
            conn.close()
            return
        try:
            self._open_session(conn, accepted, peer)
        except Exception as exc:   # a bug here must not leave the client hanging
            log.exception("opening the session for allocation %s failed",
                          accepted.allocation_id)
            self._release_grant(accepted)
            self._refuse(conn, peer, Refused(f"server error: {exc}", accepted.allocation_id,
                                             accepted.vgpu_index))

    def _admit(self, conn: socket.socket, kind: str) -> Accepted:
        if kind == "tcp":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(conn)
        hello = handshake.read_hello(conn, self._hello_timeout_s)
        with self._lock:
            node_id = self._node_id
        accepted = handshake.evaluate(
            hello, key=self._key, node_id=node_id, server_torch=self._server_torch,
            device_uuids={i: d.uuid for i, d in self._devices.items()})
        grant_id = (accepted.allocation_id, accepted.vgpu_index)
        with self._lock:
            if self._stopping:
                raise Refused("server is stopping")
            if grant_id in self._used:
                raise Refused(f"grant already used: allocation {accepted.allocation_id} "
                              f"vGPU {accepted.vgpu_index} already had a session here",
                              accepted.allocation_id, accepted.vgpu_index)
            self._used.add(grant_id)
        return accepted

    def _refuse(self, conn: socket.socket, peer: str, exc: Refused) -> None:
        log.info("handshake refused from %s (alloc %s vgpu %s): %s", peer,
                 exc.allocation_id or "-", "-" if exc.vgpu_index is None else exc.vgpu_index,
                 exc.reason)
        handshake.send_refusal(conn, exc.reason)

    def _open_session(self, conn: socket.socket, acc: Accepted, peer: str) -> None:
        device = self._devices[acc.gpu_index]
        session = Session(session_id=uuid.uuid4().hex, allocation_id=acc.allocation_id,
                          vgpu_index=acc.vgpu_index, device_uuid=device.uuid)
        client = acc.hello.get("client") or {}
        # %r: user and host are the client's words; no newlines into our log.
        log.info("handshake accepted from %s (alloc %s vgpu %d): gpu %d, client %r@%r pid %r",
                 peer, acc.allocation_id, acc.vgpu_index, device.index, client.get("user"),
                 client.get("host"), client.get("pid"))
        body = msgpack.packb(self._session_spec(session, acc, device))
        conn.setblocking(True)   # the fd's O_NONBLOCK flag would carry over to the worker
        try:
            worker = self._pool.hand_off(conn, HEADER.pack(len(body), 0) + body, session)
        except WorkerUnavailable as exc:
            self._release_grant(acc)
            self._refuse(conn, peer, Refused(str(exc), acc.allocation_id, acc.vgpu_index))
            return
        conn.close()   # the worker has its own copy now
        session.worker_pid = worker.pid
        with self._lock:
            self._sessions[session.session_id] = session
        log.info("session started (alloc %s vgpu %d): session %s, worker pid %d",
                 session.allocation_id, session.vgpu_index, session.session_id, worker.pid)
        self._emit("session_started", session, "")
        self._pool.activate(worker)   # may report the end right away if it already died

    def _release_grant(self, acc: Accepted) -> None:
        # No session happened: the client may retry with the same grant.
        with self._lock:
            self._used.discard((acc.allocation_id, acc.vgpu_index))

    def _session_spec(self, s: Session, acc: Accepted, device: Device) -> dict[str, Any]:
        cfg = self._cfg
        # config.ServerConfig nests the [throttle] keys under .throttle.
        throttle = getattr(cfg, "throttle", cfg)
        log_name = f"{s.allocation_id}-{s.vgpu_index}-{s.session_id[:8]}.log"
        return {
            "session_id": s.session_id, "allocation_id": s.allocation_id,
            "vgpu_index": s.vgpu_index, "device": device.torch_device,
            "device_index": device.index, "device_name": device.name,
            "device_uuid": device.uuid, "emulated": bool(device.emulated),
            "gmem_bytes": int(acc.claims["gmem_mib"] * 2**20), "ratio": acc.claims["ratio"],
            "log_file": str(self._log_dir / _safe_name(log_name)),
            "hello": acc.hello, "enable_shm": bool(cfg.enable_shm),
            "throttle_level": int(throttle.throttle_level),
            "enable_computation_throttle": bool(throttle.enable_computation_throttle),
            # Where the worker listens for sibling vGPUs' copies from other nodes (peer.py).
            "bind_addr": cfg.bind_addr or "127.0.0.1",
        }

    # -- worker reports ----------------------------------------------------------------

    def _on_worker_message(self, session: Session, msg: dict[str, Any]) -> None:
        if msg.get("type") != "stats":
            log.debug("ignoring control message %r from session %s", msg.get("type"),
                      session.session_id)
            return
        mem, busy, ops = msg.get("mem_used_bytes"), msg.get("busy_s"), msg.get("ops")
        with self._lock:
            if isinstance(mem, int) and mem >= 0:
                session.mem_used_bytes = mem
            if isinstance(ops, int):
                session.ops = ops
            if isinstance(busy, (int, float)) and busy >= 0:
                session.busy_samples.append((time.monotonic(), float(busy)))

    def _on_worker_exit(self, session: Session, end_reason: str | None, exit_desc: str) -> None:
        if end_reason:
            reason = end_reason
        elif self._stopping:
            reason = f"server stopped ({exit_desc})"
        else:
            reason = exit_desc
        with self._lock:
            self._sessions.pop(session.session_id, None)
        log.info("session ended (alloc %s vgpu %d): session %s: %s", session.allocation_id,
                 session.vgpu_index, session.session_id, reason)
        self._emit("session_ended", session, reason)

    def _emit(self, kind: str, session: Session, reason: str) -> None:
        event = {"type": kind, "allocation_id": session.allocation_id,
                 "vgpu_index": session.vgpu_index, "reason": reason}
        try:
            self._on_event(event)
        except Exception:
            log.exception("session event handler failed for %s", kind)


def _torch_version() -> str:
    """The torch the workers run, without importing it into oriond (150 MiB it never uses)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # a source build without package metadata
        import torch

        return str(torch.__version__)


# -- sockets ---------------------------------------------------------------------------


def _set_buffers(sock: socket.socket) -> None:
    # Set on the listener so accepted sockets inherit them (the TCP window scale is fixed
    # at connection setup, so setting them later would be too late).
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


def _keepalive(conn: socket.socket) -> None:
    """Probe an idle link; give up on one that stays silent (the worker sees ETIMEDOUT).

    The options belong to the connection, so they hold in the worker the fd is passed to.
    ``TCP_USER_TIMEOUT`` also bounds a reply stuck unacknowledged on a dead link."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 2),
                       ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", (KEEPALIVE_IDLE_S + 6) * 1000)):
        if hasattr(socket, opt):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _listen_tcp(addr: str, port: int) -> socket.socket:
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _set_buffers(sock)
        sock.bind(sockaddr)
        sock.listen(128)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise OSError(exc.errno, f"cannot listen for sessions on {addr}:{port}: "
                                 f"{exc.strerror or exc}") from exc


def _listen_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        _set_buffers(sock)
        sock.bind(str(path))
        # Any local user may connect: the grant, not the file mode, is the credential.
        os.chmod(path, 0o666)
        sock.listen(128)
        return sock
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen for sessions on unix socket {path}: "
                                 f"{exc.strerror or exc}") from exc


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)   # nobody listening: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is already listening there")


def _unlink_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except OSError:
        pass


def _peer_name(peer: Any, kind: str) -> str:
    if kind == "tcp" and isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix socket"


def _safe_name(name: str) -> str:
    # The allocation id comes from a signed grant, but a file name is still no place
    # for path separators.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
