"""A session takes an idle device at once when nobody queues for it (Throttle._take_idle_device).

Sessions on one table in threads, each with its own open file (its own lock), as in
test_table.py; the device is an op that sleeps.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import random
import time
from pathlib import Path
from typing import Any

import pytest

from orion_vgpu.server import throttle as th
from orion_vgpu.server.throttle import BACKLOGGED, IDLE, Peer, ShareTable, Throttle, share_of


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "orion-throttle-test"


def joined(path: Path, ratio: int = 50) -> Throttle:
    return Throttle(ratio=ratio, level=100, table=ShareTable.join(path, share_of(ratio)))


def one_op(t: Throttle, seconds: float) -> float:
    """Run one op of ``seconds``; how long before_op took."""
    t0 = time.monotonic()
    t.before_op()
    waited = time.monotonic() - t0
    time.sleep(seconds)
    t.after_op(seconds)
    return waited


def test_the_queued_flags_are_per_slot_and_freed_with_the_slot(path: Path) -> None:
    a, b = ShareTable.join(path, 0.5), ShareTable.join(path, 0.5)
    assert a is not None and b is not None
    assert not a.queued() and not b.queued()
    a.set_queued(True)
    assert b.queued() and not a.queued()  # one's own flag is not somebody queuing
    b.set_queued(True)
    assert a.queued() and b.queued()
    b.set_queued(False)
    assert b.queued() and not a.queued()
    th._free_slot(a.mm, a.slot)  # as when a dead worker's slot is reaped
    assert not b.queued()
    b.close()
    a.close()


def _light_session(path: Path, seconds: float, start: Any, out: multiprocessing.queues.Queue
                   ) -> None:
    """A worker's loop for a light session: short ops, long pauses (its client's round
    trip). Sends back its op spans and how many of its ops queued."""
    queued = 0
    real_take_turn = Throttle._take_turn

    def counting_take_turn(self: Throttle, now: float) -> None:
        nonlocal queued
        queued += 1
        real_take_turn(self, now)

    Throttle._take_turn = counting_take_turn  # type: ignore[method-assign]  # this process only
    t = joined(path)
    start.wait()  # all have joined: none runs as if alone
    rng = random.Random()
    spans = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t.before_op()
        t0 = time.perf_counter()
        time.sleep(0.0001)
        t1 = time.perf_counter()
        t.after_op(t1 - t0)
        spans.append((t0, t1))
        time.sleep(rng.uniform(0.002, 0.02))  # clients do not keep step
    t.close()
    out.put((queued, spans))


def test_light_sessions_take_the_idle_device_without_queuing(path: Path) -> None:
    """Four light sessions, each in its own process as workers are: the device is mostly
    idle, so most ops start without the fair queue (which reads every slot), and never two
    at once."""
    ctx = multiprocessing.get_context("fork")
    out, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_light_session, args=(path, 1.0, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    queued = sum(q for q, _ in results)
    spans = sorted(s for _, sp in results for s in sp)
    assert len(spans) > 200
    # Queued: each session's first op, and ops that found the device busy or a session
    # queuing (the device was busy about 10 % of the time).
    assert queued < 0.3 * len(spans), (queued, len(spans))
    assert all(s >= e for (_, e), (s, _) in zip(spans, spans[1:], strict=False))
    assert not path.exists()


def test_a_session_queuing_for_the_device_is_not_overtaken(path: Path) -> None:
    """B queues, owed the device (A is a time slice ahead of it): A waits for its turn
    although the device is free, until B's entry goes stale (STALL_S)."""
    a, b = joined(path), ShareTable.join(path, 0.5)
    assert b is not None
    one_op(a, 0.001)  # A's first op: it queues once, then it is a regular
    a.vtime += 2 * th.TURN_S / a.share
    time.sleep(2 * th.SCAN_INTERVAL_S)
    now = time.monotonic()
    b.publish(Peer(-1, 0.5, 0.0, BACKLOGGED, now, now))
    b.set_queued(True)
    waited = one_op(a, 0.001)
    assert waited > 0.5 * th.STALL_S
    b.close()
    a.close()


def test_a_saturating_owners_round_trip_is_held_for_it(path: Path) -> None:
    """B drives the device and is between two ops: A's op, longer than B's round trip,
    waits for B's next op instead of taking the idle device."""
    a, b = joined(path), ShareTable.join(path, 0.5)
    assert b is not None
    one_op(a, 0.01)
    time.sleep(2 * th.SCAN_INTERVAL_S)  # A looks at its neighbours again before its op
    now = time.monotonic()
    b.publish(Peer(-1, 0.5, a.vtime, IDLE, now, now, busy=1.0, duty=0.9, anticipate=0.02))
    b.set_owner(b.slot)
    waited = one_op(a, 0.001)
    assert waited > 0.01
    b.close()
    a.close()


def test_an_op_wakes_waiters_only_when_someone_queues(path: Path) -> None:
    a, b = joined(path), ShareTable.join(path, 0.5)
    assert b is not None
    one_op(a, 0.001)
    time.sleep(2 * th.SCAN_INTERVAL_S)
    now = time.monotonic()
    b.publish(Peer(-1, 0.5, a.vtime, IDLE, now, now))  # active, light, not queuing
    generation = b.generation()
    one_op(a, 0.001)
    assert b.generation() == generation  # no futex wake: nobody sleeps on it
    b.set_queued(True)
    one_op(a, 0.001)
    assert b.generation() != generation
    b.close()
    a.close()
