"""In-memory vGPU scheduler: the pool's source of truth for what is placed where.

Pure data structures, no I/O, no clock, so it is fast and testable. Rules (DESIGN §3):

- A GPU of memory ``M`` with ``vgpu_count = n`` offers ``n`` default vGPUs of ``M // n``
  MiB and ``100 // n`` % compute; ``n`` also caps how many vGPUs a GPU may hold.
- A vGPU fits a GPU when the GPU has a free slot, ``gmem`` MiB and ``ratio`` % free.
  vGPUs of one request share a GPU only when all of them fit on it.
- Without ``cross_node`` all vGPUs of a request sit on one node; ``cross_node`` needs
  ``ratio == 100`` (whole GPUs) and may span nodes.
- binpack fills the most-allocated GPUs/nodes first (keeps whole GPUs free); spread
  the least-allocated.

Up nodes sit in a list sorted by free memory so binpack/spread can walk candidates in
policy order and stop at the first that fits; per-node aggregates reject nodes in O(1).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

Policy = Literal["binpack", "spread"]
POLICIES: tuple[str, ...] = ("binpack", "spread")
CROSS_NODE_NEEDS_RATIO = "ORION_CROSS_NODE=1 requires ORION_RATIO=100"


class SchedulingError(Exception):
    """Base class: a request the scheduler cannot satisfy (message is for the user)."""


class BadRequest(SchedulingError):
    """The request itself is invalid (no pool state could satisfy it)."""


class NoFit(SchedulingError):
    """The pool has no room for the request right now."""


class OverLimit(SchedulingError):
    """The request would take its user over a per-user limit.

    ``can_wait`` is False when the request alone exceeds the limit: waiting cannot help.
    """

    def __init__(self, message: str, can_wait: bool) -> None:
        super().__init__(message)
        self.can_wait = can_wait


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A physical GPU as a node registers it."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    emulated: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    vgpu: int = 1
    gmem_mib: int | None = None  # None: the chosen GPU's default (M // n)
    ratio: int | None = None  # None: the chosen GPU's default (100 // n)
    cross_node: bool = False
    policy: Policy | None = None  # None: the pool's default policy


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-user caps over the user's live allocations; None means no cap."""

    max_vgpus: int | None = None
    max_gmem_mib: int | None = None


