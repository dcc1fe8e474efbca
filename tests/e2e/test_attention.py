"""Attention as torch.nn builds it: the calls torch.nn.functional makes from Python (multi-
head attention's inner scaled_dot_product_attention, causal and boolean masks) reach the
vGPU and give the results they give on the server's device."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _lines(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_nn_transformer_and_masks_match_local_exactly(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _lines(run_local("transformer_nn.py"))
    remote = _lines(run_script("transformer_nn.py", client_env(ctl, tmp_path / "client")))
    assert [line.split()[0] for line in local] == ["step"] * 6 + ["sdpa3d", "sdpa-bool",
                                                                    "eval-padded"]
    assert remote == local  # fp32, to the last printed digit: the same kernels ran
