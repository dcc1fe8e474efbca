"""What the client's torch-function mode costs an op-bound program, measured locally.

    .venv/bin/python benchmarks/bench_mode_cost.py [--steps 200]

Runs the MLP training step of ``workloads.mlp_step`` on the CPU (one thread) four ways:
without a mode, under an empty ``TorchFunctionMode``, under the client's ``VGPUMode``
(nothing is remote here: every call passes through the mode and back to the CPU), and with
the client's wrapped functions (client/hooks.py, what a vGPU program runs with outside
autocast and compile). Prints ms per step, the mode calls per step and the cost per call.
No pool is started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
import workloads  # noqa: E402
from orion_vgpu.client import cuda_api, hooks  # noqa: E402


class _Empty(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


class _Counting(TorchFunctionMode):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        _Counting.calls += 1
        return func(*args, **(kwargs or {}))


class _Hooks:
    """Stands where a mode class would: the client's wrappers for the length of a run."""

    def __enter__(self) -> None:
        hooks.install(cuda_api._create, cuda_api._cuda_index, cuda_api._TF_SPECIAL,
                      cuda_api.VGPUMode)

    def __exit__(self, *exc: object) -> None:
        hooks.remove()


def _step_ms(mode: type[TorchFunctionMode] | type[_Hooks] | None, steps: int) -> float:
    if mode is None:
        return workloads.mlp_step(steps)["ms_per_step"]
    with mode():
        return workloads.mlp_step(steps)["ms_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with _Counting():
        workloads.mlp_step(10)
    per_step = _Counting.calls / (10 * 5 + 3)  # mlp_step runs 3 warm-up steps + 5 rounds
    rows = {"no mode": None, "empty mode": _Empty, "VGPUMode": cuda_api.VGPUMode,
            "hooks": _Hooks}
    ms = {name: statistics.median(_step_ms(m, a.steps) for _ in range(a.repeat))
          for name, m in rows.items()}
    print(f"torch calls through a mode per MLP step: {per_step:.0f}")
    for name, v in ms.items():
        extra = (v - ms["no mode"]) * 1e3
        print(f"{name:12} {v:.3f} ms/step  (+{extra:.0f} us/step, "
              f"{extra / per_step:.2f} us per call)")


if __name__ == "__main__":
    main()