@dataclass(slots=True)
class Usage:
    """What one user holds right now."""

    vgpus: int = 0
    gmem_mib: int = 0
    allocations: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one vGPU of an allocation sits."""

    index: int  # vGPU index within the allocation (cuda:index for the client)
    node_id: str
    gpu_uuid: str
    gpu_index: int
    gmem_mib: int
    ratio: int


@dataclass(slots=True)
class Gpu:
    spec: GpuSpec
    node_id: str
    vgpu_count: int
    placed: int = 0
    mem_alloc: int = 0
    ratio_alloc: int = 0

    @property
    def default_gmem(self) -> int:
        return self.spec.memory_mib // self.vgpu_count

    @property
    def default_ratio(self) -> int:
        return max(1, 100 // self.vgpu_count)

    @property
    def free_mem(self) -> int:
        return self.spec.memory_mib - self.mem_alloc

    @property
    def free_ratio(self) -> int:
        return 100 - self.ratio_alloc

    def capacity(self, gmem: int | None, ratio: int | None) -> int:
        """How many vGPUs of (gmem, ratio) still fit; None means this GPU's default."""
        g = gmem or self.default_gmem
        r = ratio or self.default_ratio
        if g <= 0:  # a GPU smaller than vgpu_count MiB: nothing sensible fits
            return 0
        return max(0, min(self.vgpu_count - self.placed, self.free_mem // g, self.free_ratio // r))

    def free_default(self) -> int:
        return self.capacity(None, None)


@dataclass(slots=True)
class Node:
    id: str
    name: str
    up: bool
    gpus: list[Gpu] = field(default_factory=list)
    # Aggregates over gpus, refreshed after every change; they make rejection O(1).
    free_mem: int = 0
    free_ratio: int = 0
    free_slots: int = 0
    free_default: int = 0
    max_free_mem: int = 0
    max_free_ratio: int = 0
    idle_gpus: int = 0
    slots: int = 0
    mem_total: int = 0  # for pool totals without a pass over every GPU
    emulated: int = 0
    key: tuple[int, str, str] = (0, "", "")

    def refresh(self) -> None:
        gpus = self.gpus
        self.free_mem = sum(g.free_mem for g in gpus)
        self.free_ratio = sum(g.free_ratio for g in gpus)
        self.free_slots = sum(g.vgpu_count - g.placed for g in gpus)
        self.free_default = sum(g.free_default() for g in gpus)
        self.max_free_mem = max((g.free_mem for g in gpus), default=0)
        self.max_free_ratio = max((g.free_ratio for g in gpus), default=0)
        self.idle_gpus = sum(1 for g in gpus if g.placed == 0)
        self.slots = sum(g.vgpu_count for g in gpus)
        self.mem_total = sum(g.spec.memory_mib for g in gpus)
        self.emulated = sum(1 for g in gpus if g.spec.emulated)
        self.key = (self.free_mem, self.name, self.id)

    def may_hold(self, k: int, gmem: int | None, ratio: int | None) -> bool:
        """Cheap upper bound: False means k vGPUs surely do not fit on this node."""
        if self.free_slots < k:
            return False
        if gmem is None and ratio is None:
            return self.free_default >= k
        if gmem is not None and (self.max_free_mem < gmem or self.free_mem // gmem < k):
            return False
        return ratio is None or (self.max_free_ratio >= ratio and self.free_ratio // ratio >= k)


class Scheduler:
    """Pool state and placement decisions. Not thread-safe: call from one thread/loop."""

    def __init__(self, default_policy: Policy = "binpack") -> None:
        if default_policy not in POLICIES:
            raise ValueError(f"unknown policy {default_policy!r}; use binpack or spread")
        self.default_policy: Policy = default_policy
        self.nodes: dict[str, Node] = {}
        self.allocations: dict[str, list[Placement]] = {}
        self.owners: dict[str, str] = {}  # allocation id -> user (only for owned ones)
        self.usage: dict[str, Usage] = {}  # user -> what their live allocations hold
        self._order: list[tuple[int, str, str]] = []  # keys of up nodes, ascending free mem
        self._free = 0  # free default vGPUs over up nodes, kept with _order
        self._slots = 0  # vgpu_count summed over GPUs of up nodes

    # ----- nodes -------------------------------------------------------------------------

    def upsert_node(
        self, node_id: str, name: str, vgpu_count: int, gpus: Iterable[GpuSpec], up: bool = True
    ) -> list[str]:
        """Add or replace a node's GPUs; re-apply placements already on it.

        Returns ids of allocations whose placements no longer fit (GPU gone or shrunk);
        those are released here and the caller must end them.
        """
        if vgpu_count < 1:
            raise BadRequest("vgpu_count must be at least 1")
        old = self.nodes.get(node_id)
        if old is not None:
            self._unindex(old)
        node = Node(id=node_id, name=name, up=up)
        node.gpus = [Gpu(spec=s, node_id=node_id, vgpu_count=vgpu_count) for s in gpus]
        self.nodes[node_id] = node
        lost: list[str] = []
        if old is not None:
            for alloc_id, places in list(self.allocations.items()):
                if not any(p.node_id == node_id for p in places):
                    continue
                kept = self._reapply(node, places)
                if kept is None:
                    lost.append(alloc_id)
                else:
                    self.allocations[alloc_id] = kept
        node.refresh()
        self._index(node)
        for alloc_id in lost:  # nothing of theirs was taken on this node: free the rest
            places = self.allocations.pop(alloc_id)
            self._disown(alloc_id, places)
            self._give_back([p for p in places if p.node_id != node_id])
        return lost

    def _reapply(self, node: Node, places: list[Placement]) -> list[Placement] | None:
        """Take a re-registered node's share of places; None (nothing taken) if it no
        longer fits. GPU indexes may have changed, so placements are rewritten."""
        by_uuid = {g.spec.uuid: g for g in node.gpus}
        mine = [p for p in places if p.node_id == node.id]
        if any(p.gpu_uuid not in by_uuid for p in mine):
            return None
        for p in mine:
            _take(by_uuid[p.gpu_uuid], p.gmem_mib, p.ratio)
        if any(
            g.mem_alloc > g.spec.memory_mib or g.ratio_alloc > 100 or g.placed > g.vgpu_count
            for g in node.gpus
        ):
            for p in mine:
                _give(by_uuid[p.gpu_uuid], p.gmem_mib, p.ratio)
            return None
        return [
            replace(p, gpu_index=by_uuid[p.gpu_uuid].spec.index) if p.node_id == node.id else p
            for p in places
        ]

    def set_node_up(self, node_id: str, up: bool) -> None:
        node = self.nodes[node_id]
        if node.up == up:
            return
        self._unindex(node)
        node.up = up
        self._index(node)

    def _index(self, node: Node) -> None:
        if node.up:
            bisect.insort(self._order, node.key)
            self._free += node.free_default
            self._slots += node.slots

    def _unindex(self, node: Node) -> None:
        if not node.up:
            return
        i = bisect.bisect_left(self._order, node.key)
        if i < len(self._order) and self._order[i] == node.key:
            del self._order[i]
            self._free -= node.free_default
            self._slots -= node.slots

    def _changed(self, node: Node) -> None:
        self._unindex(node)
        node.refresh()
        self._index(node)

    # ----- allocations -------------------------------------------------------------------

    def allocate(
        self,
        alloc_id: str,
        req: Request,
        owner: str | None = None,
        limits: Limits | None = None,
    ) -> list[Placement]:
        """Decide and apply placements for ``req``; raise BadRequest, NoFit or OverLimit.

        ``owner``'s live allocations count against ``limits``; the check runs after
        planning because default-sized vGPUs get their size from the chosen GPU.
        """
        if alloc_id in self.allocations:
            raise ValueError(f"allocation {alloc_id} already placed")
        if limits is not None and limits.max_vgpus is not None and req.vgpu > limits.max_vgpus:
            held = self.usage.get(owner or "")
            raise OverLimit(_limit_text(owner, limits, held, req.vgpu, None), can_wait=False)
        placements = self.plan(req)
        if limits is not None:
            self._check_limits(owner or "", limits, placements)
        self.apply(alloc_id, placements, owner)
        return placements

    def _check_limits(self, owner: str, limits: Limits, placements: list[Placement]) -> None:
        gmem = sum(p.gmem_mib for p in placements)
        held = self.usage.get(owner) or Usage()
        alone = (limits.max_vgpus is not None and len(placements) > limits.max_vgpus) or (
            limits.max_gmem_mib is not None and gmem > limits.max_gmem_mib
        )
        over = (limits.max_vgpus is not None and held.vgpus + len(placements) > limits.max_vgpus) or (
            limits.max_gmem_mib is not None and held.gmem_mib + gmem > limits.max_gmem_mib
        )
        if alone or over:
            raise OverLimit(_limit_text(owner, limits, held, len(placements), gmem), can_wait=not alone)

    def holding(self, owner: str) -> Usage:
        return self.usage.get(owner) or Usage()

    def apply(self, alloc_id: str, placements: list[Placement], owner: str | None = None) -> None:
        """Record placements (decided by plan, or restored from the store)."""
        # Resolve every GPU first so an unknown one (KeyError) leaves no partial state.
        gpus = [
            (self.nodes[p.node_id], _gpu(self.nodes[p.node_id], p.gpu_uuid)) for p in placements
        ]
        touched: dict[str, Node] = {}
        for (node, gpu), p in zip(gpus, placements, strict=True):
            _take(gpu, p.gmem_mib, p.ratio)
            touched[node.id] = node
        self.allocations[alloc_id] = list(placements)
        if owner is not None:
            self.owners[alloc_id] = owner
            held = self.usage.setdefault(owner, Usage())
            held.vgpus += len(placements)
            held.gmem_mib += sum(p.gmem_mib for p in placements)
            held.allocations += 1
        for node in touched.values():
            self._changed(node)

    def release(self, alloc_id: str) -> list[Placement]:
        """Return an allocation's resources to the pool (no-op if unknown)."""
        placements = self.allocations.pop(alloc_id, [])
        self._disown(alloc_id, placements)
        self._give_back(placements)
        return placements

    def _disown(self, alloc_id: str, placements: list[Placement]) -> None:
        owner = self.owners.pop(alloc_id, None)
        held = self.usage.get(owner) if owner is not None else None
        if held is None:
            return
        held.vgpus -= len(placements)
        held.gmem_mib -= sum(p.gmem_mib for p in placements)
        held.allocations -= 1
        if held.allocations <= 0:
            del self.usage[owner]  # type: ignore[arg-type]

    def _give_back(self, placements: list[Placement]) -> None:
        touched: dict[str, Node] = {}
        for p in placements:
            node = self.nodes.get(p.node_id)
            if node is None:
                continue
            gpu = next((g for g in node.gpus if g.spec.uuid == p.gpu_uuid), None)
            if gpu is not None:
                _give(gpu, p.gmem_mib, p.ratio)
            touched[node.id] = node
        for node in touched.values():
            self._changed(node)

    def allocations_on(self, node_id: str) -> list[str]:
        return [a for a, ps in self.allocations.items() if any(p.node_id == node_id for p in ps)]

    # ----- pool summary ------------------------------------------------------------------

    def vgpu_total(self) -> int:
        return self._slots

    def vgpu_free(self) -> int:
        return self._free

    def _up(self) -> Iterator[Node]:
        return (n for n in self.nodes.values() if n.up)

    # ----- decisions ---------------------------------------------------------------------

    def plan(self, req: Request) -> list[Placement]:
        """Choose GPUs for ``req`` without changing state."""
        _validate(req)
        policy = req.policy or self.default_policy
        spread = policy == "spread"
        order = reversed(self._order) if spread else iter(self._order)
        for _key, _name, node_id in order:
            node = self.nodes[node_id]
            if not node.may_hold(req.vgpu, req.gmem_mib, req.ratio):
                continue
            picks = _pick_on_node(node, req, spread)
            if picks is not None:
                return _placements(picks, req)
        if req.cross_node:
            picks = self._pick_across_nodes(req, spread)
            if picks is not None:
                return _placements(picks, req)
        raise NoFit(self.explain(req))

    def _pick_across_nodes(self, req: Request, spread: bool) -> list[Gpu] | None:
        """Whole idle GPUs (ratio 100) from several nodes, in policy order."""
        if sum(n.idle_gpus for n in self._up()) < req.vgpu:
            return None  # cheap bound: not enough idle GPUs at all
        gmem = req.gmem_mib
        order = reversed(self._order) if spread else iter(self._order)
        per_node: list[list[Gpu]] = []
        found = 0
        for _key, _name, node_id in order:
            node = self.nodes[node_id]
            if node.idle_gpus == 0:
                continue
            idle = [g for g in node.gpus if g.placed == 0 and g.capacity(gmem, 100) > 0]
            if idle:
                per_node.append(idle)
                found += len(idle)
                if found >= req.vgpu and not spread:
                    break
        if found < req.vgpu:
            return None
        if not spread:
            return [g for gpus in per_node for g in gpus][: req.vgpu]
        # spread: one GPU per node in turn, so the request touches as many nodes as it can
        picks: list[Gpu] = []
        depth = 0
        while len(picks) < req.vgpu:
            for gpus in per_node:
                if depth < len(gpus) and len(picks) < req.vgpu:
                    picks.append(gpus[depth])
            depth += 1
        return picks

    # ----- refusal reasons ---------------------------------------------------------------

    def explain(self, req: Request) -> str:
        """One line naming the constraint that failed and what is free.

        Walks node aggregates first and only opens nodes that could matter, so a refusal
        costs about as much as a decision even in a large pool.
        """
        up = [n for n in self._up() if n.gpus]
        if not self.nodes:
            return "no GPU node has registered with the controller"
        if not up:
            return f"no GPU node is up ({len(self.nodes)} registered, none up)"
        pool = f"(pool: {self.vgpu_free()} of {self.vgpu_total()} vGPU free)"
        ratio = 100 if req.cross_node else req.ratio
        reason = _single_vgpu_reason(req.gmem_mib, ratio, up)
        if reason:
            return f"{reason} {pool}"
        if req.cross_node:
            idle = sum(n.idle_gpus for n in up)
            return (
                f"cross-node request needs {req.vgpu} whole GPUs (ratio 100) with "
                f"{_gmem_text(req)} free: {idle} GPUs are idle in the pool {pool}"
            )
        best, best_node = 0, up[0]
        for n in up:
            if n.may_hold(best + 1, req.gmem_mib, req.ratio):
                fits = sum(g.capacity(req.gmem_mib, req.ratio) for g in n.gpus)
                if fits > best:
                    best, best_node = fits, n
        return (
            f"no node can hold {req.vgpu} vGPU of {_gmem_text(req)} / {_ratio_text(req)}: "
            f"at most {best} fit on one node ({best_node.name}); vGPUs of one request stay on "
            f"one node unless ORION_CROSS_NODE=1 (with ORION_RATIO=100) {pool}"
        )


def _single_vgpu_reason(gmem: int | None, ratio: int | None, up: list[Node]) -> str | None:
    """Why not even one vGPU fits on any up GPU, or None if one does."""
    for n in up:
        if n.may_hold(1, gmem, ratio) and any(g.capacity(gmem, ratio) for g in n.gpus):
            return None
    if not any(n.free_slots for n in up):
        slots = sum(n.slots for n in up)
        return f"every GPU already holds vgpu_count vGPUs ({slots} of {slots} slots in use)"
    if gmem is not None:
        node = max(up, key=lambda n: n.max_free_mem)
        if node.max_free_mem < gmem:
            top = max(node.gpus, key=lambda g: g.free_mem)
            return (
                f"no GPU has {gmem} MiB free for one vGPU: largest free is "
                f"{top.free_mem} MiB on {node.name} GPU {top.spec.index}"
            )
    if ratio is not None:
        node = max(up, key=lambda n: n.max_free_ratio)
        if node.max_free_ratio < ratio:
            top = max(node.gpus, key=lambda g: g.free_ratio)
            return (
                f"no GPU has {ratio}% compute free for one vGPU: largest free is "
                f"{top.free_ratio}% on {node.name} GPU {top.spec.index}"
            )
    mem = f"{gmem} MiB" if gmem is not None else "its default memory"
    share = f"{ratio}% compute" if ratio is not None else "its default compute"
    return f"no GPU has a free vGPU slot with {mem} and {share} free at the same time"


def _limit_text(
    owner: str | None, limits: Limits, held: Usage | None, vgpus: int, gmem: int | None
) -> str:
    held = held or Usage()
    caps = []
    if limits.max_vgpus is not None:
        caps.append(f"{limits.max_vgpus} vGPU")
    if limits.max_gmem_mib is not None:
        caps.append(f"{limits.max_gmem_mib} MiB GPU memory")
    asked = f"{vgpus} vGPU" + (f" / {gmem} MiB" if gmem is not None else "")
    return (
        f"user {owner or '?'} may hold at most {' and '.join(caps)}: holds {held.vgpus} vGPU / "
        f"{held.gmem_mib} MiB, asked {asked}; release some or ask an admin to raise the limit "
        f"(orion user limit {owner or 'NAME'} ...)"
    )


def _gmem_text(req: Request) -> str:
    return f"{req.gmem_mib} MiB" if req.gmem_mib is not None else "default memory"


def _ratio_text(req: Request) -> str:
    return f"{req.ratio}% compute" if req.ratio is not None else "default compute"


def _validate(req: Request) -> None:
    if req.vgpu < 1:
        raise BadRequest("vgpu must be at least 1")
    if req.gmem_mib is not None and req.gmem_mib < 1:
        raise BadRequest("gmem_mib must be at least 1 MiB")
    if req.ratio is not None and not 1 <= req.ratio <= 100:
        raise BadRequest("ratio must be between 1 and 100 (%)")
    if req.cross_node and req.ratio != 100:
        raise BadRequest(CROSS_NODE_NEEDS_RATIO)
    if req.policy is not None and req.policy not in POLICIES:
        raise BadRequest(f"unknown policy {req.policy!r}; use binpack or spread")


def _pick_on_node(node: Node, req: Request, spread: bool) -> list[Gpu] | None:
    """GPUs (with repeats) for all vGPUs of req on one node, or None if they do not fit."""
    caps = [(g, g.capacity(req.gmem_mib, req.ratio)) for g in node.gpus]
    caps = [(g, c) for g, c in caps if c > 0]
    if sum(c for _, c in caps) < req.vgpu:
        return None
    if spread:  # least-allocated first, one vGPU per GPU in turn
        caps.sort(key=lambda gc: (-gc[0].free_mem, -gc[0].free_ratio, gc[0].spec.index))
        picks: list[Gpu] = []
        left = {id(g): c for g, c in caps}
        while len(picks) < req.vgpu:
            for g, _ in caps:
                if left[id(g)] > 0 and len(picks) < req.vgpu:
                    picks.append(g)
                    left[id(g)] -= 1
        return picks
    # binpack: most-allocated first, as many vGPUs on each GPU as fit
    caps.sort(key=lambda gc: (gc[0].free_mem, gc[0].free_ratio, gc[0].spec.index))
    picks = []
    for g, c in caps:
        picks.extend([g] * min(c, req.vgpu - len(picks)))
        if len(picks) == req.vgpu:
            break
    return picks


def _placements(picks: list[Gpu], req: Request) -> list[Placement]:
    return [
        Placement(
            index=i,
            node_id=g.node_id,
            gpu_uuid=g.spec.uuid,
            gpu_index=g.spec.index,
            gmem_mib=req.gmem_mib or g.default_gmem,
            ratio=req.ratio or g.default_ratio,
        )
        for i, g in enumerate(picks)
    ]


def _gpu(node: Node, uuid: str) -> Gpu:
    for g in node.gpus:
        if g.spec.uuid == uuid:
            return g
    raise KeyError(f"node {node.name} has no GPU {uuid}")


def _take(g: Gpu, gmem: int, ratio: int) -> None:
    g.placed += 1
    g.mem_alloc += gmem
    g.ratio_alloc += ratio


def _give(g: Gpu, gmem: int, ratio: int) -> None:
    g.placed -= 1
    g.mem_alloc -= gmem
    g.ratio_alloc -= ratio
