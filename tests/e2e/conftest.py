from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import ServerProc
from pool import ControllerProc


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[ControllerProc, ServerProc]]:
    """A controller and one oriond with 2 emulated 16 GiB GPUs, vgpu_count 4."""
    ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10})
    ctl.start()
    srv = ServerProc(ctl, tmp_path / "server")
    try:
        srv.start()
        yield ctl, srv
    finally:
        srv.stop()
        ctl.stop()
