"""The controller's live state: scheduler in memory, written through to the store.

All methods run on the event loop thread, so state changes are serialized without locks;
store calls are short local transactions (SQLite WAL), cheaper than a thread hop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from orion_vgpu import API_VERSION, DATA_VERSION, __version__
from orion_vgpu.controller import schemas
from orion_vgpu.controller.accounts import Accounts
from orion_vgpu.controller.accounts_store import AccountStore
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.history import Sample, UsageHistory
from orion_vgpu.controller.metrics import ControllerMetrics
from orion_vgpu.controller.poolstats import per_user, totals
from orion_vgpu.controller.scheduler import (
    BadRequest,
    GpuSpec,
    Limits,
    NoFit,
    OverLimit,
    Placement,
    Request,
    Scheduler,
)
from orion_vgpu.controller.settings import ControllerSettings
from orion_vgpu.controller.store import (
    ENDED_STATES,
    LIVE_STATES,
    Store,
    StoredAllocation,
    StoredVgpu,
    sqlite_url,
)
from orion_vgpu.protocol.grant import grant_key, sign_grant
from orion_vgpu.protocol.messages import REASON_CLIENT_CLOSED

log = logging.getLogger("orion.controller")

GRANT_GRACE_S = 300.0  # grants outlive the lease a little: clock skew, slow client start
PERSIST_HEARTBEAT_S = 30.0  # heartbeats are frequent; the store only needs a recent one


__all__ = ["ApiError", "ControllerService", "NodeInfo", "Owner"]


@dataclass(frozen=True, slots=True)
class Owner:
    """Who an allocation is for, as the API layer authenticated it."""

    user: str  # recorded as the allocation's user
    via: str  # "token", "session" or "none" (open mode: the user the client reported)
    limits: Limits | None = None


@dataclass(slots=True)
class NodeInfo:
    id: str
    name: str
    addr: str
    unix_socket: str | None
    version: str
    protocol_version: int | None
    vgpu_count: int
    state: str
    last_heartbeat: float
    registered_at: float
    gpus: list[GpuSpec] = field(default_factory=list)
    live: dict[str, tuple[int, float]] = field(default_factory=dict)  # uuid -> (bytes, busy)
    persisted_at: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "addr": self.addr,
            "unix_socket": self.unix_socket,
            "version": self.version,
            "protocol_version": self.protocol_version,
            "vgpu_count": self.vgpu_count,
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "registered_at": self.registered_at,
        }


class ControllerService:
    def __init__(
        self, settings: ControllerSettings, token: str, clock: Callable[[], float] = time.time
    ):
        self.settings = settings
        self._token = token.encode()
        self._key = grant_key(token)
        self.clock = clock
        self.store = Store(settings.db_url or sqlite_url(settings.data_dir))
        self.scheduler = Scheduler(settings.policy)  # type: ignore[arg-type]
        self.nodes: dict[str, NodeInfo] = {}
        self.node_ids: dict[str, str] = {}  # name -> id
        self.node_version = 0  # bumped when a node registers (new name or new GPUs)
        self.view_cache: dict[str, Any] = {}  # views.py keeps derived data here
        self.live: dict[str, StoredAllocation] = {}  # pending and active allocations
        self.by_node: dict[str, set[str]] = {}
        self.reported: dict[tuple[str, int], float] = {}  # last time a server listed a session
        # (allocation, vGPU) -> (memory used bytes, busy %) from the node's last heartbeat
        self.vgpu_live: dict[tuple[str, int], tuple[int, float]] = {}
        self.metrics = ControllerMetrics()
        self.started_at = clock()
        self._changed = asyncio.Event()
        self.accounts = Accounts(AccountStore(self.store.engine), settings.session_ttl_s, clock)
        self.history = UsageHistory(self.store.engine, settings.history_keep_s, self.started_at)
        self._load()
        self.metrics.attach(self)

    # ----- startup -----------------------------------------------------------------------

    def _load(self) -> None:
        """Nodes come back down (until they heartbeat); live allocations keep their GPUs."""
        for row, gpus in self.store.load_nodes():
            specs = [
                GpuSpec(g["index"], g["uuid"], g["name"], g["memory_mib"], g["emulated"])
                for g in gpus
            ]
            node = NodeInfo(**{**row, "state": "down"}, gpus=specs)
            self.nodes[node.id] = node
            self.node_ids[node.name] = node.id
            self.scheduler.upsert_node(node.id, node.name, node.vgpu_count, specs, up=False)
            if row["state"] != "down":
                self.store.update_node(node.id, state="down")
        for a in self.store.load_allocations(LIVE_STATES):
            try:
                self.scheduler.apply(a.id, [_placement(v) for v in a.vgpus], a.user)
            except KeyError:
                self.store.end_allocation(
                    a.id, "failed", self.clock(), "GPU unknown after controller restart"
                )
                continue
            self._track(a)
        log.info(
            "loaded %d nodes (down until they heartbeat) and %d live allocations",
            len(self.nodes),
            len(self.live),
        )

    def close(self) -> None:
        self.store.close()

    def sample(self) -> Sample:
        """Record the pool's usage now (for the charts); returns the sample."""
        s = Sample.of(self.clock(), totals(self), per_user(self))
        self.history.record(s)
        return s

    # ----- auth --------------------------------------------------------------------------

    def is_pool_token(self, value: str) -> bool:
        return hmac.compare_digest(value.encode(), self._token)

    def check_token(self, authorization: str | None) -> None:
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), self._token
        ):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong pool token (send Authorization: Bearer <pool token>)",
            )

    # ----- clients -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "name": "orion-controller",
            "version": __version__,
            "api_version": API_VERSION,
            "data_version": DATA_VERSION,
        }

    def pool(self) -> dict[str, Any]:
        nodes, gpus = [], []
        for node in self.nodes.values():
            sched = self.scheduler.nodes[node.id]
            nodes.append(
                {
                    **node.row(),
                    "gpu_count": len(node.gpus),
                    "vgpu_free": sched.free_default if node.state == "up" else 0,
                }
            )
            for g in sched.gpus:
                used, busy = node.live.get(g.spec.uuid, (0, 0.0))
                gpus.append({
                    "node_id": node.id, "node_name": node.name, "node_addr": node.addr,
                    "index": g.spec.index, "uuid": g.spec.uuid, "name": g.spec.name,
                    "memory_mib": g.spec.memory_mib, "memory_allocated_mib": g.mem_alloc,
                    "compute_allocated": g.ratio_alloc, "vgpu_count": g.vgpu_count,
                    "vgpus_placed": g.placed, "vgpu_free": g.free_default(),
                    "emulated": g.spec.emulated, "state": node.state,
                    "mem_used_bytes": used, "busy_pct": busy,
                })  # fmt: skip
        return {
            "vgpu_total": self.scheduler.vgpu_total(),
            "vgpu_free": self.scheduler.vgpu_free(),
            "nodes": nodes,
            "gpus": gpus,
        }

    async def allocate(
        self,
        body: schemas.AllocationIn,
        gone: Callable[[], Awaitable[bool]] | None = None,
        owner: Owner | None = None,
    ) -> dict[str, Any]:
        """Place the request now, or wait (event driven) up to ``wait_s`` for room.

        ``gone`` tells whether the client hung up; a waiter that left must not take
        resources nobody will use (they would sit idle until the lease lapses). A user
        at their limit waits the same way, for their own allocations to end.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body.wait_s
        first = True
        while True:
            changed = self._changed
            if not first and gone is not None and await gone():
                raise ApiError(409, "insufficient_resources", "client went away while waiting")
            first = False
            try:
                return self.try_allocate(body, owner)
            except (NoFit, OverLimit) as exc:
                hopeless = isinstance(exc, OverLimit) and not exc.can_wait
                remaining = 0.0 if hopeless else deadline - loop.time()
                if remaining <= 0:
                    waited = f" (waited {body.wait_s:g} s)" if body.wait_s and not hopeless else ""
                    code = "limit_exceeded" if isinstance(exc, OverLimit) else "insufficient_resources"
                    raise ApiError(409, code, f"{exc}{waited}") from None
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def try_allocate(self, body: schemas.AllocationIn, owner: Owner | None = None) -> dict[str, Any]:
        """Place now or raise NoFit / OverLimit (ApiError 400 for an impossible request).

        Without an authenticated owner (open mode) the allocation is recorded under the
        user the client reported; that name still counts in per-user usage and charts.
        """
        user = owner.user if owner else (body.user or "anonymous")
        req = Request(body.vgpu, body.gmem_mib, body.ratio, body.cross_node, body.policy)
        alloc_id = str(uuid.uuid4())
        started = time.perf_counter()
        outcome = "granted"
        try:
            placements = self.scheduler.allocate(alloc_id, req, user, owner.limits if owner else None)
        except BadRequest as exc:
            outcome = "bad_request"
            raise ApiError(400, "bad_request", str(exc)) from None
        except NoFit:
            outcome = "no_fit"
            raise
        except OverLimit:
            outcome = "over_limit"
            raise
        finally:
            self.metrics.schedule_seconds(time.perf_counter() - started, outcome)
        now = self.clock()
        request = body.model_dump(include={"vgpu", "gmem_mib", "ratio", "cross_node", "policy", "wait_s"})
        request.update(os_user=body.user, auth=owner.via if owner else "none")
        a = StoredAllocation(
            id=alloc_id, state="pending", user=user, host=body.host, pid=body.pid,
            command=body.command, created_at=now, ended_at=None, end_reason=None,
            lease_expires_at=now + self.settings.lease_s, request=request,
            vgpus=[StoredVgpu(p.index, p.node_id, p.gpu_uuid, p.gpu_index, p.gmem_mib, p.ratio) for p in placements],
        )  # fmt: skip
        try:
            self.store.insert_allocation(a)
        except Exception:
            self.scheduler.release(alloc_id)
            raise
        self._track(a)
        self.metrics.allocation_created(user)
        grants = {p.index: self._grant(a, p, now) for p in placements}
        log.info(
            "allocation %s granted %d vGPU on %s to %s",
            a.id,
            len(placements),
            self._where(a),
            _who(a),
        )
        return self.alloc_json(a, grants)

    def _grant(self, a: StoredAllocation, p: Placement, now: float) -> str:
        claims = {
            "alloc": a.id, "vgpu": p.index, "node": p.node_id, "gpu": p.gpu_uuid,
            "gpu_index": p.gpu_index, "gmem_mib": p.gmem_mib, "ratio": p.ratio,
            "exp": now + self.settings.lease_s + GRANT_GRACE_S, "nonce": secrets.token_hex(8),
        }  # fmt: skip
        return sign_grant(self._key, claims)

    def get(self, alloc_id: str) -> dict[str, Any]:
        return self.alloc_json(self._find(alloc_id))

    def list_allocations(self, state: str, limit: int) -> list[dict[str, Any]]:
        if state == "active":
            allocs = sorted(self.live.values(), key=lambda a: a.created_at, reverse=True)[:limit]
        else:
            states = ENDED_STATES if state == "ended" else None
            allocs = self.store.load_allocations(states, limit=limit)
            allocs = [self.live.get(a.id, a) for a in allocs]
        return [self.alloc_json(a) for a in allocs]

    def release(self, alloc_id: str, reason: str = "released by client") -> dict[str, Any]:
        a = self._find(alloc_id)
        if a.id in self.live:
            self._end(a, "released", reason)
        return self.alloc_json(a)

    def find(self, alloc_id: str) -> StoredAllocation:
        """The allocation (live or from the store); ApiError 404 if unknown."""
        return self._find(alloc_id)

    def _find(self, alloc_id: str) -> StoredAllocation:
        a = self.live.get(alloc_id)
        if a is None:
            found = self.store.load_allocations(alloc_id=alloc_id)
            if not found:
                raise ApiError(404, "not_found", f"no allocation {alloc_id!r}")
            a = found[0]
        return a

    # ----- servers -----------------------------------------------------------------------

    def register(self, body: schemas.RegisterIn) -> dict[str, Any]:
        now = self.clock()
        node_id = self.node_ids.get(body.name) or str(uuid.uuid4())
        old = self.nodes.get(node_id)
        specs = [GpuSpec(g.index, g.uuid, g.name, g.memory_mib, g.emulated) for g in body.gpus]
        node = NodeInfo(
            id=node_id, name=body.name, addr=body.addr, unix_socket=body.unix_socket,
            version=body.version, protocol_version=body.protocol_version,
            vgpu_count=body.vgpu_count, state="up", last_heartbeat=now,
            registered_at=old.registered_at if old else now, gpus=specs, persisted_at=now,
        )  # fmt: skip
        lost = self.scheduler.upsert_node(node_id, body.name, body.vgpu_count, specs, up=True)
        self.nodes[node_id] = node
        self.node_ids[body.name] = node_id
        self.node_version += 1  # views cache their node ordering on this
        gpu_rows = [
            {"index": s.index, "uuid": s.uuid, "name": s.name, "memory_mib": s.memory_mib,
             "vgpu_count": body.vgpu_count, "emulated": s.emulated}
            for s in specs
        ]  # fmt: skip
        self.store.save_node(node.row(), gpu_rows)
        for alloc_id in lost:
            self._end(
                self.live[alloc_id], "failed", f"GPU gone or shrunk when {body.name} re-registered"
            )
        total = len(specs) * body.vgpu_count
        log.info("node %s %s: %d GPU, %d vGPU, addr %s, version %s", body.name,
                 "re-registered" if old else "registered", len(specs), total, body.addr, body.version)  # fmt: skip
        self._notify()
        return {
            "node_id": node_id,
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "heartbeat_timeout_s": self.settings.heartbeat_timeout_s,
        }

    def heartbeat(self, node_id: str, body: schemas.HeartbeatIn) -> dict[str, Any]:
        node = self._node(node_id)
        now = self.clock()
        node.last_heartbeat = now
        if node.state != "up":
            self._set_up(node, True)
            log.info("node %s is up (heartbeat)", node.name)
            self._notify()
        known = {g.uuid for g in node.gpus}
        for g in body.gpus:
            if g.uuid in known:  # ignore others: a node must not grow our memory at will
                node.live[g.uuid] = (g.mem_used_bytes, g.busy_pct)
        end: list[dict[str, Any]] = []
        if body.sessions is not None:
            self._reconcile(node, body.sessions, now)
            end = self._sessions_to_end(node, body.sessions)
        if now - node.persisted_at >= PERSIST_HEARTBEAT_S:
            node.persisted_at = now
            self.store.update_node(node.id, last_heartbeat=now)
            self.store.update_gpu_live(node.id, [(u, m, b) for u, (m, b) in node.live.items()])
        # end_sessions only when there are some: older nodes read {"ok": true} alone.
        return {"ok": True, "end_sessions": end} if end else {"ok": True}

    def _sessions_to_end(
        self, node: NodeInfo, sessions: list[schemas.SessionIn]
    ) -> list[dict[str, Any]]:
        """Sessions the node runs for allocations that are over (released, lease lapsed,
        ended by an admin) or not its own: their vGPUs may be someone else's by now."""
        end = []
        for s in sessions:
            a = self.live.get(s.allocation_id)
            if a is not None and _holds(a, s.vgpu_index, node):
                continue
            if a is not None:
                reason = f"vGPU {s.vgpu_index} of allocation {a.id} is not on this node"
            else:
                ended = self.store.load_allocations(alloc_id=s.allocation_id)
                reason = (_ended_desc(ended[0]) if ended
                          else f"allocation {s.allocation_id} is unknown to the controller")
            log.warning("allocation %s vGPU %d: %s still runs a session; told to end it (%s)",
                        s.allocation_id, s.vgpu_index, node.name, reason)
            end.append({"allocation_id": s.allocation_id, "vgpu_index": s.vgpu_index,
                        "reason": reason})
        return end

    def _reconcile(self, node: NodeInfo, sessions: list[schemas.SessionIn], now: float) -> None:
        """The server's session list is the truth: it proves sessions started, and a
        started session it stops listing (server restarted, event lost) is gone."""
        listed = {(s.allocation_id, s.vgpu_index) for s in sessions}
        for s in sessions:
            a = self.live.get(s.allocation_id)
            # Only vGPUs this node really holds: a node must not report for another's.
            if a is not None and _holds(a, s.vgpu_index, node):
                self.vgpu_live[(s.allocation_id, s.vgpu_index)] = (s.mem_used_bytes, s.busy_pct)
        timeout = self.settings.heartbeat_timeout_s
        for alloc_id in list(self.by_node.get(node.id, ())):
            a = self.live[alloc_id]
            mine = [v for v in a.vgpus if v.node_id == node.id]
            seen = [v.index for v in mine if (a.id, v.index) in listed]
            for i in seen:
                self.reported[(a.id, i)] = now
            fresh = [i for i in seen if not a.vgpus[i].session_started]
            if fresh:
                self._start(a, fresh, node)
            for v in mine:
                key = (a.id, v.index)
                if (
                    v.session_started
                    and key not in listed
                    and now - self.reported.get(key, now) > timeout
                ):
                    self._end(
                        a, "failed", f"session gone: {node.name} stopped reporting vGPU {v.index}"
                    )
                    break

    def event(self, node_id: str, body: schemas.EventIn) -> dict[str, Any]:
        node = self._node(node_id)
        a = self.live.get(body.allocation_id)
        if a is None:
            ended = self.store.load_allocations(alloc_id=body.allocation_id)
            if not ended:
                raise ApiError(404, "not_found", f"no allocation {body.allocation_id!r}")
            if body.type == "session_ended":
                return {"ok": True}  # already over; nothing to do
            raise ApiError(409, "allocation_ended", _ended_desc(ended[0]))
        if not _holds(a, body.vgpu_index, node):
            raise ApiError(
                400,
                "bad_request",
                f"vGPU {body.vgpu_index} of allocation {a.id} is not on node {node.name}",
            )
        if body.type == "session_started":
            self.reported[(a.id, body.vgpu_index)] = self.clock()
            if not a.vgpus[body.vgpu_index].session_started:
                self._start(a, [body.vgpu_index], node)
        else:
            reason = body.reason or f"session ended on {node.name}"
            # A program closing its session is ending: the same as its own release, which
            # follows at once; whichever reaches us first, the allocation ends alike.
            if reason == REASON_CLIENT_CLOSED:
                reason = "released by client"
            self._end(a, "released", reason)
        return {"ok": True}

    def _node(self, node_id: str) -> NodeInfo:
        node = self.nodes.get(node_id)
        if node is None:
            raise ApiError(404, "unknown_node", f"no node {node_id!r}; register again")
        return node

    # ----- state changes -----------------------------------------------------------------

    def _start(self, a: StoredAllocation, indexes: list[int], node: NodeInfo) -> None:
        for i in indexes:
            a.vgpus[i].session_started = True
        if a.state == "pending" and all(v.session_started for v in a.vgpus):
            a.state = "active"
        self.store.mark_started(a.id, indexes, a.state)
        gpus = ", ".join(f"vGPU {i} on gpu {a.vgpus[i].gpu_index}" for i in indexes)
        log.info(
            "allocation %s session started on %s (%s); state %s", a.id, node.name, gpus, a.state
        )

    def _end(self, a: StoredAllocation, state: str, reason: str) -> None:
        now = self.clock()
        # Store first: if it fails nothing changed in memory and the next pass retries.
        self.store.end_allocation(a.id, state, now, reason)
        self.scheduler.release(a.id)
        a.state, a.ended_at, a.end_reason = state, now, reason
        self.live.pop(a.id, None)
        for v in a.vgpus:
            self.reported.pop((a.id, v.index), None)
            self.vgpu_live.pop((a.id, v.index), None)
            self.by_node.get(v.node_id, set()).discard(a.id)
        self.metrics.allocation_ended(a.user, state)
        log.info("allocation %s %s (%s) after %.1f s: %d vGPU on %s of %s", a.id, state, reason,
                 now - a.created_at, len(a.vgpus), self._where(a), _who(a))  # fmt: skip
        self._notify()

    def _track(self, a: StoredAllocation) -> None:
        self.live[a.id] = a
        for v in a.vgpus:
            self.by_node.setdefault(v.node_id, set()).add(a.id)

    def _set_up(self, node: NodeInfo, up: bool) -> None:
        node.state = "up" if up else "down"
        self.scheduler.set_node_up(node.id, up)
        self.store.update_node(node.id, state=node.state, last_heartbeat=node.last_heartbeat)

    def _notify(self) -> None:
        """Wake allocation requests waiting for room (they retry in arrival order)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def reap(self) -> None:
        """End lapsed leases and allocations on dead nodes; mark silent nodes down."""
        now = self.clock()
        lease = self.settings.lease_s
        for a in [
            a for a in self.live.values() if a.state == "pending" and a.lease_expires_at <= now
        ]:
            waiting = [
                f"vGPU {v.index} ({self.nodes[v.node_id].name})"
                for v in a.vgpus
                if not v.session_started
            ]
            self._end(
                a,
                "expired",
                f"lease expired: no session started within {lease:g} s on {', '.join(waiting)}",
            )
        timeout = self.settings.heartbeat_timeout_s
        for node in self.nodes.values():
            # Nodes restored at startup get a full timeout from our start to check in.
            if now - max(node.last_heartbeat, self.started_at) <= timeout:
                continue
            if node.state == "up":
                self._set_up(node, False)
                log.warning(
                    "node %s is down: no heartbeat for %.1f s", node.name, now - node.last_heartbeat
                )
            for alloc_id in list(self.by_node.get(node.id, ())):
                self._end(self.live[alloc_id], "failed", "node down")

    # ----- views -------------------------------------------------------------------------

    def alloc_json(
        self, a: StoredAllocation, grants: dict[int, str] | None = None
    ) -> dict[str, Any]:
        return {
            "id": a.id, "state": a.state, "user": a.user, "host": a.host, "pid": a.pid,
            "command": a.command, "created_at": a.created_at, "ended_at": a.ended_at,
            "end_reason": a.end_reason, "lease_expires_at": a.lease_expires_at,
            "vgpus": [self._vgpu_json(v, (grants or {}).get(v.index)) for v in a.vgpus],
        }  # fmt: skip

    def _vgpu_json(self, v: StoredVgpu, grant: str | None) -> dict[str, Any]:
        node = self.nodes.get(v.node_id)
        spec = next((g for g in node.gpus if g.uuid == v.gpu_uuid), None) if node else None
        return {
            "index": v.index, "node_id": v.node_id,
            "node_name": node.name if node else None, "node_addr": node.addr if node else None,
            "unix_socket": node.unix_socket if node else None, "gpu_index": v.gpu_index,
            "gpu_uuid": v.gpu_uuid, "gpu_name": spec.name if spec else None,
            "emulated": spec.emulated if spec else None, "gmem_mib": v.gmem_mib,
            "ratio": v.ratio, "session_started": v.session_started, "grant": grant,
        }  # fmt: skip

    def _where(self, a: StoredAllocation) -> str:
        per_node: dict[str, list[str]] = {}
        for v in a.vgpus:
            node = self.nodes.get(v.node_id)
            per_node.setdefault(node.name if node else v.node_id, []).append(f"gpu {v.gpu_index}")
        return ", ".join(f"{n} ({', '.join(g)})" for n, g in per_node.items())


def _holds(a: StoredAllocation, vgpu_index: int, node: NodeInfo) -> bool:
    """Whether vGPU ``vgpu_index`` of ``a`` is placed on ``node``."""
    return 0 <= vgpu_index < len(a.vgpus) and a.vgpus[vgpu_index].node_id == node.id


def _ended_desc(a: StoredAllocation) -> str:
    return f"allocation {a.id} is {a.state}: {a.end_reason}"


def _who(a: StoredAllocation) -> str:
    who = f"{a.user or '?'}@{a.host or '?'}"
    return f"{who} pid {a.pid}" if a.pid is not None else who


def _placement(v: StoredVgpu) -> Placement:
    return Placement(v.index, v.node_id, v.gpu_uuid, v.gpu_index, v.gmem_mib, v.ratio)
