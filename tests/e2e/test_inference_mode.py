"""A model evaluated under ``torch.inference_mode()`` gives what it gives locally, and its
results brought to the host are host tensors. Before, ``.cpu()`` in the block (a
composite op there: autograd, which breaks it into ``_to_copy`` elsewhere, is off) ran on
the server whole and gave a vGPU tensor, whose printing recursed until the stack ran out;
a slice of a normal tensor in the block failed ("Cannot set version_counter for inference
tensor")."""

from __future__ import annotations

import json
import math
from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _results(proc) -> dict:  # noqa: ANN001
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            name, _, value = line[len("RESULT "):].partition("\t")
            out[name] = json.loads(value)
    return out


def _close(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        # the vGPU's matrix products may split the work over other thread counts
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    return a == b


def test_inference_mode_results_match_local(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _results(run_local("inference_mode.py"))
    remote = _results(run_script("inference_mode.py", client_env(ctl, tmp_path / "c")))
    assert len(local) == 26, sorted(local)
    assert local["is_inference"] == [True, False, False]
    assert local["cpu"]["where"] == "Tensor cpu torch.float32"
    assert remote.keys() == local.keys()
    for name, value in local.items():
        assert _close(remote[name], value), f"{name}: remote {remote[name]!r}, local {value!r}"
