"""Pool-wide totals from live state: what the summary page, the charts and /metrics show.

One pass over the nodes, using the scheduler's per-node aggregates (about 1 ms for
1,000 nodes); down nodes count only in the node totals, as in ``GET /pool``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orion_vgpu.controller.service import ControllerService


@dataclass(slots=True)
class Totals:
    vgpu_total: int = 0  # slots (vgpu_count per GPU) on up nodes
    vgpu_free: int = 0  # default-size vGPUs that still fit
    vgpu_used: int = 0  # vGPUs placed
    mem_total_mib: int = 0
    mem_alloc_mib: int = 0
    mem_used_mib: float = 0.0  # heartbeat numbers
    compute_total: int = 0  # 100 per GPU
    compute_alloc: int = 0
    busy: float = 0.0  # sum of per-GPU busy %
    gpus: int = 0
    gpus_emulated: int = 0
    nodes_up: int = 0
    nodes_down: int = 0
    pending: int = 0
    active: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def totals(service: ControllerService) -> Totals:
    """Sums of the scheduler's per-node aggregates (kept current on every change)."""
    t = Totals(vgpu_total=service.scheduler.vgpu_total(), vgpu_free=service.scheduler.vgpu_free())
    used_bytes = 0
    for node in service.nodes.values():
        if node.state != "up":
            t.nodes_down += 1
            continue
        t.nodes_up += 1
        sched = service.scheduler.nodes.get(node.id)
        if sched is None:
            continue
        gpus = len(sched.gpus)
        t.gpus += gpus
        t.gpus_emulated += sched.emulated
        t.vgpu_used += sched.slots - sched.free_slots
        t.mem_total_mib += sched.mem_total
        t.mem_alloc_mib += sched.mem_total - sched.free_mem
        t.compute_alloc += 100 * gpus - sched.free_ratio
        for used, busy in node.live.values():
            used_bytes += used
            t.busy += busy
    t.compute_total = 100 * t.gpus
    t.mem_used_mib = round(used_bytes / (1024 * 1024), 1)
    for a in service.live.values():
        if a.state == "active":
            t.active += 1
        else:
            t.pending += 1
    return t


def per_user(service: ControllerService) -> dict[str, list[int]]:
    """user -> [vGPUs, GPU memory MiB, allocations] held right now."""
    return {
        user: [held.vgpus, held.gmem_mib, held.allocations]
        for user, held in sorted(service.scheduler.usage.items())
    }
