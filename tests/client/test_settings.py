"""The program's torch settings the sessions follow: every public way to set one reports
the change (with the new value in the snapshot), and the server's table sets each name the
client reads (a round trip through both), refusing a bad map whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.utils.deterministic

from orion_vgpu.client import settings
from orion_vgpu.protocol.settings import READERS, snapshot
from orion_vgpu.server import settings as server_settings
from orion_vgpu.server.executor import SessionError


@pytest.fixture()
def snapshots() -> Iterator[list[dict]]:
    original = snapshot()
    seen: list[dict] = []
    settings.install(lambda: seen.append(snapshot()))
    try:
        yield seen
    finally:
        settings._on_change = None
        server_settings.apply(original)
        assert snapshot() == original


CASES = [
    (lambda: torch.set_default_dtype(torch.float64), "default_dtype", torch.float64),
    (lambda: torch.use_deterministic_algorithms(True, warn_only=True), "deterministic",
     [True, True]),
    (lambda: setattr(torch.utils.deterministic, "fill_uninitialized_memory", False),
     "fill_uninitialized_memory", False),
    (lambda: torch.set_float32_matmul_precision("medium"), "float32_matmul_precision",
     "medium"),
    (lambda: setattr(torch.backends.cudnn, "benchmark", True), "cudnn.benchmark", True),
    (lambda: setattr(torch.backends.cudnn, "deterministic", True), "cudnn.deterministic", True),
    (lambda: setattr(torch.backends.cudnn, "allow_tf32", False), "cudnn.allow_tf32", False),
    (lambda: setattr(torch.backends.cudnn, "enabled", False), "cudnn.enabled", False),
    (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), "matmul.allow_tf32", True),
    (lambda: torch.set_default_tensor_type(torch.DoubleTensor), "default_dtype", torch.float64),
]


@pytest.mark.parametrize(("set_it", "name", "value"), CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_setter_reports_the_change(snapshots: list[dict], set_it, name: str,
                                        value: object) -> None:
    set_it()
    assert snapshots and snapshots[-1][name] == value


def test_the_cudnn_flags_context_reports_entry_and_exit(snapshots: list[dict]) -> None:
    torch.backends.cudnn.deterministic = True
    with torch.backends.cudnn.flags(enabled=True, deterministic=False):
        assert snapshots[-1]["cudnn.deterministic"] is False
    assert snapshots[-1]["cudnn.deterministic"] is True


def test_the_server_sets_what_the_client_reads(snapshots: list[dict]) -> None:
    changed = {"default_dtype": torch.float64, "deterministic": [True, False],
               "fill_uninitialized_memory": False, "float32_matmul_precision": "high",
               "cudnn.enabled": False, "cudnn.benchmark": True, "cudnn.deterministic": True,
               "cudnn.allow_tf32": False, "matmul.allow_tf32": True}
    assert changed.keys() == READERS.keys() == server_settings.SETTERS.keys()
    server_settings.apply(changed)
    assert snapshot() == changed


@pytest.mark.parametrize("bad", [{"cudnn.benchmark": 1}, {"default_dtype": torch.int32},
                                 {"deterministic": [True]}, {"nope": True}, [1, 2],
                                 {"float32_matmul_precision": "low"}])
def test_a_bad_map_changes_nothing(snapshots: list[dict], bad: object) -> None:
    before = snapshot()
    with pytest.raises(SessionError, match="setting|settings"):
        server_settings.apply(bad if not isinstance(bad, dict)
                              else {"cudnn.deterministic": True, **bad})
    assert snapshot() == before


def test_a_new_session_starts_from_the_defaults_the_client_assumes() -> None:
    """The client sends only what differs from DEFAULTS: they must be a new process's."""
    import subprocess
    import sys
    code = ("import torch; from orion_vgpu.protocol import settings as p; "
            "assert p.snapshot() == p.DEFAULTS, p.snapshot(); print('same')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "same", out.stderr[-800:]
