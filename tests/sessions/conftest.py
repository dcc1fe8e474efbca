from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sessions_support import (
    DEVICES,
    HERE,
    NODE,
    TOKEN,
    Events,
    FakeServerConfig,
    Server,
    child_pids,
)

from orion_vgpu.server.sessions import SessionManager


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run sessions in tests/sessions/orion_fake_worker.py instead of the real worker."""
    monkeypatch.setenv("ORION_WORKER_MODULE", "orion_fake_worker")
    path = [str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory for running SessionManagers; on teardown stops them and checks that no
    child process (worker or zombie) is left behind."""
    before = child_pids()
    servers: list[Server] = []
    run_dirs: list[str] = []

    def start(*, node_id: str | None = NODE, warm_workers: int = 1,
              hello_timeout_s: float = 10.0, stop_grace_s: float = 3.0, unix: bool = True,
              devices: list[Any] = DEVICES, **cfg: Any) -> Server:
        # A short directory: AF_UNIX paths are limited to 108 bytes.
        run_dirs.append(tempfile.mkdtemp(prefix="orion-t-"))
        unix_path = Path(run_dirs[-1]) / "run" / "oriond.sock" if unix else None
        events = Events()
        log_dir = tmp_path / f"session{len(servers)}"
        manager = SessionManager(
            devices=devices, server_cfg=FakeServerConfig(unix_socket=unix_path, **cfg),
            pool_token=TOKEN, session_log_dir=log_dir, on_event=events,
            warm_workers=warm_workers, hello_timeout_s=hello_timeout_s,
            stop_grace_s=stop_grace_s)
        manager.start()
        if node_id is not None:
            manager.set_node_id(node_id)
        server = Server(manager, events, log_dir, unix_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.manager.stop()
    for d in run_dirs:
        shutil.rmtree(d, ignore_errors=True)
    assert child_pids() - before == set(), "worker processes left behind"
