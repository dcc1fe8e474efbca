"""Prometheus metrics of the controller: ``GET /metrics`` (text exposition format).

Pool series (nodes, GPUs, vGPUs, allocations, users) are computed from live state at
scrape time (``PoolText``), so they are never stale and cost nothing between scrapes. Event series (scheduler latency, failures, allocations created/ended) are
ordinary counters/histograms. Each controller has its own registry, so several apps in
one process (tests, benchmarks) never share series. Names and how they map to HAMi and
dcgm-exporter: docs/metrics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if TYPE_CHECKING:
    from orion_vgpu.controller.service import ControllerService

MIB = 1024 * 1024
# A decision is ~10 µs on a small pool and ~1 ms on 1,000 nodes; refusals walk more.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25)  # fmt: skip


class ControllerMetrics:
    """The registry plus the event series the service updates as things happen."""

    def __init__(self) -> None:
        # "_created" timestamps double the series count and no dashboard uses them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.pool: PoolText | None = None
        self._latency = Histogram(
            "orion_scheduler_latency_seconds",
            "Time the scheduler took to decide one allocation request, by result",
            ["result"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._failures = Counter(
            "orion_request_failures",
            "API requests refused or failed, by reason (the error code of the answer)",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self._created = Counter(
            "orion_allocations_created",
            "Allocations granted since the controller started, by user",
            ["user"], registry=self.registry,
        )  # fmt: skip
        self._ended = Counter(
            "orion_allocations_ended",
            "Allocations ended since the controller started, by final state and user",
            ["state", "user"], registry=self.registry,
        )  # fmt: skip

    def attach(self, service: ControllerService) -> None:
        self.pool = PoolText(service)

    def schedule_seconds(self, seconds: float, result: str) -> None:
        self._latency.labels(result).observe(seconds)

    def failure(self, reason: str) -> None:
        self._failures.labels(reason).inc()

    def allocation_created(self, user: str) -> None:
        self._created.labels(user).inc()

    def allocation_ended(self, user: str, state: str) -> None:
        self._ended.labels(state, user).inc()

    def exposition(self) -> bytes:
        events = generate_latest(self.registry)
        pool = self.pool.render().encode() if self.pool is not None else b""
        return pool + events


class PoolText:
    """Gauges of the pool as it is at scrape time, written straight as exposition text.

    A 1,000-node pool has ~80,000 series; prometheus_client's generic formatter needs
    ~1 s for them, this writer ~0.1 s (label sets are formatted once per GPU and reused
    by every series of that GPU). The format is the same; tests parse it with
    prometheus_client's parser.
    """

    def __init__(self, service: ControllerService) -> None:
        self.service = service

    def render(self) -> str:
        out: list[str] = []
        self._nodes(out)
        self._gpus(out)
        self._vgpus(out)
        self._allocations(out)
        self._users(out)
        return "".join(out)

    def _nodes(self, out: list[str]) -> None:
        svc = self.service
        up, beat = [], []
        counts = {"up": 0, "down": 0}
        for node in svc.nodes.values():
            labels = _labels(("node", node.name))
            state = "up" if node.state == "up" else "down"
            up.append(f"orion_node_up{labels} {1 if state == 'up' else 0}\n")
            beat.append(f"orion_node_last_heartbeat_timestamp_seconds{labels} {node.last_heartbeat!r}\n")
            counts[state] += 1
        _family(out, "orion_node_up", "1 if the node heartbeats (up), 0 if it is down", up)
        _family(out, "orion_node_last_heartbeat_timestamp_seconds",
                "Unix time of the node's last heartbeat or registration", beat)  # fmt: skip
        _family(out, "orion_nodes", "Registered nodes by state",
                [f'orion_nodes{{state="{k}"}} {v}\n' for k, v in counts.items()])  # fmt: skip
        _family(out, "orion_vgpus_total", "vGPU slots on up nodes (vgpu_count per GPU)",
                [f"orion_vgpus_total {svc.scheduler.vgpu_total()}\n"])  # fmt: skip
        _family(out, "orion_vgpus_free", "Default-size vGPUs that still fit on up nodes",
                [f"orion_vgpus_free {svc.scheduler.vgpu_free()}\n"])  # fmt: skip

    def _gpus(self, out: list[str]) -> None:
        svc = self.service
        rows: dict[str, list[str]] = {name: [] for name, _ in GPU_SERIES}
        info: list[str] = []
        for node in svc.nodes.values():
            sched = svc.scheduler.nodes.get(node.id)
            if sched is None:
                continue
            for g in sched.gpus:
                inner = _inner(("node", node.name), ("gpu_uuid", g.spec.uuid), ("gpu_index", str(g.spec.index)))
                labels = "{" + inner + "}"
                emulated = "true" if g.spec.emulated else "false"
                info.append(f'orion_gpu_info{{{inner},{_inner(("name", g.spec.name))},emulated="{emulated}"}} 1\n')
                used, busy = node.live.get(g.spec.uuid, (0, 0.0))
                values = (g.spec.memory_mib * MIB, g.mem_alloc * MIB, used, g.ratio_alloc / 100,
                          busy / 100, g.vgpu_count, g.placed)  # fmt: skip
                for (name, _doc), v in zip(GPU_SERIES, values, strict=True):
                    rows[name].append(f"{name}{labels} {_num(v)}\n")
        _family(out, "orion_gpu_info", 'Physical GPU (1); emulated="true" for GPUs served by the CPU', info)
        for name, doc in GPU_SERIES:
            _family(out, name, doc, rows[name])

    def _vgpus(self, out: list[str]) -> None:
        svc = self.service
        rows: dict[str, list[str]] = {name: [] for name, _ in VGPU_SERIES}
        for a in svc.live.values():
            for v in a.vgpus:
                node = svc.nodes.get(v.node_id)
                labels = _labels(("node", node.name if node else v.node_id), ("gpu_uuid", v.gpu_uuid),
                                 ("gpu_index", str(v.gpu_index)), ("allocation", a.id),
                                 ("vgpu", str(v.index)), ("user", a.user))  # fmt: skip
                used, busy = svc.vgpu_live.get((a.id, v.index), (0, 0.0))
                values = (v.gmem_mib * MIB, used, v.ratio / 100, busy / 100)
                for (name, _doc), value in zip(VGPU_SERIES, values, strict=True):
                    rows[name].append(f"{name}{labels} {_num(value)}\n")
        for name, doc in VGPU_SERIES:
            _family(out, name, doc, rows[name])

    def _allocations(self, out: list[str]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for a in self.service.live.values():
            counts[(a.state, a.user)] = counts.get((a.state, a.user), 0) + 1
        _family(out, "orion_allocations", "Live allocations by state (pending, active) and user",
                [f"orion_allocations{_labels(('state', st), ('user', u))} {n}\n"
                 for (st, u), n in sorted(counts.items())])  # fmt: skip

    def _users(self, out: list[str]) -> None:
        svc = self.service
        held = sorted(svc.scheduler.usage.items())
        _family(out, "orion_user_vgpus", "vGPUs the user holds",
                [f"orion_user_vgpus{_labels(('user', u))} {h.vgpus}\n" for u, h in held])  # fmt: skip
        _family(out, "orion_user_memory_allocated_bytes", "GPU memory the user holds",
                [f"orion_user_memory_allocated_bytes{_labels(('user', u))} {h.gmem_mib * MIB}\n"
                 for u, h in held])  # fmt: skip
        users = svc.accounts.users()
        _family(out, "orion_user_limit_vgpus", "Per-user vGPU limit (absent: none)",
                [f"orion_user_limit_vgpus{_labels(('user', u.name))} {u.max_vgpus}\n"
                 for u in users if u.max_vgpus is not None])  # fmt: skip
        _family(out, "orion_user_limit_memory_bytes", "Per-user GPU memory limit (absent: none)",
                [f"orion_user_limit_memory_bytes{_labels(('user', u.name))} {u.max_gmem_mib * MIB}\n"
                 for u in users if u.max_gmem_mib is not None])  # fmt: skip


GPU_SERIES = (
    ("orion_gpu_memory_total_bytes", "GPU memory the pool may hand out"),
    ("orion_gpu_memory_allocated_bytes", "GPU memory granted to vGPUs"),
    ("orion_gpu_memory_used_bytes", "GPU memory in use (last heartbeat)"),
    ("orion_gpu_compute_allocated_ratio", "Compute share granted to vGPUs (0..1 of the GPU)"),
    ("orion_gpu_busy_ratio", "Fraction of time the GPU was busy (last heartbeat, 0..1)"),
    ("orion_gpu_vgpu_slots", "vGPUs this GPU may hold (vgpu_count)"),
    ("orion_gpu_vgpus", "vGPUs placed on this GPU"),
)
VGPU_SERIES = (
    ("orion_vgpu_memory_limit_bytes", "GPU memory granted to the vGPU (its quota)"),
    ("orion_vgpu_memory_used_bytes", "GPU memory the vGPU's session uses (last heartbeat)"),
    ("orion_vgpu_compute_limit_ratio", "Compute share granted to the vGPU (0..1 of its GPU)"),
    ("orion_vgpu_busy_ratio", "Fraction of time the vGPU's session kept its GPU busy (last heartbeat, 0..1)"),
)


def _family(out: list[str], name: str, doc: str, rows: list[str]) -> None:
    out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
    out.extend(rows)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _inner(*pairs: tuple[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def _labels(*pairs: tuple[str, str]) -> str:
    return "{" + _inner(*pairs) + "}"


def _num(v: float) -> str:
    if isinstance(v, int) or v.is_integer():
        return str(int(v))
    return repr(v)
