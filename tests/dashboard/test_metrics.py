"""GET /metrics: scraped and parsed as Prometheus does, checked against a known pool."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from .conftest import AppClient, bearer

MIB = 1024 * 1024


def scrape(c: AppClient, token: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = c.client.get("/metrics", headers=bearer(token))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    series = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("orion_"), family.name
        for s in family.samples:
            series[(s.name, frozenset(s.labels.items()))] = s.value
    return series


def value(series: dict, metric: str, **labels: str) -> float:
    return series[(metric, frozenset(labels.items()))]


def test_metrics_match_a_known_pool(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="required")
    svc = c.service
    node_a = c.register("node-a", gpus=2, memory_mib=16384, vgpu_count=4)
    node_b = c.register("node-b", gpus=1, memory_mib=8192, vgpu_count=2)
    admin = c.api_token()
    c.add_user(admin, "alice", max_vgpus=4)
    c.add_user(admin, "bob")
    alice, bob = c.user_token(admin, "alice"), c.user_token(admin, "bob")

    # node-b goes silent long enough to be down; node-a keeps heart-beating
    svc.nodes[node_b].last_heartbeat -= 100
    svc.started_at -= 100
    svc.reap()
    assert svc.nodes[node_b].state == "down"

    a = c.client.post("/api/v1/allocations", json={"vgpu": 2, "gmem_mib": 4096, "ratio": 25},
                      headers=bearer(alice)).json()  # fmt: skip
    b = c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=bearer(bob)).json()
    refused = c.client.post("/api/v1/allocations", json={"gmem_mib": 99999}, headers=bearer(bob))
    assert refused.status_code == 409
    gpu0 = "EMU-node-a-0"
    assert {v["gpu_uuid"] for v in a["vgpus"] + b["vgpus"]} == {gpu0}  # binpack: one GPU
    beat = {"gpus": [{"uuid": gpu0, "mem_used_bytes": 300 * MIB, "busy_pct": 60.0}],
            "sessions": [{"allocation_id": a["id"], "vgpu_index": 0, "mem_used_bytes": 100 * MIB, "busy_pct": 50.0},
                         {"allocation_id": a["id"], "vgpu_index": 1, "mem_used_bytes": 200 * MIB, "busy_pct": 25.0}]}  # fmt: skip
    assert c.client.post(f"/api/v1/nodes/{node_a}/heartbeat", json=beat, headers=c.node_auth).json() == {"ok": True}

    m = scrape(c, admin)
    # nodes
    assert value(m, "orion_node_up", node="node-a") == 1 and value(m, "orion_node_up", node="node-b") == 0
    assert value(m, "orion_nodes", state="up") == 1 and value(m, "orion_nodes", state="down") == 1
    assert value(m, "orion_vgpus_total") == 8 and value(m, "orion_vgpus_free") == 5
    # GPUs
    g0 = {"node": "node-a", "gpu_uuid": gpu0, "gpu_index": "0"}
    g1 = {"node": "node-a", "gpu_uuid": "EMU-node-a-1", "gpu_index": "1"}
    assert value(m, "orion_gpu_memory_total_bytes", **g0) == 16384 * MIB
    assert value(m, "orion_gpu_memory_allocated_bytes", **g0) == 12288 * MIB
    assert value(m, "orion_gpu_memory_allocated_bytes", **g1) == 0
    assert value(m, "orion_gpu_memory_used_bytes", **g0) == 300 * MIB
    assert value(m, "orion_gpu_compute_allocated_ratio", **g0) == 0.75
    assert value(m, "orion_gpu_busy_ratio", **g0) == 0.6
    assert value(m, "orion_gpu_vgpus", **g0) == 3 and value(m, "orion_gpu_vgpu_slots", **g0) == 4
    assert value(m, "orion_gpu_info", **g0, name="Emulated GPU 16384 MiB", emulated="true") == 1
    assert value(m, "orion_gpu_memory_total_bytes", node="node-b", gpu_uuid="EMU-node-b-0",
                 gpu_index="0") == 8192 * MIB  # fmt: skip
    # vGPUs
    v0 = {**g0, "allocation": a["id"], "vgpu": "0", "user": "alice"}
    v1 = {**g0, "allocation": a["id"], "vgpu": "1", "user": "alice"}
    vb = {**g0, "allocation": b["id"], "vgpu": "0", "user": "bob"}
    assert value(m, "orion_vgpu_memory_limit_bytes", **v0) == 4096 * MIB
    assert value(m, "orion_vgpu_memory_used_bytes", **v0) == 100 * MIB
    assert value(m, "orion_vgpu_memory_used_bytes", **v1) == 200 * MIB
    assert value(m, "orion_vgpu_busy_ratio", **v1) == 0.25
    assert value(m, "orion_vgpu_compute_limit_ratio", **vb) == 0.25
    assert value(m, "orion_vgpu_memory_used_bytes", **vb) == 0  # its session has not started
    # allocations, users
    assert value(m, "orion_allocations", state="active", user="alice") == 1  # both sessions listed
    assert value(m, "orion_allocations", state="pending", user="bob") == 1
    assert value(m, "orion_allocations_created_total", user="alice") == 1
    assert value(m, "orion_user_vgpus", user="alice") == 2
    assert value(m, "orion_user_memory_allocated_bytes", user="bob") == 4096 * MIB
    assert value(m, "orion_user_limit_vgpus", user="alice") == 4
    assert ("orion_user_limit_vgpus", frozenset({("user", "bob")})) not in m
    # scheduler latency and failures
    assert value(m, "orion_scheduler_latency_seconds_count", result="granted") == 2
    assert value(m, "orion_scheduler_latency_seconds_count", result="no_fit") == 1
    assert value(m, "orion_scheduler_latency_seconds_bucket", result="granted", le="+Inf") == 2
    assert value(m, "orion_request_failures_total", reason="insufficient_resources") == 1

    # after a release and a refused stranger, the counters move
    assert c.client.delete(f"/api/v1/allocations/{b['id']}", headers=bearer(bob)).status_code == 200
    assert c.client.post("/api/v1/allocations", json={}).status_code == 401
    m = scrape(c, c.pool_token)  # Prometheus may scrape with the pool token too
    assert value(m, "orion_allocations_ended_total", state="released", user="bob") == 1
    assert ("orion_allocations", frozenset({("state", "pending"), ("user", "bob")})) not in m
    assert value(m, "orion_request_failures_total", reason="unauthorized") >= 1
    assert value(m, "orion_gpu_memory_allocated_bytes", **g0) == 8192 * MIB


def test_metrics_follow_the_read_policy(app_factory: Callable[..., AppClient]) -> None:
    closed = app_factory(auth="required")
    assert closed.client.get("/metrics").status_code == 401
    assert closed.client.get("/metrics", headers=bearer("nope-nope")).status_code == 401
    public = app_factory(auth="required", public_read=True)
    assert public.client.get("/metrics").status_code == 200


def test_docs_and_grafana_dashboard_name_only_real_series(app_factory: Callable[..., AppClient]) -> None:
    import json
    import re
    from pathlib import Path

    c = app_factory(auth="open")
    c.register("node-a")
    admin = c.api_token()
    c.add_user(admin, "alice", max_vgpus=2, max_gmem_mib=8192)
    alice = bearer(c.user_token(admin, "alice"))
    c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=alice)
    ended = c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=alice).json()
    c.client.delete(f"/api/v1/allocations/{ended['id']}", headers=alice)
    c.client.post("/api/v1/allocations", json={"gmem_mib": 10**6})  # a refusal
    text = c.client.get("/metrics").text
    families = {f.name for f in text_string_to_metric_families(text)}
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    docs = Path(__file__).resolve().parents[2] / "docs"
    documented = set(re.findall(r"`(orion_[a-z_]+)`", (docs / "metrics.md").read_text()))
    counters = {f"{n}_total" for n in families}
    assert families - documented - {n[:-6] for n in documented if n.endswith("_total")} == set()
    assert documented - families - counters == set(), "docs/metrics.md names a series nobody emits"
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"orion_[a-z_]+", e)}
    assert used and used <= samples, used - samples
