"""What the dashboard pages show, as plain JSON-able dicts.

Each page is rendered from exactly the dict ``GET /api/v1/dashboard/<page>`` returns,
so every number on a page is one a user can fetch and check. Lists that grow with the
pool (nodes, tasks) are paged; the totals come from aggregates, not from the page.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from orion_vgpu.controller.accounts import Principal
from orion_vgpu.controller.history import Sample
from orion_vgpu.controller.poolstats import per_user, totals
from orion_vgpu.controller.store import ENDED_STATES, StoredAllocation

if TYPE_CHECKING:
    from orion_vgpu.controller.service import ControllerService

CHART_HOURS = (1, 6, 24)
CHART_POINTS = 240  # enough for a 640-px chart; longer series are averaged into buckets
TOP_USERS = 6  # the per-user chart shows these and "others"
PERIODS = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0}
MAX_PER_PAGE = 1000  # JSON API; pages show at most PAGE_MAX
PAGE_MAX = 100  # nodes per page: keeps a page of a 1,000-node pool fast and scrollable


def _pages(total: int, page: int, per_page: int) -> dict[str, int]:
    pages = max(1, math.ceil(total / per_page))
    return {"total": total, "page": min(max(1, page), pages), "pages": pages,
            "per_page": per_page}  # fmt: skip


# ----- summary ---------------------------------------------------------------------------


def summary(service: ControllerService, hours: int = 6) -> dict[str, Any]:
    hours = hours if hours in CHART_HOURS else 6
    now = service.clock()
    t = totals(service)
    users = per_user(service)
    recorded = service.history.since(now - hours * 3600)
    mem = t.mem_total_mib or 1
    return {
        "generated_at": now,
        "hours": hours,
        "vgpus": {"total": t.vgpu_total, "free": t.vgpu_free, "used": t.vgpu_used},
        "memory_mib": {"total": t.mem_total_mib, "allocated": t.mem_alloc_mib,
                       "used": t.mem_used_mib},  # fmt: skip
        # GPU-% summed over GPUs (100 per GPU), and as a share of the pool
        "compute_pct": {"total": t.compute_total, "allocated": t.compute_alloc,
                        "busy": round(t.busy, 1),
                        "allocated_share": round(100 * t.compute_alloc / (t.compute_total or 1), 1),
                        "busy_share": round(t.busy / (t.gpus or 1), 1)},  # fmt: skip
        "nodes": {"up": t.nodes_up, "down": t.nodes_down},
        "gpus": {"total": t.gpus, "emulated": t.gpus_emulated},
        "tasks": {"running": t.active, "pending": t.pending},
        "users": [
            {"user": u, "vgpus": v, "gmem_mib": m, "allocations": n,
             "share_pct": round(100 * m / mem, 1)}
            for u, (v, m, n) in sorted(users.items(), key=lambda kv: -kv[1][1])
        ],  # fmt: skip
        "history": _with_now(_recorded_history(service, recorded), Sample.of(now, t, users)),
    }


HISTORY_KEYS = ("vgpu_total", "vgpu_used", "allocations", "mem_total_mib", "mem_alloc_mib",
                "mem_used_mib", "compute_total", "compute_alloc", "busy")  # fmt: skip


def _recorded_history(service: ControllerService, samples: list[Sample]) -> dict[str, Any]:
    """The chart series of recorded samples; they change once per sample interval, so
    the work is cached on (count, first, last) and pages in between only add "now"."""
    if not samples:
        return _history([])
    key = (len(samples), samples[0].ts, samples[-1].ts)
    cache: dict[tuple[int, float, float], dict[str, Any]] = service.view_cache.setdefault("history", {})
    found = cache.get(key)
    if found is None:
        if len(cache) >= len(CHART_HOURS):  # one entry per chart window is all we need
            cache.clear()
        found = cache[key] = _history(samples)
    return found


def _with_now(hist: dict[str, Any], now: Sample) -> dict[str, Any]:
    """A copy of ``hist`` with the live sample appended (the cache is never mutated)."""
    out: dict[str, Any] = {"t": [*hist["t"], round(now.ts, 1)]}
    for key in HISTORY_KEYS:
        out[key] = [*hist[key], round(getattr(now, key), 1)]
    per = hist["per_user_gmem_mib"]
    before = len(hist["t"])
    named = [u for u in per if u != "others"]
    # someone new since the last sample gets a series while there is room, else "others"
    extra = [u for u in now.per_user if u not in per][: max(0, TOP_USERS - len(named))]
    out_per = {u: [*per[u], float(now.per_user.get(u, (0, 0))[1])] for u in named}
    for u in extra:
        out_per[u] = [0.0] * before + [float(now.per_user[u][1])]
    rest = sum(row[1] for u, row in now.per_user.items() if u not in out_per)
    if "others" in per or rest:
        out_per["others"] = [*per.get("others", [0.0] * before), float(rest)]
    out["per_user_gmem_mib"] = out_per
    return out


def _history(samples: list[Sample]) -> dict[str, Any]:
    buckets = _buckets(samples, CHART_POINTS)
    out: dict[str, Any] = {"t": [round(b[-1].ts, 1) for b in buckets]}
    for key in HISTORY_KEYS:
        out[key] = [round(sum(getattr(s, key) for s in b) / len(b), 1) for b in buckets]
    # GPU memory per user, averaged per bucket, in one pass over the samples
    per_user: dict[str, list[float]] = {}
    peak: dict[str, int] = {}
    for i, b in enumerate(buckets):
        share = 1.0 / len(b)
        for s in b:
            for user, row in s.per_user.items():
                series = per_user.get(user)
                if series is None:
                    series = per_user[user] = [0.0] * len(buckets)
                series[i] += row[1] * share
                if row[1] > peak.get(user, -1):
                    peak[user] = row[1]
    top = sorted(peak, key=lambda u: -peak[u])[:TOP_USERS]
    per = {u: [round(v, 1) for v in per_user[u]] for u in top}
    rest = [u for u in per_user if u not in per]
    others = [round(sum(per_user[u][i] for u in rest), 1) for i in range(len(buckets))]
    if any(others):
        per["others"] = others
    out["per_user_gmem_mib"] = per
    return out


def _buckets(samples: list[Sample], points: int) -> list[list[Sample]]:
    if len(samples) <= points:
        return [[s] for s in samples]
    size = math.ceil(len(samples) / points)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


# ----- tasks -----------------------------------------------------------------------------


def tasks(
    service: ControllerService,
    page: int = 1,
    finished_page: int = 1,
    per_page: int = 50,
    user: str | None = None,
) -> dict[str, Any]:
    per_page = min(max(1, per_page), MAX_PER_PAGE)
    live = sorted(service.live.values(), key=lambda a: a.created_at, reverse=True)
    if user:
        live = [a for a in live if a.user == user]
    running = _pages(len(live), page, per_page)
    first = (running["page"] - 1) * per_page
    running["items"] = [_task(service, a) for a in live[first : first + per_page]]
    finished = _pages(service.store.count_allocations(ENDED_STATES, user), finished_page, per_page)
    rows = service.store.load_allocations(
        ENDED_STATES, limit=per_page, offset=(finished["page"] - 1) * per_page,
        order_by_end=True, user=user or None,
    )  # fmt: skip
    finished["items"] = [_task(service, a) for a in rows]
    return {"generated_at": service.clock(), "user": user or None, "running": running,
            "finished": finished}  # fmt: skip


def _task(service: ControllerService, a: StoredAllocation) -> dict[str, Any]:
    vgpus = []
    used_total, busy = 0, []
    for v in a.vgpus:
        node = service.nodes.get(v.node_id)
        used, pct = service.vgpu_live.get((a.id, v.index), (0, 0.0))
        used_total += used
        busy.append(pct)
        vgpus.append({
            "index": v.index, "node": node.name if node else v.node_id, "gpu_index": v.gpu_index,
            "gpu_uuid": v.gpu_uuid, "gmem_mib": v.gmem_mib, "ratio": v.ratio,
            "session_started": v.session_started, "mem_used_bytes": used, "busy_pct": pct,
        })  # fmt: skip
    end = a.ended_at if a.ended_at is not None else service.clock()
    os_user = a.request.get("os_user") if isinstance(a.request, dict) else None
    return {
        "id": a.id, "state": a.state, "user": a.user,
        "os_user": os_user if os_user and os_user != a.user else None,
        "host": a.host, "pid": a.pid, "command": a.command, "created_at": a.created_at,
        "ended_at": a.ended_at, "duration_s": round(end - a.created_at, 1),
        "end_reason": a.end_reason, "vgpus": vgpus,
        "gmem_mib": sum(v.gmem_mib for v in a.vgpus), "mem_used_bytes": used_total,
        "busy_pct": round(sum(busy) / len(busy), 1) if busy else 0.0,
    }  # fmt: skip


# ----- nodes -----------------------------------------------------------------------------


def nodes(
    service: ControllerService,
    q: str = "",
    state: str = "",
    page: int = 1,
    per_page: int = 20,
) -> dict[str, Any]:
    per_page = min(max(1, per_page), MAX_PER_PAGE)
    everyone = _ordered_nodes(service)
    overview = []
    matched = []
    needle = q.strip().lower()
    for node in everyone:
        sched = service.scheduler.nodes.get(node.id)
        slots = sched.slots if sched else 0
        placed = slots - sched.free_slots if sched else 0
        mem = sum(g.memory_mib for g in node.gpus) or 1
        free_mem = sched.free_mem if sched else mem
        overview.append({"name": node.name, "state": node.state, "vgpus": placed,
                         "vgpu_slots": slots,
                         "mem_alloc_pct": round(100 * (mem - free_mem) / mem)})  # fmt: skip
        if (not needle or needle in node.name.lower()) and (not state or node.state == state):
            matched.append(node)
    paging = _pages(len(matched), page, per_page)
    first = (paging["page"] - 1) * per_page
    shown = matched[first : first + per_page]
    return {
        "generated_at": service.clock(), "q": q, "state": state or None,
        "nodes_total": len(everyone), "up": sum(1 for n in everyone if n.state == "up"),
        "overview": overview, **paging, "nodes": [_node(service, n) for n in shown],
    }  # fmt: skip


def _node(service: ControllerService, node: Any) -> dict[str, Any]:
    holders: dict[str, list[dict[str, Any]]] = {}
    for alloc_id in service.by_node.get(node.id, ()):
        a = service.live[alloc_id]
        for v in a.vgpus:
            if v.node_id != node.id:
                continue
            used, pct = service.vgpu_live.get((a.id, v.index), (0, 0.0))
            holders.setdefault(v.gpu_uuid, []).append({
                "allocation": a.id, "vgpu": v.index, "user": a.user, "gmem_mib": v.gmem_mib,
                "ratio": v.ratio, "state": a.state, "pid": a.pid, "host": a.host,
                "mem_used_bytes": used, "busy_pct": pct,
            })  # fmt: skip
    sched = service.scheduler.nodes.get(node.id)
    gpus = []
    for g in sched.gpus if sched else []:
        used, pct = node.live.get(g.spec.uuid, (0, 0.0))
        vgpus = sorted(holders.get(g.spec.uuid, []), key=lambda h: (h["allocation"], h["vgpu"]))
        gpus.append({
            "index": g.spec.index, "uuid": g.spec.uuid, "name": g.spec.name,
            "emulated": g.spec.emulated, "memory_mib": g.spec.memory_mib,
            "memory_allocated_mib": g.mem_alloc, "compute_allocated": g.ratio_alloc,
            "vgpu_slots": g.vgpu_count, "vgpu_free": g.free_default(),
            "mem_used_bytes": used, "busy_pct": pct, "vgpus": vgpus,
        })  # fmt: skip
    return {
        "id": node.id, "name": node.name, "addr": node.addr, "state": node.state,
        "version": node.version, "last_heartbeat": node.last_heartbeat,
        "vgpu_count": node.vgpu_count, "gpus": gpus,
    }  # fmt: skip


def _ordered_nodes(service: ControllerService) -> list[Any]:
    """Nodes in natural name order, re-sorted only when a node registers."""
    cached = service.view_cache.get("node_order")
    if cached is None or cached[0] != service.node_version or len(cached[1]) != len(service.nodes):
        cached = (service.node_version, sorted(service.nodes.values(), key=lambda n: _natural(n.name)))
        service.view_cache["node_order"] = cached
    return list(cached[1])


def _natural(name: str) -> tuple[Any, ...]:
    """node-2 before node-10."""
    parts: list[Any] = []
    num = ""
    text = ""
    for ch in name:
        if "0" <= ch <= "9":  # ASCII only: int() refuses other digits such as "²"
            if text:
                parts.append(text)
                text = ""
            num += ch
        else:
            if num:
                parts.append(int(num))
                num = ""
            text += ch
    parts.append(int(num) if num else text)
    return tuple((0, p) if isinstance(p, int) else (1, p) for p in parts)


# ----- users -----------------------------------------------------------------------------


def users(service: ControllerService, who: Principal, period: str = "24h") -> dict[str, Any]:
    """Admins see everyone (and names of allocations that are no user, as in open mode);
    a user sees only themselves."""
    period = period if period in PERIODS else "24h"
    now = service.clock()
    since = now - PERIODS[period]
    usage = service.store.usage_by_user(since, now)
    accounts = service.accounts
    listed = accounts.users() if who.is_admin else [u for u in [who.user] if u is not None]
    none = {"allocations": 0, "vgpu_hours": 0.0, "gmem_gib_hours": 0.0}
    rows = []
    for u in listed:
        held = service.scheduler.holding(u.name)
        rows.append({
            **u.public(),
            "holding": {"vgpus": held.vgpus, "gmem_mib": held.gmem_mib,
                        "allocations": held.allocations},
            "usage": usage.get(u.name, none),
            "tokens": [t.public() for t in accounts.tokens_of(u)],
        })  # fmt: skip
    others = []
    if who.is_admin:
        names = (set(usage) | set(service.scheduler.usage)) - set(accounts.by_name)
        for name in sorted(names):
            held = service.scheduler.holding(name)
            others.append({"name": name, "holding": {"vgpus": held.vgpus,
                           "gmem_mib": held.gmem_mib, "allocations": held.allocations},
                           "usage": usage.get(name, none)})  # fmt: skip
    return {"generated_at": now, "period": period, "since": since, "until": now,
            "auth": service.settings.auth, "users": rows, "others": others}  # fmt: skip
