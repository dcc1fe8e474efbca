"""The pages' data (views) and their HTML: usage per period, paging, filters, charts,
the partial refresh, and escaping of what nodes and clients send."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from orion_vgpu.controller.history import Sample
from orion_vgpu.controller.store import StoredAllocation, StoredVgpu

from .conftest import AppClient, bearer


def ended(c: AppClient, user: str, start: float, end: float, vgpus: int, mib: int) -> str:
    node = next(iter(c.service.nodes.values()))
    a = StoredAllocation(
        id=str(uuid.uuid4()), state="released", user=user, host="h", pid=1, command="cmd",
        created_at=start, ended_at=end, end_reason="released by client", lease_expires_at=start,
        request={}, vgpus=[StoredVgpu(i, node.id, node.gpus[0].uuid, 0, mib, 25, True)
                           for i in range(vgpus)],
    )  # fmt: skip
    c.service.store.insert_allocation(a)
    return a.id


def test_usage_per_user_over_a_period(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()
    c.register("node-a")
    now = time.time()
    ended(c, "x", now - 7200, now - 3600, 2, 1024)  # 1 h of 2 vGPUs, 2 GiB
    ended(c, "y", now - 2 * 86400, now - 3600, 1, 4096)  # 23 h of it fall in the last 24 h
    ended(c, "z", now - 3 * 86400, now - 2 * 86400, 1, 4096)  # before the period
    usage = c.service.store.usage_by_user(now - 86400, now)
    assert set(usage) == {"x", "y"}
    assert usage["x"] == {"allocations": 1, "vgpu_hours": pytest.approx(2, abs=0.01),
                          "gmem_gib_hours": pytest.approx(2, abs=0.01)}  # fmt: skip
    assert usage["y"]["vgpu_hours"] == pytest.approx(23, abs=0.01)
    assert usage["y"]["gmem_gib_hours"] == pytest.approx(92, abs=0.05)
    admin = c.api_token()
    page = c.client.get("/api/v1/dashboard/users?period=7d", headers=bearer(admin)).json()
    assert {o["name"] for o in page["others"]} == {"x", "y", "z"} and page["period"] == "7d"


def test_tasks_paging_and_user_filter(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="open")
    c.register("node-a")
    now = time.time()
    ids = [ended(c, "ann" if i % 2 else "ben", now - 100 + i, now - 50 + i, 1, 1024) for i in range(5)]
    c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "ann", "pid": 77, "command": "x"})
    r = c.client.get("/api/v1/dashboard/tasks?fpage=2").json()
    assert r["running"]["total"] == 1 and r["running"]["items"][0]["pid"] == 77
    assert r["finished"]["total"] == 5 and r["finished"]["page"] == 1  # 50 per page: one page
    from orion_vgpu.controller import views

    paged = views.tasks(c.service, finished_page=2, per_page=2)
    assert (paged["finished"]["pages"], [t["id"] for t in paged["finished"]["items"]]) == (3, ids[2:0:-1])
    only = c.client.get("/api/v1/dashboard/tasks?user=ann").json()
    assert only["finished"]["total"] == 2 and {t["user"] for t in only["finished"]["items"]} == {"ann"}
    assert only["running"]["total"] == 1
    html = c.client.get("/tasks?user=ann").text
    assert html.count("data-alloc=") == 3


def test_nodes_filter_paging_and_node_map(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="open")
    for i in range(25):
        c.register(f"node-{i}", gpus=1)
    c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "ann"})
    data = c.client.get("/api/v1/dashboard/nodes?per_page=10&page=3").json()
    assert (data["total"], data["pages"], data["page"]) == (25, 3, 3)
    assert [n["name"] for n in data["nodes"]] == [f"node-{i}" for i in range(20, 25)]  # natural order
    assert len(data["overview"]) == 25
    only = c.client.get("/api/v1/dashboard/nodes?q=node-1").json()
    assert [n["name"] for n in only["nodes"]] == ["node-1"] + [f"node-{i}" for i in range(10, 20)]
    html = c.client.get("/nodes?per_page=500").text  # pages show at most 100 nodes
    assert html.count('class="card node ') == 25 and html.count('class="cell ') == 25
    holder = [g for n in c.client.get("/api/v1/dashboard/nodes?per_page=100").json()["nodes"]
              for g in n["gpus"] if g["vgpus"]]  # fmt: skip
    assert len(holder) == 1 and holder[0]["vgpus"][0]["user"] == "ann"


def test_summary_charts_from_samples_and_partial_refresh(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="open")
    c.register("node-a")
    svc = c.service
    svc.history.samples.clear()
    now = time.time()
    for i in range(10):
        per_user = {"ann": [1, 4096, 1]} if i > 4 else {}
        svc.history.record(Sample(now - 600 + 60 * i, 8, int(i > 4), 32768, 4096 * (i > 4), 0.0,
                                  200, 25 * (i > 4), 0.0, int(i > 4), 1, 0, per_user))  # fmt: skip
    data = c.client.get("/api/v1/dashboard/summary?hours=1").json()
    h = data["history"]
    assert len(h["t"]) == 11  # ten samples and "now"
    assert h["mem_alloc_mib"][:6] == [0, 0, 0, 0, 0, 4096] and h["per_user_gmem_mib"]["ann"][-2] == 4096
    page = c.client.get("/?hours=1").text
    assert page.count('<svg class="chart"') == 4 and page.count("<polyline") == 9
    assert "-10m" in page  # the x axis spans the history there is, not an empty hour
    partial = c.client.get("/", headers={"X-Orion-Partial": "1"})
    assert partial.status_code == 200 and "<html" not in partial.text and 'data-k="vgpus.free"' in partial.text


def test_names_from_nodes_and_clients_are_escaped(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="open")
    c.register("<script>alert(1)</script>")
    c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "<img src=x onerror=alert(1)>",
                                               "command": "\"><script>x</script>"})  # fmt: skip
    for path in ("/", "/tasks", "/nodes"):
        html = c.client.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html and "<script>x" not in html
    metrics = c.client.get("/metrics").text
    assert 'node="<script>alert(1)</script>"' in metrics  # exposition text, not HTML
