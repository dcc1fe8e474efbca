"""Usage over time: a sample of the pool every ``sample_interval_s`` for the charts.
(Per-user usage over a period comes from the allocations: ``Store.usage_by_user``.)

Samples are kept in memory for the longest chart window and in the ``usage_samples``
table for ``history_keep_s`` (so charts survive a restart).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Float, delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from orion_vgpu.controller.poolstats import Totals
from orion_vgpu.controller.store import Base

CHART_MAX_S = 24 * 3600.0  # longest chart window the pages offer
PRUNE_EVERY_S = 3600.0


class UsageSampleRow(Base):
    __tablename__ = "usage_samples"
    ts: Mapped[float] = mapped_column(Float, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


SAMPLES = UsageSampleRow.__table__


@dataclass(slots=True)
class Sample:
    ts: float
    vgpu_total: int
    vgpu_used: int
    mem_total_mib: int
    mem_alloc_mib: int
    mem_used_mib: float
    compute_total: int
    compute_alloc: int
    busy: float
    allocations: int
    nodes_up: int
    nodes_down: int
    per_user: dict[str, list[int]] = field(default_factory=dict)  # user -> [vGPUs, MiB, allocs]

    @classmethod
    def of(cls, ts: float, t: Totals, per_user: dict[str, list[int]]) -> Sample:
        return cls(ts, t.vgpu_total, t.vgpu_used, t.mem_total_mib, t.mem_alloc_mib,
                   t.mem_used_mib, t.compute_total, t.compute_alloc, round(t.busy, 1),
                   t.pending + t.active, t.nodes_up, t.nodes_down, per_user)  # fmt: skip

    def data(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "ts"}  # type: ignore[attr-defined]


class UsageHistory:
    def __init__(self, engine: Engine, keep_s: float, now: float) -> None:
        self.engine = engine
        self.keep_s = keep_s
        Base.metadata.create_all(engine, tables=[SAMPLES])
        self.samples: list[Sample] = []
        self._pruned_at = 0.0
        self._load(now)

    def _load(self, now: float) -> None:
        q = select(SAMPLES).where(SAMPLES.c.ts >= now - CHART_MAX_S).order_by(SAMPLES.c.ts)
        with self.engine.connect() as conn:
            for row in conn.execute(q):
                try:
                    self.samples.append(Sample(ts=row.ts, **row.data))
                except TypeError:  # a sample written by another version: skip it
                    continue

    def record(self, sample: Sample) -> None:
        if self.samples and sample.ts <= self.samples[-1].ts:
            return  # clock went back: keep the series monotonic
        with self.engine.begin() as conn:
            conn.execute(insert(SAMPLES).values(ts=sample.ts, data=sample.data()))
            if sample.ts - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = sample.ts
                conn.execute(delete(SAMPLES).where(SAMPLES.c.ts < sample.ts - self.keep_s))
        self.samples.append(sample)
        cut = bisect.bisect_left(self.samples, sample.ts - CHART_MAX_S, key=lambda s: s.ts)
        if cut:
            del self.samples[:cut]

    def since(self, ts: float) -> list[Sample]:
        i = bisect.bisect_left(self.samples, ts, key=lambda s: s.ts)
        return self.samples[i:]
