"""ORION_CROSS_NODE=1: one program's vGPUs on two nodes, and it works the same."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import ServerProc, client_env, run_local, run_script
from pool import ControllerProc


def test_cross_node_program(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10})
    ctl.start()
    a = ServerProc(ctl, tmp_path / "a", name="node-a", emulated_gpus="1x16GiB")
    b = ServerProc(ctl, tmp_path / "b", name="node-b", emulated_gpus="1x16GiB")
    try:
        a.start()
        b.start()
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
    finally:
        a.stop()
        b.stop()
        ctl.stop()
