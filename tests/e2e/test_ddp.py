"""torch.distributed with backend "nccl" over vGPUs: torchrun, one vGPU per rank, the
collectives run between the servers holding the tensors (docs/data-plane.md, "Distributed
training (DDP)")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import SCRIPTS, ServerProc, client_env, run_local, run_script
from pool import ControllerProc, free_port

ATOL = 1e-5


def torchrun(script: str, env: dict[str, str], nproc: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SCRIPTS / script)]
    # Ranks write their RESULT lines to files: two ranks' long lines on one pipe interleave.
    out_dir = Path(tempfile.mkdtemp(prefix="orion-ddp-results-"))
    proc = subprocess.run(cmd, env={**env, "TEST_RESULT_DIR": str(out_dir)}, capture_output=True,
                          text=True, timeout=timeout)
    written = "".join(f.read_text() for f in sorted(out_dir.glob("rank*.txt")))
    shutil.rmtree(out_dir, ignore_errors=True)
    proc.stdout += written
    return proc


def results(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    found = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith("RESULT ")]
    return sorted(found, key=lambda r: r.get("rank", 0))


def ddp_env(ctl: ControllerProc, home: Path) -> dict[str, str]:
    # ORION_RATIO=100: a whole GPU per rank, so the two ranks land on different GPUs
    return client_env(ctl, home, ORION_VGPU="1", ORION_GMEM="2048", ORION_RATIO="100",
                      ORION_QUIET="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControllerProc, ServerProc]]:
    """One server with two emulated GPUs."""
    base = tmp_path_factory.mktemp("ddp")
    ctl = ControllerProc(base / "controller", {"lease_s": 10}).start()
    srv = ServerProc(ctl, base / "server", emulated_gpus="2x8GiB", vgpu_count=2)
    try:
        srv.start()
        yield ctl, srv
    finally:
        srv.stop()
        ctl.stop()


def check_ddp_matches_one_device(ranks: list[dict]) -> None:
    ref = results(run_local("ddp_train.py", "2"))[0]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["backend"] == "nccl"
        assert r["isinstance"] is True
        assert r["state_dict_key"].startswith("module.")
        for phase in ("plain", "full"):
            got, want = r[phase]["params"], ref[phase]["params"]
            assert len(got) == len(want)
            worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
            assert worst < ATOL, f"rank {r['rank']} {phase}: params off by {worst}"
    # every rank holds the same model: the averaged gradients reached both
    assert ranks[0]["plain"]["params"] == ranks[1]["plain"]["params"]
    assert ranks[0]["full"]["params"] == ranks[1]["full"]["params"]
    losses = ranks[0]["plain"]["losses"], ref["plain"]["losses"]
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < ATOL
    # gradients never came through the clients: no tensor went up or down in the loop
    assert ranks[0]["plain"]["transfers_in_loop"] == 0
    assert ranks[1]["plain"]["transfers_in_loop"] == 0


def last_allocations(ctl: ControllerProc, n: int = 2) -> list[dict]:
    allocs = ctl.get("/allocations", params={"state": "all"}).json()
    allocs = allocs if isinstance(allocs, list) else allocs["allocations"]
    return allocs[:n]  # newest first: one per rank of the last run


def session_lines(allocs: list[dict], *servers: ServerProc) -> list[str]:
    """The session log lines of these allocations' workers."""
    ids = {a["id"] for a in allocs}
    return [line for s in servers for p in s.session_logs() if p.name[:36] in ids
            for line in p.read_text(errors="replace").splitlines()]


def test_ddp_two_gpus_one_server_matches_one_device(two_gpus, tmp_path: Path) -> None:
    ctl, srv = two_gpus
    proc = torchrun("ddp_train.py", ddp_env(ctl, tmp_path / "c"))
    check_ddp_matches_one_device(results(proc))
    allocs = last_allocations(ctl)
    gpus = {(v["node_name"], v["gpu_index"]) for a in allocs for v in a["vgpus"]}
    assert gpus == {("node-a", 0), ("node-a", 1)}  # one allocation per rank, a GPU each
    # the workers ran the collectives: each joined the group and reports its allreduces
    lines = session_lines(allocs, srv)
    assert sum("joined process group" in line for line in lines) == 2, lines
    assert sum("left process group" in line and "allreduce" in line and "gloo" in line
               for line in lines) == 2, lines


