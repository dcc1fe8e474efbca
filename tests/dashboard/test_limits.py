"""Per-user limits (max vGPUs, max GPU memory) enforced by the scheduler."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from orion_vgpu.controller.scheduler import GpuSpec, Limits, OverLimit, Request, Scheduler

from .conftest import AppClient, bearer


def scheduler() -> Scheduler:
    s = Scheduler()
    s.upsert_node("n1", "node-a", 4, [GpuSpec(i, f"u{i}", "emu", 16384, True) for i in range(2)])
    return s


def test_scheduler_counts_holdings_per_user_and_refuses_over_the_limit() -> None:
    s = scheduler()
    caps = Limits(max_vgpus=2, max_gmem_mib=10000)
    s.allocate("a1", Request(1), "alice", caps)  # 4096 MiB default
    with pytest.raises(OverLimit) as over:
        s.allocate("a2", Request(1, gmem_mib=8000), "alice", caps)
    assert over.value.can_wait  # fits once alice releases something
    assert str(over.value).startswith(
        "user alice may hold at most 2 vGPU and 10000 MiB GPU memory: holds 1 vGPU / 4096 MiB, "
        "asked 1 vGPU / 8000 MiB")
    with pytest.raises(OverLimit) as alone:
        s.allocate("a3", Request(3), "alice", caps)
    assert not alone.value.can_wait
    s.allocate("a4", Request(1), "alice", caps)
    assert (s.holding("alice").vgpus, s.holding("alice").gmem_mib) == (2, 8192)
    s.allocate("b1", Request(2), "bob", caps)  # limits are per user
    s.release("a1")
    assert (s.holding("alice").vgpus, s.holding("alice").allocations) == (1, 1)
    assert s.vgpu_free() == 8 - 3
    s.release("a4")
    assert "alice" not in s.usage


def test_lost_allocations_give_back_their_users_share() -> None:
    s = scheduler()
    s.allocate("a1", Request(1), "alice")
    lost = s.upsert_node("n1", "node-a", 4, [GpuSpec(1, "u1", "emu", 16384, True)])
    assert lost == ["a1"] and "alice" not in s.usage


def test_api_refuses_over_limit_clearly(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()
    c.register("node-a")
    admin = c.api_token()
    c.add_user(admin, "alice", max_vgpus=2, max_gmem_mib=8192)
    alice = c.user_token(admin, "alice")
    ok = c.client.post("/api/v1/allocations", json={"vgpu": 2}, headers=bearer(alice))
    assert ok.status_code == 201
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=bearer(alice))
    assert r.status_code == 409 and r.json()["error"] == "limit_exceeded"
    assert "user alice may hold at most 2 vGPU and 8192 MiB" in r.json()["detail"]
    # alone over the limit: refused at once even with a wait
    t0 = time.monotonic()
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1, "gmem_mib": 9000, "wait_s": 5},
                      headers=bearer(alice))  # fmt: skip
    assert r.status_code == 409 and time.monotonic() - t0 < 2 and "waited" not in r.json()["detail"]
    # raise the limit: the same request now passes
    r = c.client.patch("/api/v1/users/alice", json={"max_vgpus": None, "max_gmem_mib": None},
                       headers=bearer(admin))  # fmt: skip
    assert r.json()["max_vgpus"] is None
    assert c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=bearer(alice)).status_code == 201


def test_a_user_at_the_limit_waits_for_their_own_release(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()
    c.register("node-a")
    admin = c.api_token()
    c.add_user(admin, "alice", max_vgpus=1)
    alice = c.user_token(admin, "alice")
    first = c.client.post("/api/v1/allocations", json={"vgpu": 1}, headers=bearer(alice)).json()
    threading.Timer(0.5, lambda: c.client.delete(f"/api/v1/allocations/{first['id']}",
                                                 headers=bearer(alice))).start()  # fmt: skip
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1, "wait_s": 10}, headers=bearer(alice))
    assert r.status_code == 201 and r.json()["user"] == "alice"
