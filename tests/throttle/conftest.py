"""A real pool whose oriond has a chosen ``[throttle]`` section (see tests/e2e/cluster.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.cluster import ServerProc
from pool import ControllerProc, free_port


@dataclass
class ThrottledServer(ServerProc):
    """``ServerProc`` with ``[throttle] throttle_level`` and ``enable_computation_throttle``."""

    throttle_level: int = 100
    enable_computation_throttle: bool = True

    def start(self) -> ThrottledServer:
        self.port = self.port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        sock_dir = Path(tempfile.mkdtemp(prefix="orion-t-", dir="/tmp"))
        conf = self.home / "server.conf"
        conf.write_text(
            f"[log]\n    log_to_screen = false\n    log_dir = {self.home / 'log'}\n"
            f"[controller]\n    controller_addr = {self.controller.addr}\n"
            f"    pool_token = {self.controller.token}\n"
            f"[server]\n    name = {self.name}\n    emulated_gpus = {self.emulated_gpus}\n"
            f"    vgpu_count = {self.vgpu_count}\n    bind_addr = 127.0.0.1\n"
            f"    listen_port = {self.port}\n    unix_socket = {sock_dir / 'oriond.sock'}\n"
            "    heartbeat_interval = 0.5\n"
            f"[throttle]\n    throttle_level = {self.throttle_level}\n"
            "    enable_computation_throttle = "
            f"{'true' if self.enable_computation_throttle else 'false'}\n")
        env = dict(os.environ, ORION_HOME=str(self.home))
        env.pop("ORION_VGPU", None)
        # Workers' OpenMP threads spin between ops by default; on a host shared with
        # other test runs that spinning, not the scheduler, decides who gets the cores
        # (docs/performance.md, "Compute share"). Passive threads unless told otherwise.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(self.home / "oriond.out", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orion_vgpu.server", "--config", str(conf)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_registered()
        return self


@pytest.fixture
def throttled_pool(tmp_path: Path) -> Iterator[Callable[..., tuple[ControllerProc,
                                                                     ThrottledServer]]]:
    """``throttled_pool(throttle_level=0)``: a controller and an oriond with 2 emulated
    16 GiB GPUs, vgpu_count 4, and that [throttle] section. Stopped at test end."""
    started: list[tuple[ControllerProc, ThrottledServer]] = []

    def start(**throttle: object) -> tuple[ControllerProc, ThrottledServer]:
        ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10})
        ctl.start()
        srv = ThrottledServer(ctl, tmp_path / "server", **throttle)  # type: ignore[arg-type]
        started.append((ctl, srv))
        srv.start()
        return ctl, srv

    yield start
    for ctl, srv in started:
        srv.stop()
        ctl.stop()
