"""PyTorch's C++ makes some helper tensors with an input's options; on a vGPU those name
the wrapper's meta:N device, and the client must make them on the vGPU with their values
(affine_grid's backward failed with "cannot mix meta tensors with vGPU tensors")."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _results(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def test_helper_factories_of_cpp_match_local(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _results(run_local("cpp_factories.py"))
    assert len(local) == 8
    assert _results(run_script("cpp_factories.py", client_env(ctl, tmp_path / "c"))) == local
