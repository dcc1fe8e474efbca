"""How allocations end, survive restarts and wait for room (real controller processes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from pool import ControllerProc


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def state_of(ctl: ControllerProc, alloc_id: str) -> dict:
    return ctl.get(f"/allocations/{alloc_id}").json()


def test_delete_releases(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    a = controller.allocate(vgpu=8).json()
    assert controller.pool()["vgpu_free"] == 0
    r = controller.delete(f"/allocations/{a['id']}")
    assert r.status_code == 200
    assert (r.json()["state"], r.json()["end_reason"]) == ("released", "released by client")
    assert r.json()["ended_at"] is not None
    assert controller.pool()["vgpu_free"] == 8
    assert controller.delete(f"/allocations/{a['id']}").json()["state"] == "released"  # idempotent


def test_lease_lapse_expires_and_sessions_keep_it(
    controller_factory: Callable[..., ControllerProc],
) -> None:
    ctl = controller_factory(lease_s=0.6)
    node = ctl.register_node("node-a")
    lapsing = ctl.allocate(vgpu=2, gmem_mib=12000).json()
    kept = ctl.allocate(vgpu=1, gmem_mib=1000).json()
    assert ctl.event(node, "session_started", kept["id"], 0).json() == {"ok": True}
    assert state_of(ctl, kept["id"])["state"] == "active"
    wait_until(lambda: state_of(ctl, lapsing["id"])["state"] == "expired")
    assert "lease expired" in state_of(ctl, lapsing["id"])["end_reason"]
    time.sleep(0.3)
    assert state_of(ctl, kept["id"])["state"] == "active"
    assert ctl.pool()["vgpu_free"] == 7
    # a session for an ended allocation is refused, so the server can close it
    r = ctl.event(node, "session_started", lapsing["id"], 0)
    assert r.status_code == 409 and r.json()["error"] == "allocation_ended"


def test_partial_sessions_keep_pending_until_all_start(controller: ControllerProc) -> None:
    node = controller.register_node("node-a")
    a = controller.allocate(vgpu=2, gmem_mib=12000).json()
    controller.event(node, "session_started", a["id"], 0)
    assert state_of(controller, a["id"])["state"] == "pending"
    controller.event(node, "session_started", a["id"], 1)
    got = state_of(controller, a["id"])
    assert got["state"] == "active" and all(v["session_started"] for v in got["vgpus"])
    r = controller.event(node, "session_started", a["id"], 5)
    assert r.status_code == 400


def test_session_ended_event_releases(controller: ControllerProc) -> None:
    node = controller.register_node("node-a")
    a = controller.allocate(vgpu=1).json()
    controller.event(node, "session_started", a["id"], 0)
    controller.event(node, "session_ended", a["id"], 0, reason="process 123 exited")
    got = state_of(controller, a["id"])
    assert (got["state"], got["end_reason"]) == ("released", "process 123 exited")
    assert controller.pool()["vgpu_free"] == 8
    assert controller.event(node, "session_ended", a["id"], 0).json() == {"ok": True}


def test_node_down_ends_allocations_and_heartbeat_brings_it_back(
    controller_factory: Callable[..., ControllerProc],
) -> None:
    ctl = controller_factory(heartbeat_interval_s=0.2)  # node down after 0.6 s of silence
    node = ctl.register_node("node-a")
    other = ctl.register_node("node-b")
    a = ctl.allocate(vgpu=1).json()
    assert a["vgpus"][0]["node_name"] == "node-a"
    ctl.event(node, "session_started", a["id"], 0)
    stop = threading.Event()

    def beat_b() -> None:
        while not stop.is_set():
            ctl.heartbeat(other)
            time.sleep(0.1)

    beater = threading.Thread(target=beat_b)
    beater.start()
    try:
        wait_until(lambda: state_of(ctl, a["id"])["state"] == "failed")
        assert state_of(ctl, a["id"])["end_reason"] == "node down"
        pool = ctl.pool()
        states = {n["name"]: n["state"] for n in pool["nodes"]}
        assert states == {"node-a": "down", "node-b": "up"}
        assert (pool["vgpu_total"], pool["vgpu_free"]) == (8, 8)
        assert ctl.heartbeat(node).status_code == 200
        assert {n["name"]: n["state"] for n in ctl.pool()["nodes"]}["node-a"] == "up"
    finally:
        stop.set()
        beater.join()
    assert "node node-a is down" in ctl.log()


def test_session_missing_from_heartbeats_ends_allocation(
    controller_factory: Callable[..., ControllerProc],
) -> None:
    ctl = controller_factory(heartbeat_interval_s=0.2)
    node = ctl.register_node("node-a")
    a = ctl.allocate(vgpu=1).json()
    listed = [{"allocation_id": a["id"], "vgpu_index": 0, "mem_used_bytes": 1, "busy_pct": 0}]
    ctl.heartbeat(node, sessions=listed)  # proves the session started (no event needed)
    assert state_of(ctl, a["id"])["state"] == "active"
    deadline = time.monotonic() + 5
    while state_of(ctl, a["id"])["state"] == "active":
        assert time.monotonic() < deadline
        ctl.heartbeat(node, sessions=[])  # server restarted: it no longer has the session
        time.sleep(0.1)
    got = state_of(ctl, a["id"])
    assert got["state"] == "failed" and "stopped reporting" in got["end_reason"]


def test_restart_after_kill_keeps_nodes_and_allocations(controller: ControllerProc) -> None:
    node = controller.register_node("node-a")
    active = controller.allocate(vgpu=2, gmem_mib=12000).json()
    for i in range(2):
        controller.event(node, "session_started", active["id"], i)
    pending = controller.allocate(vgpu=1, gmem_mib=1000).json()
    released = controller.allocate(vgpu=1).json()
    controller.delete(f"/allocations/{released['id']}")
    token = controller.token

    controller.restart(kill=True)  # SIGKILL: no graceful shutdown
    assert controller.token == token
    pool = controller.pool()
    assert [(n["name"], n["state"]) for n in pool["nodes"]] == [("node-a", "down")]
    assert pool["vgpu_free"] == 0
    assert state_of(controller, active["id"])["state"] == "active"
    assert state_of(controller, pending["id"])["state"] == "pending"
    assert state_of(controller, released["id"])["state"] == "released"
    assert controller.heartbeat(node).json() == {"ok": True}  # the same node id still works
    pool = controller.pool()
    assert pool["nodes"][0]["state"] == "up"
    # Placements were re-applied: one GPU holds 12000 MiB (4384 free: one 4096-MiB default
    # vGPU fits), the other 12000 + 1000 MiB (3384 free: none fits).
    assert pool["vgpu_free"] == 1
    assert controller.register_node("node-a") == node


def test_wait_s_queues_until_room(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    full = controller.allocate(vgpu=8).json()
    t0 = time.monotonic()
    r = controller.allocate(vgpu=1, wait_s=0.3)
    assert r.status_code == 409 and "(waited 0.3 s)" in r.json()["detail"]
    assert 0.25 < time.monotonic() - t0 < 2

    result: dict[str, httpx.Response] = {}
    waiter = threading.Thread(
        target=lambda: result.update(r=controller.allocate(vgpu=4, wait_s=10))
    )
    waiter.start()
    time.sleep(0.3)
    assert "r" not in result
    t0 = time.monotonic()
    controller.delete(f"/allocations/{full['id']}")
    waiter.join(5)
    assert result["r"].status_code == 201
    assert time.monotonic() - t0 < 1.0
    assert controller.pool()["vgpu_free"] == 4


def test_waiter_that_hung_up_takes_nothing(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    full = controller.allocate(vgpu=8).json()
    body = {"vgpu": 1, "wait_s": 30}
    try:
        httpx.post(controller.api + "/allocations", json=body, timeout=0.3)
    except httpx.TimeoutException:
        pass  # the client gives up and closes its connection
    controller.delete(f"/allocations/{full['id']}")
    time.sleep(0.3)
    assert controller.get("/allocations").json() == []
    assert controller.pool()["vgpu_free"] == 8
