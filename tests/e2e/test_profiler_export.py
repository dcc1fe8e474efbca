"""torch.profiler with CUDA activity and torch.export in a vGPU program: no C++ stack
traces, no abort, and a clear error where a CPU build of PyTorch cannot follow."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_script


def test_profiler_with_cuda_activity_and_export_in_a_vgpu_program(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    proc = run_script("profiler_export.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Failed to record CUDA event" not in proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [
        "RESULT profiler True True",
        "RESULT legacy-profiler True",
        "RESULT export OrionError torch.export of a model or inputs on a vGPU is not supported",
        "RESULT after 0.0",
    ]
