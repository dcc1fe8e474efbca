"""Security tests run real session workers behind a real SessionManager (the fixtures of
tests/sessions, reused rather than copied) and real pools (tests/e2e)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SESSIONS = Path(__file__).resolve().parent.parent / "sessions"
if str(_SESSIONS) not in sys.path:
    sys.path.insert(0, str(_SESSIONS))
_spec = importlib.util.spec_from_file_location("orion_tests_sessions_conftest",
                                               _SESSIONS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_sessions_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sessions_conftest)

start_server = _sessions_conftest.start_server


@pytest.fixture(autouse=True)
def real_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions run in orion_vgpu.server.worker, never a stand-in."""
    monkeypatch.delenv("ORION_WORKER_MODULE", raising=False)
