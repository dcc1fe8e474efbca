"""ORION_CROSS_NODE=1: one program's vGPUs on two nodes, and it works the same."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script, two_nodes


def test_cross_node_program(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (ctl, _a, _b):
        env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="8000",
                         ORION_RATIO="100", ORION_CROSS_NODE="1")
        proc = run_script("data_parallel.py", env)
        assert proc.returncode == 0, proc.stderr
        local = run_local("data_parallel.py").stdout.split()
        remote = proc.stdout.split()
        assert abs(float(remote[2]) - float(local[2])) < 1e-5
        allocs = ctl.get("/allocations", params={"state": "all"}).json()
        allocs = allocs if isinstance(allocs, list) else allocs["allocations"]
        assert {v["node_name"] for v in allocs[-1]["vgpus"]} == {"node-a", "node-b"}
        # without ORION_RATIO=100 the controller refuses cross-node, with the reason
        bad = run_script("mlp.py", client_env(ctl, tmp_path / "d", ORION_VGPU="2",
                                              ORION_CROSS_NODE="1", ORION_RATIO="50"))
        assert bad.returncode != 0 and "ORION_RATIO=100" in bad.stderr, bad.stderr
