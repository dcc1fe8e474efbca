"""Durable controller state (SQLAlchemy 2.0): nodes, GPUs, allocations and their vGPUs.

The scheduler in memory is the source of truth while the controller runs; every change
is written through here so a restarted controller (even after kill -9) gets it back.
SQLite (WAL) by default; any SQLAlchemy URL works (PostgreSQL for HA).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

LIVE_STATES = ("pending", "active")
ENDED_STATES = ("released", "expired", "failed")


class StoreError(Exception):
    """The database cannot be opened or used (one line, password redacted)."""


class Base(DeclarativeBase):
    pass


class NodeRow(Base):
    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    addr: Mapped[str] = mapped_column(String(300))
    unix_socket: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    protocol_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vgpu_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    last_heartbeat: Mapped[float] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)


class GpuRow(Base):
    __tablename__ = "gpus"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    memory_mib: Mapped[int] = mapped_column(Integer)
    vgpu_count: Mapped[int] = mapped_column(Integer)
    emulated: Mapped[bool] = mapped_column(Boolean, default=False)
    mem_used_bytes: Mapped[int] = mapped_column(Integer, default=0)
    busy_pct: Mapped[float] = mapped_column(Float, default=0.0)


class AllocationRow(Base):
    __tablename__ = "allocations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    user: Mapped[str] = mapped_column(String(256), default="")
    host: Mapped[str] = mapped_column(String(256), default="")
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    command: Mapped[str] = mapped_column(String(4096), default="")
    created_at: Mapped[float] = mapped_column(Float, index=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    end_reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)


class AllocationVgpuRow(Base):
    __tablename__ = "allocation_vgpus"
    allocation_id: Mapped[str] = mapped_column(ForeignKey("allocations.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    gpu_uuid: Mapped[str] = mapped_column(String(128))
    gpu_index: Mapped[int] = mapped_column(Integer)
    gmem_mib: Mapped[int] = mapped_column(Integer)
    ratio: Mapped[int] = mapped_column(Integer)
    session_started: Mapped[bool] = mapped_column(Boolean, default=False)


NODES = NodeRow.__table__
GPUS = GpuRow.__table__
ALLOCS = AllocationRow.__table__
VGPUS = AllocationVgpuRow.__table__


@dataclass(slots=True)
class StoredVgpu:
    index: int
    node_id: str
    gpu_uuid: str
    gpu_index: int
    gmem_mib: int
    ratio: int
    session_started: bool = False


@dataclass(slots=True)
class StoredAllocation:
    id: str
    state: str
    user: str
    host: str
    pid: int | None
    command: str
    created_at: float
    ended_at: float | None
    end_reason: str | None
    lease_expires_at: float
    request: dict[str, Any]
    vgpus: list[StoredVgpu] = field(default_factory=list)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'controller.db'}"


class Store:
    """Thin write-through layer; each call is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            _create_private_sqlite_file(url)
            self.engine: Engine = create_engine(url, json_serializer=_dumps)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            Base.metadata.create_all(self.engine)
            # Tables made by older versions lack indexes added since; create_all skips them.
            for index in ALLOCS.indexes:
                index.create(self.engine, checkfirst=True)
        except (SQLAlchemyError, ImportError) as exc:
            shown = _redact(url)
            raise StoreError(f"cannot open database {shown}: {str(exc).splitlines()[0]}") from exc

    def close(self) -> None:
        self.engine.dispose()

    # ----- nodes -------------------------------------------------------------------------

    def save_node(self, node: dict[str, Any], gpus: Sequence[dict[str, Any]]) -> None:
        """Insert or replace a node and its GPU list (re-registration may change GPUs)."""
        with self.engine.begin() as conn:
            conn.execute(delete(GPUS).where(GPUS.c.node_id == node["id"]))
            exists = conn.execute(select(NODES.c.id).where(NODES.c.id == node["id"])).first()
            if exists:
                conn.execute(update(NODES).where(NODES.c.id == node["id"]).values(**node))
            else:
                conn.execute(insert(NODES).values(**node))
            if gpus:
                conn.execute(insert(GPUS), [{"node_id": node["id"], **g} for g in gpus])

    def update_node(self, node_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(NODES).where(NODES.c.id == node_id).values(**values))

    def update_gpu_live(self, node_id: str, live: Iterable[tuple[str, int, float]]) -> None:
        """Persist heartbeat usage: (uuid, mem_used_bytes, busy_pct) per GPU."""
        rows = [{"n": node_id, "u": u, "m": m, "b": b} for u, m, b in live]
        if not rows:
            return
        stmt = (
            update(GPUS)
            .where(GPUS.c.node_id == bindparam("n"), GPUS.c.uuid == bindparam("u"))
            .values(mem_used_bytes=bindparam("m"), busy_pct=bindparam("b"))
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def load_nodes(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        with self.engine.connect() as conn:
            nodes = [dict(r._mapping) for r in conn.execute(select(NODES))]
            gpus = [dict(r._mapping) for r in conn.execute(select(GPUS).order_by(GPUS.c.index))]
        by_node: dict[str, list[dict[str, Any]]] = {n["id"]: [] for n in nodes}
        for g in gpus:
            by_node.setdefault(g["node_id"], []).append(g)
        return [(n, by_node[n["id"]]) for n in nodes]

    # ----- allocations -------------------------------------------------------------------

    def insert_allocation(self, a: StoredAllocation) -> None:
        row = {k: getattr(a, k) for k in _ALLOC_COLUMNS}
        vgpus = [{"allocation_id": a.id, **_vgpu_dict(v)} for v in a.vgpus]
        with self.engine.begin() as conn:
            conn.execute(insert(ALLOCS).values(**row))
            if vgpus:
                conn.execute(insert(VGPUS), vgpus)

    def mark_started(self, alloc_id: str, indexes: Iterable[int], state: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(VGPUS)
                .where(VGPUS.c.allocation_id == alloc_id, VGPUS.c.index.in_(list(indexes)))
                .values(session_started=True)
            )
            conn.execute(update(ALLOCS).where(ALLOCS.c.id == alloc_id).values(state=state))

    def end_allocation(self, alloc_id: str, state: str, ended_at: float, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(ALLOCS)
                .where(ALLOCS.c.id == alloc_id)
                .values(state=state, ended_at=ended_at, end_reason=reason)
            )

    def load_allocations(
        self,
        states: Sequence[str] | None = None,
        alloc_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        order_by_end: bool = False,
        user: str | None = None,
    ) -> list[StoredAllocation]:
        """Allocations (newest first, or last ended first) by state and/or id, with vGPUs."""
        order = ALLOCS.c.ended_at.desc() if order_by_end else ALLOCS.c.created_at.desc()
        q = select(ALLOCS).order_by(order, ALLOCS.c.id)
        if states is not None:
            q = q.where(ALLOCS.c.state.in_(list(states)))
        if alloc_id is not None:
            q = q.where(ALLOCS.c.id == alloc_id)
        if user is not None:
            q = q.where(ALLOCS.c.user == user)
        if limit is not None:
            q = q.limit(limit)
        if offset:
            q = q.offset(offset)
        with self.engine.connect() as conn:
            allocs = [_alloc_from(dict(r._mapping)) for r in conn.execute(q)]
            if not allocs:
                return []
            by_id = {a.id: a for a in allocs}
            vq = select(VGPUS).where(VGPUS.c.allocation_id.in_(list(by_id))).order_by(VGPUS.c.index)
            for r in conn.execute(vq):
                m = dict(r._mapping)
                by_id[m.pop("allocation_id")].vgpus.append(StoredVgpu(**m))
        return allocs


    def count_allocations(self, states: Sequence[str], user: str | None = None) -> int:
        q = select(func.count()).select_from(ALLOCS).where(ALLOCS.c.state.in_(list(states)))
        if user is not None:
            q = q.where(ALLOCS.c.user == user)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def usage_by_user(self, since: float, until: float) -> dict[str, dict[str, float]]:
        """Per user over [since, until]: allocations that overlap it, vGPU-hours and GPU
        memory GiB-hours within it. Aggregated in SQL: history grows, the answer does not."""
        a, v = ALLOCS.c, VGPUS.c
        lo = case((a.created_at < since, since), else_=a.created_at)
        hi = case((a.ended_at.is_(None), until), (a.ended_at > until, until), else_=a.ended_at)
        per_alloc = (
            select(a.user.label("user"), (hi - lo).label("secs"),
                   func.count(v.index).label("vgpus"),
                   func.coalesce(func.sum(v.gmem_mib), 0).label("mib"))  # fmt: skip
            .select_from(ALLOCS.outerjoin(VGPUS, v.allocation_id == a.id))
            .where(and_(a.created_at <= until, or_(a.ended_at.is_(None), a.ended_at >= since)))
            .group_by(a.id, a.user, a.created_at, a.ended_at)
            .subquery()
        )
        q = select(
            per_alloc.c.user,
            func.count(),
            func.sum(per_alloc.c.secs * per_alloc.c.vgpus),
            func.sum(per_alloc.c.secs * per_alloc.c.mib),
        ).group_by(per_alloc.c.user)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return {
            user: {"allocations": int(n), "vgpu_hours": round(float(vs or 0) / 3600, 3),
                   "gmem_gib_hours": round(float(ms or 0) / 3600 / 1024, 3)}
            for user, n, vs, ms in rows
        }  # fmt: skip


_ALLOC_COLUMNS = (
    "id", "state", "user", "host", "pid", "command", "created_at", "ended_at",
    "end_reason", "lease_expires_at", "request",
)  # fmt: skip


def _vgpu_dict(v: StoredVgpu) -> dict[str, Any]:
    return {
        "index": v.index,
        "node_id": v.node_id,
        "gpu_uuid": v.gpu_uuid,
        "gpu_index": v.gpu_index,
        "gmem_mib": v.gmem_mib,
        "ratio": v.ratio,
        "session_started": v.session_started,
    }


def _alloc_from(m: dict[str, Any]) -> StoredAllocation:
    return StoredAllocation(**m)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "<unparsable URL>"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _create_private_sqlite_file(url: str) -> None:
    """The pool's secrets-adjacent state (users, tokens' hashes) must not be world-readable;
    SQLite gives its -wal/-shm files the database file's mode, so creating it 0600 covers them."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers never block the writer; NORMAL sync is crash-safe for the process
    # (kill -9) in WAL mode and keeps commits well under a millisecond.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