def test_collectives_values(two_gpus, tmp_path: Path) -> None:
    ctl, _ = two_gpus
    r0, r1 = results(torchrun("collectives.py", ddp_env(ctl, tmp_path / "c")))
    base = [[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]]  # rank r holds arange(4) + r
    for rank, r in enumerate((r0, r1)):
        assert r["backend"] == "nccl"
        assert r["sum"] == [1.0, 3.0, 5.0, 7.0]
        assert r["avg"] == [0.5, 1.5, 2.5, 3.5]
        assert r["max"] == base[1] and r["min"] == base[0]
        assert r["broadcast"] == base[1]
        assert r["all_gather"] == base
        assert r["all_gather_into_tensor"] == base[0] + base[1]
        # input arange(4) * (rank + 1) summed = arange(4) * 3; rank r keeps chunk r
        assert r["reduce_scatter_tensor"] == [[0.0, 3.0], [6.0, 9.0]][rank]
        # rank r sends its chunk j (arange(4) + 10 r, split in 2) to rank j
        assert r["all_to_all_single"] == [[0.0, 1.0, 10.0, 11.0], [2.0, 3.0, 12.0, 13.0]][rank]
        assert r["scatter"] == [[10.0, 11.0], [20.0, 22.0]][rank]  # rank 1's list, item r
        assert r["reduce_scatter"] == [[3.0, 3.0], [30.0, 30.0]][rank]
        assert r["strided"] == [[3.0, 0.0]] * 4
        assert r["async"] == [3.0, 3.0, 3.0]
        assert r["host"] == [3.0]
        assert r["all_gather_object"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast_object_list"] == ["from0"]
        assert r["subgroup"] == [3.0]
        assert r["barrier_waited"] is True  # rank 0 left the barrier after rank 1 came
    assert r0["reduce"] == [1.0, 3.0, 5.0, 7.0]
    assert r0["gather"] == base and "gather" not in r1


def test_gloo_on_vgpu_tensors_runs_on_host_copies(two_gpus, tmp_path: Path) -> None:
    """Backend "gloo" is not Orion's: its collectives on vGPU tensors used to fail with
    "cannot send a ScriptObject to a vGPU"; they run on host copies, as gloo does with
    CUDA tensors, and DDP over gloo trains as one device with the whole batch."""
    ctl, _ = two_gpus
    r0, r1 = results(torchrun("gloo_vgpu.py", ddp_env(ctl, tmp_path / "c")))
    for rank, r in enumerate((r0, r1)):
        assert r["rank"] == rank and r["backend"] == "gloo"
        assert r["sum"] == [1.0, 3.0, 5.0, 7.0]
        assert r["bcast"] == [6.0, 6.0, 6.0]
        assert r["gather"] == [[0.0, 0.0], [1.0, 10.0]]
        assert r["devices"] == ["cuda:0"] and r["async_done"] is True
        assert len(r["ddp"]) == 7
        worst = max(abs(a - b) for a, b in zip(r["ddp"], r["reference"], strict=True))
        assert worst < 1e-4, (r["ddp"], r["reference"])
    assert r0["ddp"] == r1["ddp"]


def test_ddp_two_servers_matches_one_device(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10}).start()
    a = ServerProc(ctl, tmp_path / "a", name="node-a", emulated_gpus="1x8GiB", vgpu_count=1)
    b = ServerProc(ctl, tmp_path / "b", name="node-b", emulated_gpus="1x8GiB", vgpu_count=1)
    try:
        a.start()
        b.start()
        proc = torchrun("ddp_train.py", ddp_env(ctl, tmp_path / "c"))
        check_ddp_matches_one_device(results(proc))
        # each server's worker took part: a group spanning both nodes
        allocs = last_allocations(ctl, 10)
        assert len(allocs) == 2  # one per rank; torchrun's own agent took none
        assert {v["node_name"] for al in allocs for v in al["vgpus"]} == {"node-a", "node-b"}
        assert any("joined process group" in line for line in session_lines(allocs, a))
        assert any("joined process group" in line for line in session_lines(allocs, b))
    finally:
        a.stop()
        b.stop()
        ctl.stop()


@pytest.mark.parametrize("what, expected", [
    ("ok", "RESULT True DistributedDataParallel"),
    ("hook", "orion: error: DDP communication hooks are not supported on vGPUs"),
    ("mixed_precision", "orion: error: DistributedDataParallel option mixed_precision is not "
                        "supported on vGPUs"),
])
def test_ddp_options_one_rank(two_gpus, tmp_path: Path, what: str, expected: str) -> None:
    ctl, _ = two_gpus
    env = dict(ddp_env(ctl, tmp_path / "c"), RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = run_script("ddp_options.py", env, what)
    out = proc.stdout + proc.stderr
    assert expected in out, out
    assert (proc.returncode == 0) == (what == "ok"), out
    assert "Traceback" not in out, out


def _launch_rank(rank: int, env: dict[str, str], port: int, mode: str, timeout_s: int,
                 out: Path) -> subprocess.Popen[bytes]:
    env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(out, "wb") as f:
        return subprocess.Popen([sys.executable, str(SCRIPTS / "ddp_peer_dies.py"), mode,
                                 str(timeout_s)], env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_peer_gone_mid_collective_is_a_clear_error(two_gpus, tmp_path: Path, mode: str) -> None:
    """No hang: a killed peer ends the collective at once (its worker's connections
    close), a peer that never comes ends it at the group's timeout."""
    ctl, _ = two_gpus
    env = ddp_env(ctl, tmp_path / "c")
    port = free_port()
    timeout_s = 600 if mode == "kill" else 5  # "kill" must not need the timeout
    outs = [tmp_path / f"rank{r}.out" for r in (0, 1)]
    procs = [_launch_rank(r, env, port, mode, timeout_s, outs[r]) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all("JOINED" in o.read_text(errors="replace") for o in outs):
            assert time.monotonic() < deadline and procs[0].poll() is None, outs[0].read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # rank 0 is now waiting inside its second all_reduce
        if mode == "kill":
            os.kill(procs[1].pid, signal.SIGKILL)
        rc = procs[0].wait(timeout=90)  # far below the 600 s timeout of "kill"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    text = outs[0].read_text(errors="replace")
    assert rc != 0, text
    assert "AFTER" not in text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "orion: error:" in line]
    assert len(errors) == 1, text
    assert "collective allreduce of process group" in errors[0]
    expected = ("peer rank's vGPU session ended" if mode == "kill"
                else "did not join the collective within the timeout")
    assert expected in errors[0], errors[0]
