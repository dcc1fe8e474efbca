"""The autoload hook (client/autoload.py) in fresh processes with ORION_VGPU set: torch is
switched over once it is imported, whichever module imports it first, ours included.
No pool: nothing here opens a session (device_count comes from ORION_VGPU alone)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CHECK = ("import torch; from orion_vgpu.client import autoload; "
          "print(torch.cuda.device_count(), torch.cuda.is_available(), "
          "sorted(autoload.timings))")


def _run(first: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ORION_VGPU="2", ORION_CONTROLLER="127.0.0.1:1")
    code = (f"import {first}; " if first else "") + _CHECK
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("first", [
    "",  # a user program: torch first
    "orion_vgpu.client.frontend",
    "orion_vgpu.client.transport",
    "orion_vgpu.client.runtime",
    "orion_vgpu.protocol.codec",
])
def test_torch_is_switched_over_whichever_module_imports_it_first(first: str) -> None:
    out = _run(first)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("[")[0].split() == ["2", "True"], out.stdout
    assert "'activate'" in out.stdout and "'torch'" in out.stdout
