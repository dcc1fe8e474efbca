"""torch.tensor(...) of a list of vGPU scalars (a list of losses, nested, mixed with
numbers) gives what it gives on CUDA: a host tensor with their values and dtype; the CPU-
only ``apply_`` raises PyTorch's CUDA error instead of silently doing nothing."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _results(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def test_python_data_from_vgpu_scalars_matches_local(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _results(run_local("scalars.py"))
    remote = _results(run_script("scalars.py", client_env(ctl, tmp_path / "c")))
    assert len(local) == 11 and len(remote) == 11
    assert remote[:9] == local[:9]
    assert remote[9] == "RESULT apply_ TypeError: apply_ is only implemented on CPU tensors"
    assert remote[10] == "RESULT after-apply_ cpu torch.float32 (3,) [0.0, 1.0, 2.0]"
