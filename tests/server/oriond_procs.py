"""Real `oriond` processes for end-to-end tests (controllers come from tests/pool.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def server_conf(
    path: Path,
    *,
    controller_addr: str,
    port: int,
    pool_token: str | None = None,
    pool_token_file: Path | None = None,
    emulated: str | None = "2x16GiB",
    vgpu_count: int = 4,
    name: str = "test-node",
    extra: str = "",
) -> Path:
    token = f"    pool_token = {pool_token}\n" if pool_token else ""
    token += f"    pool_token_file = {pool_token_file}\n" if pool_token_file else ""
    emu = f"    emulated_gpus = {emulated}\n" if emulated else ""
    path.write_text(
        "[log]\n"
        "    log_to_screen = true\n"
        f"    log_dir = {path.parent / 'log'}\n"
        "[controller]\n"
        f"    controller_addr = {controller_addr}\n{token}"
        "[server]\n"
        f"    vgpu_count = {vgpu_count}\n"
        "    bind_addr = 127.0.0.1\n"
        f"    listen_port = {port}\n"
        f"    name = {name}\n"
        f"    unix_socket = {path.parent / 's.sock'}\n"
        f"{emu}{extra}"
    )
    return path


@dataclass
class Oriond:
    conf: Path
    proc: subprocess.Popen[str]
    output: Path

    @property
    def server_log(self) -> Path:
        return self.conf.parent / "log" / "server.log"

    def log_text(self) -> str:
        return self.server_log.read_text() if self.server_log.exists() else ""

    def out_text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the daemon and its workers
        with contextlib.suppress(Exception):
            self.proc.wait(5)


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pool_vgpus(api: str, node: str = "test-node") -> int:
    try:
        pool = httpx.get(f"{api}/pool", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(int(g["vgpu_count"]) for g in pool.get("gpus", [])
               if g.get("node_name") == node and g.get("state") == "up")  # fmt: skip


def run_orion(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orion_vgpu.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
