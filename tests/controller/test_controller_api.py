"""Scheduling over the real REST API of a controller subprocess."""

from __future__ import annotations

import httpx

from orion_vgpu.protocol.grant import grant_key, verify_grant
from pool import ControllerProc


def placed_on(alloc: dict) -> list[tuple[str, int]]:
    return [(v["node_name"], v["gpu_index"]) for v in alloc["vgpus"]]


def test_info_and_pool_counts(controller: ControllerProc) -> None:
    info = controller.get("/info").json()
    assert info["name"] == "orion-controller"
    assert (info["api_version"], info["data_version"]) == ("0.1", "0.1")
    controller.register_node("node-a", gpus=2, memory_mib=16384, vgpu_count=4)
    pool = controller.pool()
    assert (pool["vgpu_total"], pool["vgpu_free"]) == (8, 8)
    gpu = pool["gpus"][0]
    assert gpu["node_name"] == "node-a" and gpu["state"] == "up" and gpu["vgpu_free"] == 4
    assert gpu["memory_mib"] == 16384 and gpu["emulated"] is True
    assert pool["nodes"][0]["name"] == "node-a"


def test_placements_12000_two_gpus_4000_binpack_one_spread_two(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    a = controller.allocate(vgpu=2, gmem_mib=12000)
    assert a.status_code == 201, a.text
    assert sorted(placed_on(a.json())) == [("node-a", 0), ("node-a", 1)]
    controller.delete(f"/allocations/{a.json()['id']}")

    b = controller.allocate(vgpu=2, gmem_mib=4000).json()
    assert placed_on(b) == [("node-a", 0), ("node-a", 0)]
    controller.delete(f"/allocations/{b['id']}")

    c = controller.allocate(vgpu=2, gmem_mib=4000, policy="spread").json()
    assert sorted(placed_on(c)) == [("node-a", 0), ("node-a", 1)]
    assert {v["gmem_mib"] for v in c["vgpus"]} == {4000}
    assert {v["ratio"] for v in c["vgpus"]} == {25}


def test_allocation_fields_and_grants(controller: ControllerProc) -> None:
    node_id = controller.register_node("node-a")
    r = controller.allocate(vgpu=1, user="alice", host="h1", pid=123, command="python train.py")
    a = r.json()
    assert a["state"] == "pending" and a["user"] == "alice" and a["pid"] == 123
    assert a["lease_expires_at"] > a["created_at"] and a["ended_at"] is None
    v = a["vgpus"][0]
    assert (v["node_id"], v["node_addr"], v["gmem_mib"], v["ratio"]) == (
        node_id,
        "127.0.0.1:9960",
        4096,
        25,
    )
    claims = verify_grant(grant_key(controller.token), v["grant"])
    assert claims["alloc"] == a["id"] and claims["node"] == node_id and claims["vgpu"] == 0
    assert claims["gpu"] == v["gpu_uuid"] and claims["gmem_mib"] == 4096 and claims["ratio"] == 25
    got = controller.get(f"/allocations/{a['id']}").json()
    assert got["id"] == a["id"] and got["vgpus"][0]["grant"] is None  # grants only once
    assert [x["id"] for x in controller.get("/allocations").json()] == [a["id"]]
    log = controller.log()
    assert f"allocation {a['id']} granted 1 vGPU on node-a (gpu 0) to alice@h1 pid 123" in log
    assert controller.token not in log


def test_refusals_name_the_constraint(controller: ControllerProc) -> None:
    r = controller.allocate(vgpu=1)
    assert r.status_code == 409 and r.json()["error"] == "insufficient_resources"
    assert "no GPU node has registered" in r.json()["detail"]
    controller.register_node("node-a")
    r = controller.allocate(vgpu=1, gmem_mib=20000)
    assert r.status_code == 409
    assert r.json()["detail"].startswith(
        "no GPU has 20000 MiB free for one vGPU: largest free is 16384 MiB on node-a GPU 0"
    )
    r = controller.allocate(vgpu=2, cross_node=True, ratio=50)
    assert r.status_code == 400
    assert r.json() == {
        "error": "bad_request",
        "detail": "ORION_CROSS_NODE=1 requires ORION_RATIO=100",
    }


def test_cross_node_spans_two_nodes(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    controller.register_node("node-b")
    assert controller.allocate(vgpu=4, ratio=100).status_code == 409
    r = controller.allocate(vgpu=4, ratio=100, cross_node=True)
    assert r.status_code == 201, r.text
    placed = placed_on(r.json())
    assert {n for n, _ in placed} == {"node-a", "node-b"} and len(set(placed)) == 4
    assert controller.pool()["vgpu_free"] == 0


def test_errors_are_json_everywhere(controller: ControllerProc) -> None:
    r = controller.get("/allocations/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.get(controller.url + "/no/such/route")
    assert r.status_code == 404 and set(r.json()) == {"error", "detail"}
    r = controller.post("/allocations", {"vgpu": 0})
    assert (
        r.status_code == 422
        and r.json()["error"] == "invalid_request"
        and "vgpu" in r.json()["detail"]
    )
    r = httpx.post(
        controller.api + "/allocations",
        content=b"not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = httpx.put(controller.api + "/info")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_server_endpoints_need_the_pool_token(controller: ControllerProc) -> None:
    from pool import node_body

    wrong = {"Authorization": "Bearer wrong"}
    for headers in ({}, wrong):
        r = controller.post("/nodes/register", node_body("node-a"), headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert (
            controller.post("/nodes/x/heartbeat", {"gpus": []}, headers=headers).status_code == 401
        )
        body = {"type": "session_started", "allocation_id": "x", "vgpu_index": 0}
        assert controller.post("/nodes/x/events", body, headers=headers).status_code == 401
    assert controller.post("/nodes/register", {}, headers=wrong).status_code == 401  # auth first
    node_id = controller.register_node("node-a")
    assert controller.heartbeat(node_id).json() == {"ok": True}
    r = controller.heartbeat("unknown-node")
    assert r.status_code == 404 and r.json()["error"] == "unknown_node"


def test_reregistration_keeps_node_id_and_updates_gpus(controller: ControllerProc) -> None:
    first = controller.register_node("node-a", gpus=2)
    assert controller.register_node("node-a", gpus=3) == first
    assert controller.pool()["vgpu_total"] == 12


def test_list_filters_by_state(controller: ControllerProc) -> None:
    controller.register_node("node-a")
    a = controller.allocate().json()
    b = controller.allocate().json()
    controller.delete(f"/allocations/{a['id']}")
    assert [x["id"] for x in controller.get("/allocations", params={"state": "active"}).json()] == [
        b["id"]
    ]
    ended = controller.get("/allocations", params={"state": "ended"}).json()
    assert [(x["id"], x["state"], x["end_reason"]) for x in ended] == [
        (a["id"], "released", "released by client")
    ]
    assert len(controller.get("/allocations", params={"state": "all"}).json()) == 2
    assert controller.get("/allocations", params={"state": "bogus"}).status_code == 422
