"""A real pool for end-to-end tests: controller and oriond subprocesses, client scripts.

Nothing is mocked: the controller keeps a real SQLite file, oriond serves emulated GPUs
over real sockets and shared memory, and user scripts run in their own processes with
ORION_* variables, exactly as a user runs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from pool import ControllerProc, free_port

SCRIPTS = Path(__file__).parent / "scripts"


@dataclass
class ServerProc:
    """``oriond --config`` with emulated GPUs, registered with ``controller``."""

    controller: ControllerProc
    home: Path
    name: str = "node-a"
    emulated_gpus: str = "2x16GiB"
    vgpu_count: int = 4
    enable_shm: bool = True
    port: int = 0
    cpus: set[int] | None = None  # run oriond and its workers on these CPUs only
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProc:
        self.port = self.port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        sock_dir = Path(tempfile.mkdtemp(prefix="orion-t-", dir="/tmp"))
        conf = self.home / "server.conf"
        conf.write_text(
            "[log]\n    log_to_screen = false\n"
            f"    log_dir = {self.home / 'log'}\n"
            f"[controller]\n    controller_addr = {self.controller.addr}\n"
            f"    pool_token = {self.controller.token}\n"
            f"[server]\n    name = {self.name}\n    emulated_gpus = {self.emulated_gpus}\n"
            f"    vgpu_count = {self.vgpu_count}\n    bind_addr = 127.0.0.1\n"
            f"    listen_port = {self.port}\n    unix_socket = {sock_dir / 'oriond.sock'}\n"
            f"    enable_shm = {'true' if self.enable_shm else 'false'}\n"
            "    heartbeat_interval = 0.5\n")
        env = dict(os.environ, ORION_HOME=str(self.home))
        env.pop("ORION_VGPU", None)
        with open(self.home / "oriond.out", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orion_vgpu.server", "--config", str(conf)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=None if self.cpus is None else partial(os.sched_setaffinity, 0,
                                                                  self.cpus))
        self.wait_registered()
        return self

    def wait_registered(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"oriond exited:\n{self.output()}")
            pool = self.controller.get("/pool").json()
            if any(g.get("node_name") == self.name and g.get("state", "up") == "up"
                   for g in pool.get("gpus", [])):
                return
            time.sleep(0.1)
        raise TimeoutError(f"oriond {self.name} did not register:\n{self.output()}")

    def output(self) -> str:
        p = self.home / "oriond.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def server_log(self) -> str:
        p = self.home / "log" / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def session_logs(self) -> list[Path]:
        d = self.home / "log" / "session"
        return sorted(d.glob("*.log")) if d.exists() else []

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def two_nodes(root: Path) -> Iterator[tuple[ControllerProc, ServerProc, ServerProc]]:
    """A controller and two servers (node-a, node-b) of one emulated 16 GiB GPU each, so a
    program with ORION_CROSS_NODE=1 gets a vGPU on each; all stopped on exit."""
    ctl = ControllerProc(root / "controller", {"lease_s": 10})
    ctl.start()
    a = ServerProc(ctl, root / "a", name="node-a", emulated_gpus="1x16GiB")
    b = ServerProc(ctl, root / "b", name="node-b", emulated_gpus="1x16GiB")
    try:
        a.start()
        b.start()
        yield ctl, a, b
    finally:
        a.stop()
        b.stop()
        ctl.stop()


def client_env(controller: ControllerProc, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("ORION_"):
            del env[k]
    env.update(ORION_HOME=str(home), ORION_CONTROLLER=controller.addr, ORION_VGPU="1",
               ORION_GMEM="4096")
    env.update(extra)
    return env


def run_script(script: str | Path, env: dict[str, str], *args: str,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    path = script if isinstance(script, Path) else SCRIPTS / script
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def result_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The RESULT lines of a script run that must have succeeded (its output if not)."""
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def run_local(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The same script on this machine's own device (no ORION_VGPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    return run_script(script, env, *args, timeout=timeout)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def active_allocations(controller: ControllerProc) -> list[dict]:
    r = httpx.get(controller.api + "/allocations", params={"state": "active"}, timeout=10)
    return [a for a in r.json() if a["state"] in ("pending", "active")] if isinstance(
        r.json(), list) else [a for a in r.json().get("allocations", [])
                              if a["state"] in ("pending", "active")]
