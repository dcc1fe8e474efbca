"""torch.utils.checkpoint recomputes dropout with the forward's mask only when PyTorch
thinks CUDA is initialized (it then saves the CUDA generators); grouped-query attention
(Llama-style enable_gqa); pin_memory() and pin_memory=True factories (pinned copies, as
with CUDA) and out= factories on a vGPU client."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _results(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def test_checkpoint_dropout_gqa_and_host_factories(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _results(run_local("checkpoint_gqa.py"))
    remote = _results(run_script("checkpoint_gqa.py", client_env(ctl, tmp_path / "c")))
    expected_ckpt = [f"RESULT checkpoint reentrant={r} same-grad=True" for r in (True, False)]
    assert local[:2] == expected_ckpt and remote[:2] == expected_ckpt
    assert remote[2:4] == local[2:4] and len(local) == 4
    assert remote[4:] == [
        "RESULT pinned-factory cpu (3,) True",
        "RESULT pin-memory True True False True [0.0, 1.0, 2.0, 3.0] [1.0, 2.0, 3.0, 4.0]",
        "RESULT randperm-out [0, 1, 2, 3, 4, 5]"]
