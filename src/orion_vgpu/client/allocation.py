"""Asking the controller for vGPUs and giving them back (plain http.client: fast start-up)."""

from __future__ import annotations

import getpass
import http.client
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any


class ControllerError(Exception):
    """The controller is unreachable or refused; the message says what to do."""


@dataclass
class Request:
    vgpu: int
    gmem_mib: int | None = None
    ratio: int | None = None
    cross_node: bool = False
    wait_s: float = 0.0


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ControllerError(f"controller address {addr!r} is not HOST:PORT; set ORION_CONTROLLER "
                              "or [controller] controller_addr")
    return host.strip("[]"), int(port)


def _call(addr: str, method: str, path: str, body: dict | None, token: str | None,
          timeout: float) -> tuple[int, Any]:
    host, port = _split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ControllerError(f"cannot reach the Orion Controller at {addr} ({exc}); check "
                              "ORION_CONTROLLER / controller_addr and that the controller runs "
                              "(orion check runtime client)") from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data) if data else {}
    except json.JSONDecodeError:
        raise ControllerError(f"{addr} answered with something that is not the Orion Controller "
                              f"API (HTTP {resp.status})") from None


def allocate(addr: str, req: Request, token: str | None = None) -> dict:
    body = {"vgpu": req.vgpu, "gmem_mib": req.gmem_mib, "ratio": req.ratio,
            "cross_node": req.cross_node, "wait_s": req.wait_s,
            "user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(sys.argv)[:1000] or sys.executable}
    status, data = _call(addr, "POST", "/api/v1/allocations", body, token,
                         timeout=10.0 + req.wait_s)
    if status in (200, 201):
        return data
    detail = data.get("detail") if isinstance(data, dict) else None
    if status == 409:
        raise ControllerError(f"the GPU pool cannot grant {req.vgpu} vGPU now: {detail}. Wait for "
                              "vGPUs to free up, or ask for less (ORION_VGPU / ORION_GMEM)")
    if status in (401, 403):
        raise ControllerError(f"the controller refused the request ({detail}); set ORION_TOKEN "
                              "to a valid token")
    raise ControllerError(f"the controller refused the allocation (HTTP {status}): {detail}")


def release(addr: str, alloc_id: str, token: str | None = None) -> None:
    _call(addr, "DELETE", f"/api/v1/allocations/{alloc_id}", None, token, timeout=5.0)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
