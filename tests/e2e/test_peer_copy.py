"""Copies between a program's vGPUs go server to server (docs/data-plane.md, "Peer
copies"): on one node over the workers' Unix socket, across nodes over TCP. The results
match the local run, and no tensor byte of a copy passes through the client."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from e2e.cluster import ServerProc, client_env, run_local, run_script, two_nodes
from pool import ControllerProc

BIG = 48 << 20  # the script's large tensor, bytes


def _lines(stdout: str, tag: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(tag)]


def _result(proc) -> dict[str, str]:  # noqa: ANN001
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for tag in ("RESULT", "DEVICES", "COPY_BYTES"):
        found = _lines(proc.stdout, tag)
        assert len(found) == 1, proc.stdout
        out[tag] = found[0]
    return out


def _same(remote: str, local: str) -> bool:
    """The same RESULT values (sums may differ in the last bits with the reduction order)."""
    a, b = remote.split()[1:], local.split()[1:]
    return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-6)
                                    for x, y in zip(a, b, strict=True))


def _session_logs(*servers: ServerProc) -> str:
    return "".join(p.read_text() for s in servers for p in s.session_logs())


def test_copies_on_one_node_go_between_workers(pool, tmp_path: Path) -> None:
    ctl, srv = pool
    local = _result(run_local("peer_copy.py"))
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="2000")
    remote = _result(run_script("peer_copy.py", env))
    assert _same(remote["RESULT"], local["RESULT"]), (remote, local)
    assert remote["RESULT"].split()[1] == "0.0"  # the copy kept the value it had at .to()
    assert remote["DEVICES"] == "DEVICES ['cuda:0', 'cuda:1']"
    assert remote["COPY_BYTES"] == "COPY_BYTES 0"  # nothing came through the client
    logs = _session_logs(srv)
    assert re.search(rf"peer copy: received {BIG} bytes from unix:@orion-peer-[0-9a-f]+ "
                     r"through shared memory", logs), logs
    # The same program with peer copies off moves the bytes through itself: the counter
    # above does see them.
    env = client_env(ctl, tmp_path / "d", ORION_VGPU="2", ORION_GMEM="2000",
                     ORION_PEER_COPY="0")
    relayed = _result(run_script("peer_copy.py", env))
    assert _same(relayed["RESULT"], local["RESULT"]), (relayed, local)
    assert int(relayed["COPY_BYTES"].split()[1]) >= 2 * BIG


def test_copies_across_nodes_go_between_servers_over_tcp(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (ctl, a, b):
        env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="2000",
                         ORION_RATIO="100", ORION_CROSS_NODE="1")
        remote = _result(run_script("peer_copy.py", env))
        local = _result(run_local("peer_copy.py"))
        assert _same(remote["RESULT"], local["RESULT"]), (remote, local)
        assert remote["COPY_BYTES"] == "COPY_BYTES 0"
        # vGPU 1 is on the other node: it pulled from vGPU 0's server over TCP.
        logs = _session_logs(a, b)
        assert re.search(rf"peer copy: received {BIG} bytes from 127\.0\.0\.1:\d+ through the "
                         r"socket", logs), logs
        assert "unix:@orion-peer-" not in logs
        allocs = ctl.get("/allocations", params={"state": "all"}).json()
        allocs = allocs if isinstance(allocs, list) else allocs["allocations"]
        assert {v["node_name"] for v in allocs[-1]["vgpus"]} == {"node-a", "node-b"}


def test_bad_copies_fail_clearly_and_unreceived_ones_are_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ttl = 3
    monkeypatch.setenv("ORION_PEER_TTL_S", str(ttl))  # inherited by oriond and its workers
    ctl = ControllerProc(tmp_path / "controller", {"lease_s": 10})
    ctl.start()
    srv = ServerProc(ctl, tmp_path / "server")
    try:
        srv.start()
        env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="64",
                         PEER_TTL=str(ttl))
        proc = run_script("peer_errors.py", env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
        assert "ROUTE unix" in proc.stdout
        assert out["FIRST"] == "ok"
        assert out["UNKNOWN"].startswith("RuntimeError: copy from another vGPU failed:")
        assert "unknown transfer id" in out["UNKNOWN"]
        assert "unknown transfer id" in out["REPLAY"]  # an id is good for one copy
        # Never a socket file such as a daemon's: only the workers' own abstract names.
        assert out["NOT_PEER_NAME"].startswith("OrionError: the Orion Server rejected a "
                                               "message: peer address ['unix', '/tmp/")
        assert "is not a peer endpoint" in out["NOT_PEER_NAME"]
        assert "is not an Orion peer endpoint" in out["NOT_PEER_TCP"]
        assert out["EXPIRED"].endswith(f"the transfer expired: not received within {ttl} s")
        assert f"HELD {4 << 20} AFTER_TTL 0" in proc.stdout  # the snapshot's memory came back
        assert f"NO_ROOM {10 << 20}.0 {80 << 20}" in proc.stdout  # fetched and uploaded
        assert "RESULT 1048575.0 549755289600.0" in proc.stdout  # good copies still work
        assert "Traceback" not in proc.stderr
        # The session ended with one snapshot nobody took: dropped, its memory freed.
        logs = _session_logs(srv)
        assert re.search(r"1 expired unreceived, 1 dropped at session end \(4\.0 MiB freed\)",
                         logs), logs
    finally:
        srv.stop()
        ctl.stop()
