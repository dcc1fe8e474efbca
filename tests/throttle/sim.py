"""A deterministic discrete-event model of sessions sharing one device under the policy.

Each simulated session runs batches of ``batch`` ops of ``op_s`` seconds, then spends
``gap_s`` off the device (its client's sync round trip), from ``start`` until ``until``.
Turn-taking uses the real policy (``Pace``, ``contenders``, ``catch_up``, ``turn_delay``)
the way ``Throttle.before_op`` does: a session that is allowed queues for the device
lock, and its time slice starts; others sleep for the delay the policy asks for, or
until woken through the table's futex (a slice handed on, an op of a light session
ended), and look again.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from orion_vgpu.server.throttle import (
    ACTIVE_WINDOW_S,
    BACKLOGGED,
    IDLE,
    Pace,
    Peer,
    catch_up,
    contenders,
    share_of,
    slice_delay,
    turn_delay,
)


@dataclass
class SimSession:
    ratio: float
    op_s: float = 0.002
    batch: int = 8
    gap_s: float = 0.0005
    start: float = 0.0
    until: float = 1e9
    share: float = 0.0
    vtime: float = 0.0
    state: int = IDLE
    last_end: float = -1.0
    stamp: float = 0.0
    left_in_batch: int = 0
    pace: Pace = field(default_factory=Pace)
    busy_log: list[tuple[float, float]] = field(default_factory=list)  # (start, end)

    def __post_init__(self) -> None:
        self.share = share_of(self.ratio)
        self.left_in_batch = self.batch

    def peer(self, i: int) -> Peer:
        return Peer(i, self.share, self.vtime, self.state, self.last_end, self.stamp, 0.0,
                    self.pace.duty(), self.pace.anticipate())

    def busy_between(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in self.busy_log)

    def share_between(self, t0: float, t1: float) -> float:
        return self.busy_between(t0, t1) / (t1 - t0)


class Sim:
    def __init__(self, sessions: list[SimSession]) -> None:
        self.s = sessions
        self.now = 0.0
        self.events: list[tuple[float, int, int, bool]] = []  # (time, seq, session, fresh)
        self.seq = 0
        self.holder: int | None = None   # who holds the device lock
        self.owner: int | None = None    # whose time slice it is
        self.queue: list[int] = []       # allowed sessions blocked on the lock
        self.sleeping: set[int] = set()  # sessions waiting for a delay or the futex
        self.pending: dict[int, int] = {}  # session -> seq of its one live event
        for i, x in enumerate(sessions):
            self.at(x.start, i, True)

    def at(self, t: float, i: int, fresh: bool) -> None:
        """Session i looks again at t (earlier events of i are dropped); i < 0: an op ends."""
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, i, fresh))
        if i >= 0:
            self.pending[i] = self.seq

    def others(self, i: int) -> list[Peer]:
        return [x.peer(j) for j, x in enumerate(self.s) if j != i and x.start <= self.now]

    def want(self, i: int, fresh: bool) -> None:
        """Session i has an op ready (``fresh``: it just arrived, else it looks again)."""
        me = self.s[i]
        if fresh and me.last_end >= 0:
            me.pace.paused(self.now - me.last_end)
        active = contenders(self.others(i), self.now)
        returning = fresh and (me.last_end < 0 or self.now - me.last_end > ACTIVE_WINDOW_S)
        me.vtime = catch_up(me.vtime, me.share, active, returning)
        delay = turn_delay(me.vtime, me.share, active, self.now, me.pace.busy)
        if self.owner == i:
            if delay > 0:  # its slice is over: it hands it on (and wakes the sleepers)
                self.owner = None
                self.wake()
        elif self.owner is not None:
            owner = next((p for p in active if p.slot == self.owner), None)
            delay = max(delay, slice_delay(owner, me.vtime, active, self.now, me.pace.busy))
        me.state, me.stamp = BACKLOGGED, self.now
        if delay > 0:
            self.sleeping.add(i)
            self.at(self.now + delay, i, False)
        elif self.holder is None:
            self.run(i)
        else:
            self.queue.append(i)

    def run(self, i: int) -> None:
        me = self.s[i]
        self.holder = i
        self.owner = i
        me.busy_log.append((self.now, self.now + me.op_s))
        self.at(self.now + me.op_s, -1 - i, False)  # negative: op of session i ends

    def op_done(self, i: int) -> None:
        me = self.s[i]
        me.vtime += me.op_s / me.share
        me.pace.ran(me.op_s)
        me.state, me.last_end, me.stamp = IDLE, self.now, self.now
        self.holder = None
        me.left_in_batch -= 1
        if me.left_in_batch == 0:
            me.left_in_batch = me.batch
            if self.now + me.gap_s < me.until:
                self.at(self.now + me.gap_s, i, True)
        elif self.now < me.until:
            self.want(i, True)  # the holder asks again first, as the releasing process does
        if self.holder is None and self.queue:
            self.run(self.queue.pop(0))
        if not me.pace.held():
            self.wake()  # as Throttle._release_device does

    def wake(self) -> None:
        """The table's futex: sleepers look again now."""
        for j in self.sleeping:
            self.at(self.now, j, False)

    def run_until(self, t_end: float) -> Sim:
        while self.events and self.events[0][0] <= t_end:
            t, seq, i, fresh = heapq.heappop(self.events)
            self.now = t
            if i < 0:
                self.op_done(-1 - i)
                continue
            if self.pending.get(i) != seq:
                continue  # superseded by a later event of the same session
            self.sleeping.discard(i)
            if self.now < self.s[i].until:
                self.want(i, fresh)
        return self
