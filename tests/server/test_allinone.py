"""`orion up`: controller + server as children, pool visible, clean stop, no orphans."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from orion_vgpu.allinone import Plan, server_conf_text
from orion_vgpu.config import EmulatedGpus, load_server_config
from pool import free_port


class Up:
    """An `orion up` child whose output a thread collects (no blocking reads in tests)."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *extra: str) -> None:
        self.port, self.server_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "orion_vgpu.cli", "up", "--listen", f"127.0.0.1:{self.port}",
               "--server-port", str(self.server_port), "--data-dir", str(tmp_path / "up"), *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float = 150) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise AssertionError(f"no {marker!r} in output:\n{self.output}")
            time.sleep(0.1)
        return self.output

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


def descendants(pid: int) -> set[int]:
    """All processes below `pid` (children, grandchildren ...) via /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_up_starts_pool_and_sigint_stops_everything(tmp_path: Path, orion_env: dict[str, str]) -> None:
    up = Up(tmp_path, orion_env, "--emulated-gpus", "2x16GiB")
    proc, port, server_port = up.proc, up.port, up.server_port
    family: set[int] = set()
    try:
        out = up.wait_for("Press Ctrl-C to stop.")
        assert f"export ORION_CONTROLLER=127.0.0.1:{port} ORION_VGPU=1 ORION_GMEM=4096" in out
        assert "2 x Emulated GPU (CPU) 16GiB (emulated: they run on the CPU)" in out
        assert f"http://127.0.0.1:{port}/" in out
        pool = httpx.get(f"http://127.0.0.1:{port}/api/v1/pool", timeout=5).json()
        assert pool["vgpu_total"] == 8 and pool["vgpu_free"] == 8
        assert all(g["emulated"] for g in pool["gpus"])
        # The generated admin password reaches the person who ran `orion up`, and works;
        # the console file that also holds it is owner-only.
        found = re.search(r"sign in as admin with password (\S+)", out)
        assert found, out
        login = httpx.post(f"http://127.0.0.1:{port}/api/v1/login", timeout=5,
                           json={"username": "admin", "password": found.group(1)})
        assert login.status_code == 201, login.text
        console = tmp_path / "up" / "log" / "controller.out"
        assert stat.S_IMODE(console.stat().st_mode) == 0o600
        family = descendants(proc.pid)
        assert len(family) >= 2  # controller + server (+ the server's workers)

        conf = load_server_config(tmp_path / "up" / "server.conf")
        assert conf.listen_port == server_port and conf.emulated_gpus == EmulatedGpus(2, 16384)

        proc.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        assert "Stopping (SIGINT) ..." in up.output and "stopped." in up.output
        time.sleep(0.5)
        assert not [pid for pid in family if alive(pid)], "orphan processes left behind"
    finally:
        proc.kill()
        kill_all(family | descendants(proc.pid))


def test_up_reports_a_dead_child(tmp_path: Path, orion_env: dict[str, str]) -> None:
    up = Up(tmp_path, orion_env)
    proc = up.proc
    family: set[int] = set()
    try:
        out = up.wait_for("Press Ctrl-C to stop.")
        family = descendants(proc.pid)
        controller_pid = int(out.split("(dashboard)")[1].split("[pid ")[1].split("]")[0])
        os.kill(controller_pid, signal.SIGKILL)
        assert up.wait(60) == 1
        assert "orion up: controller exited unexpectedly with status -9" in up.output
        time.sleep(0.5)
        assert not [pid for pid in family if alive(pid)]
    finally:
        proc.kill()
        kill_all(family | descendants(proc.pid))


def test_up_port_in_use(tmp_path: Path, orion_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "orion_vgpu.cli", "up", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path / "up")],
            capture_output=True, text=True, env=orion_env, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"orion: error: port {port} on 127.0.0.1 is already in use (another controller or "
        "`orion up` running?); stop it or pass --listen with a free port\n"
    )


@pytest.mark.parametrize("emulated", [EmulatedGpus(2, 16384), None])
def test_generated_server_conf_parses(tmp_path: Path, emulated: EmulatedGpus | None) -> None:
    plan = Plan(listen="127.0.0.1:9123", client_addr="127.0.0.1:9123", data_dir=tmp_path / "a;b#c",
                server_port=9961, vgpu_count=2, emulated=emulated, gpu_count=2,
                gpu_memory_mib=16384, gpu_name="x", node_name="n")  # fmt: skip
    path = tmp_path / "server.conf"
    path.write_text(server_conf_text(plan))
    cfg = load_server_config(path)
    assert cfg.emulated_gpus == emulated
    assert cfg.log_dir == tmp_path / "a;b#c" / "log"
    assert cfg.pool_token_file == tmp_path / "a;b#c" / "controller" / "pool_token"
    assert (cfg.vgpu_count, cfg.listen_port, cfg.log.log_to_screen) == (2, 9961, False)
