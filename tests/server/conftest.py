"""Fixtures: a scrubbed environment and real `oriond` processes, all killed at test end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from oriond_procs import Oriond

# Variables of the developer's shell that would steer the processes under test.
_SCRUB = ("ORION_CONTROLLER", "ORION_POOL_TOKEN", "ORION_SERVER_CONF", "ORION_VGPU", "ORION_GMEM",
          "ORION_RATIO", "ORION_CROSS_NODE", "ORION_TOKEN")  # fmt: skip


@pytest.fixture
def orion_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes: ORION_HOME in tmp, no ORION_* from the shell."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["ORION_HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def oriond(orion_env: dict[str, str]) -> Iterator[Callable[..., Oriond]]:
    """Start `python -m orion_vgpu.server --config CONF` (or another argv); all killed at end."""
    started: list[Oriond] = []

    def start(conf: Path, argv: list[str] | None = None) -> Oriond:
        output = conf.with_suffix(".out")
        cmd = argv or [sys.executable, "-m", "orion_vgpu.server", "--config", str(conf)]
        with open(output, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=orion_env,
                                    text=True, start_new_session=True)  # fmt: skip
        daemon = Oriond(conf, proc, output)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


