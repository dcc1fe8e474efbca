"""Start-up (issue #6): what the first vGPU op costs in imports, and what it must not change.

Timings are in benchmarks/bench_startup.py; these tests check the mechanisms, not times.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from e2e.cluster import client_env, run_local, run_script


def _lines(out: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def test_first_op_imports_nothing_heavy(pool, tmp_path: Path) -> None:
    # PyTorch's C++ dispatcher would import torch.distributed.tensor (and sympy: seconds)
    # on the first dispatch to a tensor subclass; the runtime answers its rule lookup.
    ctl, _ = pool
    proc = run_script("startup.py", client_env(ctl, tmp_path / "c"), "first-op", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = _lines(proc.stdout)
    assert out["values"] == "[2.0, 2.0, 2.0, 2.0]"
    assert out["heavy"] == "none"
    assert set(out["timed"].split(",")) >= {"settings", "allocate", "connect", "start"}


def test_other_tensor_subclasses_dispatch_as_without_orion(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    remote = run_script("startup.py", client_env(ctl, tmp_path / "c"), "subclass", timeout=120)
    local = run_local("startup.py", "subclass", timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert local.returncode == 0, local.stderr
    assert _lines(remote.stdout) == _lines(local.stdout)
    assert _lines(local.stdout)["rule"] == "[42.0, 42.0, 42.0]"


def test_program_that_never_touches_cuda_takes_no_vgpu(pool, tmp_path: Path) -> None:
    # Allocation stays lazy: importing torch with ORION_VGPU set must not take from the pool
    # (DataLoader workers, CPU-only tools run under `orion run`).
    ctl, _ = pool
    proc = run_script("startup.py", client_env(ctl, tmp_path / "c"), "cpu-only", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout)["cpu"] == "[2.0, 2.0]"
    body = httpx.get(ctl.api + "/allocations", params={"state": "all"}, timeout=10).json()
    allocations = body if isinstance(body, list) else body.get("allocations", [])
    assert allocations == []
