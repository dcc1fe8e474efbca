"""A session must not outlive its allocation: its vGPU may be someone else's by then.

Two ways an allocation ends while oriond would still serve it: a grant used after its
allocation's lease lapsed (the grant outlives the lease by a grace period), and an
allocation released through the API while its program runs. In both the controller tells
the node to end the session; the client gets one clear error naming the reason, the worker
exits, and the pool shows the vGPU free once, not twice.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgpack
import torch

import orion_vgpu
from faults.procs import (
    Cluster,
    Oriond,
    assert_one_clear_error,
    check_pool,
    client_env,
    wait_for,
)
from orion_vgpu.protocol import frames
from orion_vgpu.protocol import messages as m

LEASE_S = 2.0


def _hello(grant: str) -> dict:
    return {"kind": m.HELLO, "protocol": orion_vgpu.PROTOCOL_VERSION,
            "version": orion_vgpu.__version__, "torch": torch.__version__, "grant": grant,
            "client": {"host": "test", "pid": 1, "user": "alice", "command": "stale grant"},
            "shm": None}


def test_a_grant_used_after_its_lease_lapsed_gets_no_session(cluster: Cluster) -> None:
    ctl = cluster.controller(lease_s=LEASE_S, heartbeat_interval_s=0.5)
    srv = cluster.server(ctl, emulated_gpus="1x4GiB", vgpu_count=1)
    r = ctl.post("/allocations", json={"vgpu": 1, "gmem_mib": 256, "user": "alice"})
    assert r.status_code == 201, r.text
    alloc = r.json()
    vgpu = alloc["vgpus"][0]
    # No session within the lease: the allocation expires and its vGPU is free again.
    assert wait_for(lambda: ctl.allocation(alloc["id"])["state"] == "expired", 10 * LEASE_S)
    assert check_pool(ctl, active=0)["vgpu_free"] == 1
    # Someone else now holds that vGPU.
    other = ctl.post("/allocations", json={"vgpu": 1, "gmem_mib": 256, "user": "bob"})
    assert other.status_code == 201, other.text
    assert other.json()["vgpus"][0]["gpu_uuid"] == vgpu["gpu_uuid"]

    # The stale grant is still signed and unexpired, so the handshake passes...
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(vgpu["unix_socket"])
    frames.send_frame(sock, msgpack.packb(_hello(vgpu["grant"])))
    body, _ = frames.recv_frame(sock)
    assert msgpack.unpackb(bytes(body), raw=False)["kind"] == m.WELCOME
    # ...but the controller refuses the session's start and oriond ends it.
    assert wait_for(lambda: _ended(srv, alloc["id"]), 15), srv.server_log()
    # The worker said why before closing: a client reads it at its next op (a send on
    # the closed connection fails; the client then reads these last words).
    body, _ = frames.recv_frame(sock)
    reply = msgpack.unpackb(bytes(body), raw=False)
    assert reply[:2] == [m.REPLY_ERROR, m.ERR_SESSION_ENDED], reply
    assert "lease expired" in reply[2] and alloc["id"] in reply[2], reply
    sock.close()
    # The expired allocation stayed expired; the vGPU is held once, by bob.
    assert ctl.allocation(alloc["id"])["state"] == "expired"
    pool = check_pool(ctl, active=1)
    assert pool["vgpu_free"] == 0
    assert f"allocation {alloc['id']}" in srv.server_log()


def test_releasing_a_running_allocation_ends_its_program(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    ctl = cluster.controller(heartbeat_interval_s=0.5)
    srv = cluster.server(ctl)
    prog = cluster.program("ticker.py", client_env(ctl, tmp_path / "p"))
    prog.expect("TICK 2")
    (alloc,) = [a for a in ctl.all_allocations() if a["pid"] == prog.pid]
    worker = srv.worker_of(alloc["id"])
    r = ctl.delete(f"/allocations/{alloc['id']}")
    assert r.status_code == 200, r.text
    prog.wait(30)
    err = assert_one_clear_error(prog, "ended this session", alloc["id"], "released")
    assert "rerun the program" in err
    assert wait_for(lambda: _ended(srv, alloc["id"]), 10), srv.server_log()
    assert wait_for(lambda: not Path(f"/proc/{worker}").exists(), 10)
    assert ctl.allocation(alloc["id"])["state"] == "released"
    check_pool(ctl, active=0)


def _ended(srv: Oriond, alloc_id: str) -> bool:
    return f"session ended (alloc {alloc_id} vgpu 0)" in srv.server_log()
