"""nn.Lazy* modules put on a vGPU before their first forward materialize there (an
uninitialized parameter cannot be a vGPU tensor; the client keeps it on the host bound for
its vGPU and swaps it for a vGPU parameter when its shape is known)."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _results(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def test_lazy_modules_materialize_on_the_vgpu_and_train_as_locally(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _results(run_local("lazy_modules.py"))
    assert len(local) == 7 and all("lazy=True" in r and "on-device=True" in r for r in local)
    assert _results(run_script("lazy_modules.py", client_env(ctl, tmp_path / "c"))) == local
