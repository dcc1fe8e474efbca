"""The server side of the data-plane handshake: read a client's hello and decide on it.

Everything here is about untrusted input: the hello is size-limited, time-limited, parsed
as plain msgpack (no pickle, no ext hooks) and checked field by field before anything
else looks at it. The checks are pure functions so they can be tested without sockets.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.protocol import frames
from orion_vgpu.protocol.grant import GrantError, verify_grant
from orion_vgpu.protocol.messages import HELLO, REFUSED

MAX_HELLO_BYTES = 64 * 1024
# How long a refused client gets to read our refusal before we drop the connection.
_REFUSAL_LINGER_S = 1.0


class Refused(Exception):
    """The hello is refused; ``reason`` (also ``str(exc)``) is sent to the client.

    ``allocation_id``/``vgpu_index`` are set once the grant is verified, for the log.
    """

    def __init__(self, reason: str, allocation_id: str | None = None,
                 vgpu_index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.allocation_id = allocation_id
        self.vgpu_index = vgpu_index


@dataclass(frozen=True)
class Accepted:
    """A hello that passed every check."""

    hello: dict[str, Any]      # the client's hello without the grant
    claims: dict[str, Any]     # verified grant claims
    allocation_id: str
    vgpu_index: int
    gpu_index: int


def read_hello(conn: socket.socket, timeout_s: float) -> dict[str, Any]:
    """Read the client's first frame within ``timeout_s`` in total; raise Refused if bad."""
    deadline = _Deadline(conn, timeout_s)
    conn.settimeout(timeout_s)
    try:
        body, payload_len = frames.recv_frame(conn, max_body=MAX_HELLO_BYTES)
    except (TimeoutError, frames.PeerClosed) as exc:
        if deadline.finish() or isinstance(exc, TimeoutError):
            raise Refused(f"no hello within {timeout_s:g} s") from None
        raise Refused("connection closed before the hello was complete") from None
    except frames.FrameError as exc:
        deadline.finish()
        raise Refused(f"hello rejected: {exc}") from None
    if deadline.finish():
        raise Refused(f"no hello within {timeout_s:g} s")
    if payload_len:
        raise Refused("hello rejected: a hello carries no payload")
    return parse_hello(bytes(body))


