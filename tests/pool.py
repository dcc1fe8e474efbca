"""Real-process helpers for tests: start a controller, register nodes over its HTTP API.

Everything here talks to real subprocesses over real sockets; nothing is mocked. Each
process is killed when its context ends, so a failing test never leaks one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API = "/api/v1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``url`` until it answers (any status) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.05)


@dataclass
class ControllerProc:
    """A ``python -m orion_vgpu.controller`` subprocess on a free loopback port."""

    data_dir: Path
    opts: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (API under ``/api/v1``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + API

    @property
    def addr(self) -> str:
        """``host:port`` as ORION_CONTROLLER / controller_addr expect it."""
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        given = self.opts.get("pool_token")
        return str(given) if given else (self.data_dir / "pool_token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> ControllerProc:
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "orion_vgpu.controller", "--listen", self.addr,
               "--data-dir", str(self.data_dir)]  # fmt: skip
        # The controller requires user tokens by default; these tests speak for clients
        # without one unless they ask for auth="required".
        for key, value in {"auth": "open", **self.opts}.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = self.data_dir / "controller.stderr"
        # The token comes from opts or the data dir, never from the caller's environment.
        env = {k: v for k, v in os.environ.items() if k != "ORION_POOL_TOKEN"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_http(self.api + "/info", timeout=15, proc=self.proc)
        except Exception:
            self.kill()
            raise RuntimeError(f"controller did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process group: a crash, no chance to clean up."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def restart(self, kill: bool = True) -> ControllerProc:
        """Kill (or stop) and start again on the same port and data dir."""
        self.kill() if kill else self.stop()
        return self.start()

    # ----- HTTP conveniences ---------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.api + path, timeout=10, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return httpx.post(self.api + path, json=json, timeout=30, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.delete(self.api + path, timeout=10, **kw)

    def register_node(
        self,
        name: str,
        gpus: int = 2,
        memory_mib: int = 16384,
        vgpu_count: int = 4,
        addr: str | None = None,
    ) -> str:
        """Register a node with emulated GPUs over the real server API; return node_id."""
        body = node_body(name, gpus, memory_mib, vgpu_count, addr)
        r = self.post("/nodes/register", body, headers=self.auth)
        r.raise_for_status()
        return str(r.json()["node_id"])

    def heartbeat(
        self, node_id: str, sessions: list[dict[str, Any]] | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"gpus": []}
        if sessions is not None:
            body["sessions"] = sessions
        return self.post(f"/nodes/{node_id}/heartbeat", body, headers=self.auth)

    def event(
        self, node_id: str, type_: str, alloc_id: str, vgpu: int = 0, reason: str | None = None
    ) -> httpx.Response:
        body = {"type": type_, "allocation_id": alloc_id, "vgpu_index": vgpu, "reason": reason}
        return self.post(f"/nodes/{node_id}/events", body, headers=self.auth)

    def allocate(self, **req: Any) -> httpx.Response:
        body = {"user": "tester", "host": "testhost", "pid": os.getpid(), "command": "pytest"}
        return self.post("/allocations", {**body, **req})

    def pool(self) -> dict[str, Any]:
        r = self.get("/pool")
        r.raise_for_status()
        return dict(r.json())


def node_body(
    name: str, gpus: int = 2, memory_mib: int = 16384, vgpu_count: int = 4, addr: str | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "addr": addr or f"127.0.0.1:{9960}",
        "unix_socket": None,
        "version": "test",
        "protocol_version": 1,
        "vgpu_count": vgpu_count,
        "gpus": [
            {
                "index": i,
                "uuid": f"EMU-{name}-{i}",
                "name": f"Emulated GPU {memory_mib} MiB",
                "memory_mib": memory_mib,
                "emulated": True,
            }
            for i in range(gpus)
        ],  # fmt: skip
    }


@contextlib.contextmanager
def controller_proc(tmp_path: Path, **opts: Any) -> Iterator[ControllerProc]:
    """Start a controller on a free port with data dir ``tmp_path/controller``.

    ``opts`` become flags: ``lease_s=1`` -> ``--lease-s 1``, ``pool_token="x"``, ``policy``,
    ``heartbeat_interval_s``, ``db`` ... The process is killed when the block exits.
    """
    ctl = ControllerProc(data_dir=tmp_path / "controller", opts=opts)
    try:
        yield ctl.start()
    finally:
        ctl.kill()
