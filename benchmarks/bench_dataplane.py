"""Data-plane benchmark: remote (vGPU on an emulated GPU) against local, in the same run.

    .venv/bin/python benchmarks/bench_dataplane.py [--ops 20000] [--steps 10]

Prints the client-side cost per tiny op and the training-step ratios remote/local (MLP,
CNN, small transformer). The local figure of each row is the faster of two OpenMP wait
policies (``local_envs``); both medians are printed as "local baseline" lines. The MLP's
graph rows replay a captured step with capturable Adam, fused (PyTorch's recommended
optimizer for CUDA graphs) or for-each; their local figure is the faster of Adam's
default and fused implementations run eagerly.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, run_json  # noqa: E402


def run(env: dict[str, str], *args: str) -> dict:
    return run_json([str(HERE / "workloads.py"), *args], env)


def local_envs(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The local side under the OpenMP wait policy it is given (run_all.py: passive, as
    oriond's workers) and under OpenMP's default (spinning threads): the baseline is the
    faster of the two, as a program run locally would be tuned. Passive threads make
    op-bound local steps about 30 % slower on a quiet host (MLP: 0.68 against 0.52 ms)."""
    envs = {f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}": env}
    if "OMP_WAIT_POLICY" in env:
        envs["OMP_WAIT_POLICY=(unset)"] = {k: v for k, v in env.items()
                                           if k != "OMP_WAIT_POLICY"}
    return envs


def paired(local_env: dict[str, str], remote_env: dict[str, str], args: tuple[str, ...],
           field: str, repeat: int, remote_args: tuple[str, ...] | None = None,
           other_local: tuple[tuple[str, ...], ...] = ()) -> tuple[float, float]:
    """Medians of alternating local and remote runs, so both see the same machine state;
    the local figure is the fastest median among the wait policies (``local_envs``) and
    the local workloads (``args`` and ``other_local``: other ways to run the same step).

    The local side always runs eagerly (``args``); ``remote_args`` may differ (graphs)."""
    envs = local_envs(local_env)
    variants = {f"{' '.join(a)}, {name}": (env, a) for a in (args, *other_local)
                for name, env in envs.items()}
    loc: dict[str, list[float]] = {name: [] for name in variants}
    rem = []
    for _ in range(repeat):
        for name, (env, a) in variants.items():
            loc[name].append(run(env, *a)[field])
        rem.append(run(remote_env, *(remote_args or args))[field])
    meds = {name: statistics.median(v) for name, v in loc.items()}
    print(f"local baseline ({field}; remote: workloads.py {' '.join(remote_args or args)}): "
          + "; ".join(f"{n} {v:.3f}" for n, v in meds.items()), flush=True)
    return min(meds.values()), statistics.median(rem)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="alternating local/remote runs")
    a = ap.parse_args()
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    with local_pool() as env:
        rows = [
            ("tiny in-place op (us/op)",
             *paired(local_env, env, ("tiny", str(a.ops)), "us_per_op", a.repeat)),
            ("MLP 4x64 step, eager (ms)",
             *paired(local_env, env, ("mlp", "100"), "ms_per_step", a.repeat)),
            # Against local eager at its fastest: Adam's default or fused implementation.
            ("MLP 4x64 step, graph replay (ms)",
             *paired(local_env, env, ("mlp", "100"), "ms_per_step", a.repeat,
                     remote_args=("mlp_graph_fused", "100"),
                     other_local=(("mlp_fused", "100"),))),
            ("MLP 4x64 step, graphed, for-each Adam (ms)",
             *paired(local_env, env, ("mlp", "100"), "ms_per_step", a.repeat,
                     remote_args=("mlp_graph", "100"),
                     other_local=(("mlp_fused", "100"),))),
            ("CNN train step b64 32x32 (ms)",
             *paired(local_env, env, ("cnn", str(a.steps)), "ms_per_step", a.repeat)),
            ("transformer 2x128 step b16 (ms)",
             *paired(local_env, env, ("xfmr", str(a.steps)), "ms_per_step", a.repeat)),
        ]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; remote = vGPU on an emulated GPU (CPU)")
    print(f"{'workload':34} {'local':>10} {'remote':>10} {'ratio':>7}")
    for name, loc, rem in rows:
        print(f"{name:34} {loc:10.2f} {rem:10.2f} {rem / loc:7.2f}")
    print(f"client-side cost per op (remote - local): {rows[0][2] - rows[0][1]:.2f} us")


if __name__ == "__main__":
    main()