class _Deadline:
    """Ends a hello read after ``timeout_s`` in total.

    A per-recv timeout alone would let a client dribble a byte every few seconds and hold
    a handshake slot forever. At the deadline SHUT_RD makes the blocked recv return EOF
    while our side can still send the refusal.
    """

    def __init__(self, conn: socket.socket, timeout_s: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._done = False
        self._expired = False
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
        try:
            self._conn.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def finish(self) -> bool:
        """Stop the timer; return whether it already fired (the socket is then half shut)."""
        with self._lock:
            self._done = True
            self._timer.cancel()
            return self._expired


def parse_hello(body: bytes) -> dict[str, Any]:
    """Decode a hello body into a map with the right kind; raise Refused otherwise."""
    try:
        hello = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # any decode failure of untrusted bytes is just "not a hello"
        raise Refused("hello rejected: not a msgpack map") from None
    if not isinstance(hello, dict) or hello.get("kind") != HELLO:
        raise Refused(f"hello rejected: first frame must be a map with kind {HELLO!r}")
    return hello


def _typed(value: Any, kinds: type | tuple[type, ...]) -> bool:
    # bool is an int subclass, but True is never a valid protocol number or index.
    return isinstance(value, kinds) and not isinstance(value, bool)


def _field(hello: Mapping[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = hello.get(name)
    if not _typed(value, kinds):
        raise Refused(f"malformed hello: field {name!r} is missing or has the wrong type")
    return value


def torch_major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+", 1)[0].split(".")[:2])


def check_versions(hello: Mapping[str, Any], server_torch: str) -> None:
    """Protocol first (a future hello may look different), then the torch version."""
    protocol = _field(hello, "protocol", int)
    client_version = hello.get("version")
    client_version = _clean(client_version) if isinstance(client_version, str) else "unknown"
    if protocol != PROTOCOL_VERSION:
        raise Refused(
            f"client protocol {protocol} does not match server protocol {PROTOCOL_VERSION}: "
            f"install the same orion-vgpu version (server {__version__}, "
            f"client {client_version}) on both")
    client_torch = _clean(_field(hello, "torch", str))
    _field(hello, "version", str)
    if torch_major_minor(client_torch) != torch_major_minor(server_torch):
        raise Refused(
            f"client torch {client_torch} does not match server torch {server_torch}: "
            "install the same torch major.minor version on both")


def _clean(text: str) -> str:
    """A client-supplied version string, safe to echo in a reason and to log."""
    return "".join(c for c in text[:64] if c.isprintable()) or "?"


def check_shape(hello: Mapping[str, Any]) -> None:
    _field(hello, "grant", str)
    _field(hello, "client", dict)
    shm = hello.get("shm")
    if shm is not None and not isinstance(shm, dict):
        raise Refused("malformed hello: field 'shm' must be a map or nil")


_CLAIM_TYPES: dict[str, type | tuple[type, ...]] = {
    "alloc": str, "vgpu": int, "node": str, "gpu_index": int,
    "gmem_mib": (int, float), "ratio": (int, float),
}


def check_grant(grant: str, key: bytes, node_id: str | None,
                device_uuids: Mapping[int, str]) -> dict[str, Any]:
    """Verify the grant and that it is meant for this node and one of its GPUs."""
    try:
        claims = verify_grant(key, grant)
    except GrantError as exc:
        raise Refused(str(exc)) from None
    for name, kind in _CLAIM_TYPES.items():
        if not _typed(claims.get(name), kind):
            raise Refused(f"malformed grant claims: {name!r}")
    try:
        _check_placement(claims, node_id, device_uuids)
    except Refused as exc:
        exc.allocation_id, exc.vgpu_index = claims["alloc"], claims["vgpu"]
        raise
    return claims


def _check_placement(claims: Mapping[str, Any], node_id: str | None,
                     device_uuids: Mapping[int, str]) -> None:
    if node_id is None:
        raise Refused("server is not registered with a controller yet; retry shortly")
    if claims["node"] != node_id:
        raise Refused("grant is for another node")
    gpu_index = claims["gpu_index"]
    if gpu_index not in device_uuids:
        raise Refused(f"grant names GPU index {gpu_index}, which this server does not have")
    uuid = claims.get("gpu")
    if isinstance(uuid, str) and uuid != device_uuids[gpu_index]:
        # The node's GPUs changed since the controller last saw them (e.g. re-enumerated
        # after a reboot): running on a different card than granted would be wrong.
        raise Refused(f"grant names GPU {uuid} but GPU index {gpu_index} here is "
                      f"{device_uuids[gpu_index]}")
    if claims["gmem_mib"] <= 0 or not 0 < claims["ratio"] <= 100:
        raise Refused("malformed grant claims: gmem_mib or ratio out of range")


def evaluate(hello: dict[str, Any], *, key: bytes, node_id: str | None,
             device_uuids: Mapping[int, str], server_torch: str) -> Accepted:
    """Run every check in order; return the accepted hello or raise Refused."""
    check_versions(hello, server_torch)
    check_shape(hello)
    claims = check_grant(hello["grant"], key, node_id, device_uuids)
    clean = {k: v for k, v in hello.items() if k != "grant"}
    return Accepted(hello=clean, claims=claims, allocation_id=claims["alloc"],
                    vgpu_index=claims["vgpu"], gpu_index=claims["gpu_index"])


def send_refusal(conn: socket.socket, reason: str) -> None:
    """Best-effort: tell the client why, then close without resetting the connection."""
    try:
        conn.settimeout(_REFUSAL_LINGER_S)
        frames.send_frame(conn, msgpack.packb({"kind": REFUSED, "reason": reason}))
        conn.shutdown(socket.SHUT_WR)
        _drain(conn)
    except OSError:
        pass
    finally:
        conn.close()


def _drain(conn: socket.socket, limit: int = 1 << 20) -> None:
    """Read what the client still sends so close() does not turn into a RST that could
    destroy our refusal frame before the client has read it."""
    got = 0
    while got < limit:
        chunk = conn.recv(65536)
        if not chunk:
            return
        got += len(chunk)
