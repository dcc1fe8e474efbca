"""Compute-share policy with an injected clock: deterministic, no processes, no sleeping."""

from __future__ import annotations

import pytest

from orion_vgpu.server import throttle as th
from orion_vgpu.server.throttle import (
    ACTIVE_WINDOW_S,
    BACKLOGGED,
    BURST_S,
    IDLE,
    TURN_S,
    Clock,
    Pace,
    Peer,
    Throttle,
    TokenBucket,
    cap_fraction,
    catch_up,
    contenders,
    turn_delay,
)

from .sim import Sim, SimSession


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    def clock(self) -> Clock:
        return Clock(now=self.now, sleep=self.sleep)


def peer(vtime: float, state: int = BACKLOGGED, share: float = 0.5, last_active: float = 0.0,
         stamp: float = 0.0, duty: float = 0.0, anticipate: float = 0.0) -> Peer:
    return Peer(1, share, vtime, state, last_active, stamp, 0.0, duty, anticipate)


# -- cap -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "level", "cap"), [
    (50, 0, 0.5), (50, 100, 1.0), (50, 50, 0.75), (25, 0, 0.25), (100, 0, 1.0), (1, 0, 0.01),
])
def test_cap_interpolates_between_ratio_and_whole_gpu(ratio: int, level: int, cap: float) -> None:
    assert cap_fraction(ratio, level) == pytest.approx(cap)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.9])
def test_token_bucket_holds_busy_to_rate(rate: float) -> None:
    clock, busy = 0.0, 0.0
    bucket = TokenBucket(rate, BURST_S, clock)
    while clock < 20.0:
        clock += bucket.delay(clock)
        op = 0.003
        clock += op
        busy += op
        bucket.charge(op, clock)
    assert busy / clock <= rate + (BURST_S + op) / 20.0  # ops are charged after they ran
    assert busy / clock >= rate - 0.01


def test_token_bucket_lets_a_burst_through_then_paces() -> None:
    bucket = TokenBucket(0.5, BURST_S, 0.0)
    assert bucket.delay(0.0) == 0.0
    bucket.charge(BURST_S + 0.01, 0.01)      # 10 ms over the burst
    assert bucket.delay(0.01) == pytest.approx(0.01 / 0.5)


# -- throttle alone (no table) -------------------------------------------------------------


def run_alone(level: int, ratio: int = 50, seconds: float = 10.0, op: float = 0.004) -> float:
    fake = FakeClock()
    t = Throttle(ratio=ratio, level=level, table=None, clock=fake.clock())
    start = fake.t
    while fake.t - start < seconds:
        t.before_op()
        fake.t += op
        t.after_op(op)
        fake.t += 0.0001  # the worker's own work between ops
    return t.busy_s / (fake.t - start)


def test_level_0_alone_is_held_to_its_ratio() -> None:
    assert 0.49 <= run_alone(level=0) <= 0.5 + BURST_S / 10


def test_level_100_alone_runs_freely() -> None:
    assert run_alone(level=100) > 0.97


def test_level_between_interpolates() -> None:
    assert run_alone(level=50) == pytest.approx(0.75, abs=0.015)


def test_no_enforcement_never_waits() -> None:
    fake = FakeClock()
    t = Throttle(ratio=10, level=0, table=None, clock=fake.clock(), enforce=False)
    for _ in range(1000):
        t.before_op()
        fake.t += 0.01
        t.after_op(0.01)
    assert fake.slept == [] and t.busy_s == pytest.approx(10.0)


# -- policy functions ----------------------------------------------------------------------


def test_contenders_are_backlogged_or_recently_active() -> None:
    now = 10.0
    waiting = peer(1.0, BACKLOGGED, stamp=now - 0.001)
    paused = peer(1.0, IDLE, last_active=now - ACTIVE_WINDOW_S / 2)
    idle = peer(1.0, IDLE, last_active=now - 2 * ACTIVE_WINDOW_S)
    stuck = peer(1.0, BACKLOGGED, stamp=now - 5.0, last_active=now - 5.0)
    assert contenders([waiting, paused, idle, stuck], now) == [waiting, paused]


def test_lowest_virtual_time_goes_first_within_a_time_slice() -> None:
    share = 0.5
    assert turn_delay(1.0, share, [peer(1.0)], 0.0) == 0.0  # level: the lock decides
    ahead_less_than_slice = 1.0 + 0.5 * TURN_S / share
    assert turn_delay(ahead_less_than_slice, share, [peer(1.0)], 0.0) == 0.0
    assert turn_delay(1.0 + 2 * TURN_S / share, share, [peer(1.0)], 0.0) > 0.0


def test_a_light_neighbour_between_ops_holds_nobody_up() -> None:
    light = peer(0.0, IDLE, last_active=9.999, duty=0.1, anticipate=0.004)
    assert turn_delay(10.0, 0.5, [light], 10.0) == 0.0


def test_a_saturating_neighbour_is_waited_for_during_its_round_trip_only() -> None:
    busy = peer(0.0, IDLE, last_active=9.999, duty=0.95, anticipate=0.004)
    my_op = 0.002
    assert turn_delay(10.0, 0.5, [busy], 10.0, my_op) == pytest.approx(0.003)
    assert turn_delay(10.0, 0.5, [busy], 10.004, my_op) == 0.0  # its round trip is over
    # An op that easily fits in the rest of its round trip costs it nothing.
    assert turn_delay(10.0, 0.5, [busy], 9.999, my_op=0.0001) == 0.0


def test_a_neighbour_held_back_by_its_own_cap_is_not_waited_for() -> None:
    capped = peer(0.0, th.CAPPED, last_active=9.999, duty=0.95, anticipate=0.004)
    assert turn_delay(10.0, 0.5, [capped], 10.0, my_op=0.002) == 0.0


def test_a_returning_session_banks_no_priority() -> None:
    others = [peer(50.0), peer(50.1)]
    assert catch_up(1.0, 0.5, others, returning=True) == 50.0
    assert catch_up(50.05, 0.5, others, returning=True) == 50.05
    bound = (TURN_S + th.CREDIT_S) / 0.5
    assert catch_up(1.0, 0.5, others, returning=False) == pytest.approx(50.1 - bound)


def test_a_session_that_only_paused_keeps_what_it_is_owed_up_to_a_bound() -> None:
    bound = (TURN_S + th.CREDIT_S) / 0.25
    assert catch_up(59.9, 0.5, [peer(60.0, share=0.25)], returning=False) == 59.9
    assert catch_up(0.0, 0.5, [peer(60.0, share=0.25)], returning=False) == \
        pytest.approx(60.0 - bound)


def test_pace_tells_saturating_from_light_sessions() -> None:
    saturating, light = Pace(), Pace()
    for i in range(400):
        saturating.ran(0.004)
        saturating.paused(0.002 if i % 8 == 0 else 0.00003)
        light.ran(0.002)
        light.paused(0.03)
    assert saturating.duty() > 0.9
    assert light.duty() < 0.1
    assert 0.002 < saturating.anticipate() <= th.ANTICIPATE_MAX_S


# -- the policy end to end, simulated ------------------------------------------------------


def shares(sessions: list[SimSession], t0: float, t1: float) -> list[float]:
    return [s.share_between(t0, t1) for s in sessions]


@pytest.mark.parametrize("gap", [0.0, 0.0005, 0.003, 0.005])
def test_saturating_sessions_split_busy_time_by_ratio(gap: float) -> None:
    # Batches of 8 ops of 2 ms, then a client round trip of `gap`.
    a, b = SimSession(25, gap_s=gap), SimSession(75, gap_s=gap)
    Sim([a, b]).run_until(30.0)
    assert b.busy_between(2, 30) / a.busy_between(2, 30) == pytest.approx(3.0, rel=0.01)
    # The device idles only while a slice's owner is between two batches.
    assert sum(shares([a, b], 2, 30)) > 0.99 - gap / (0.016 + gap)


def test_a_slice_goes_on_through_its_owners_round_trips() -> None:
    a, b = SimSession(25, gap_s=0.002), SimSession(75, gap_s=0.002)
    sim = Sim([a, b])
    sim.run_until(5.0)
    spans = sorted([(s, "a") for s, _ in a.busy_log] + [(s, "b") for s, _ in b.busy_log])
    switches = sum(1 for x, y in zip(spans, spans[1:], strict=False) if x[1] != y[1])
    # 5 s of slices of ~67 ms (a) and ~200 ms (b): a few dozen hand-overs, not one per batch.
    assert switches < 60


def test_a_saturating_program_keeps_its_share_through_short_round_trips() -> None:
    # 16 ms of work then 3 ms away: its round trips are held for it (the device idles
    # meanwhile), so the shares stay 1:3.
    a, b = SimSession(25, gap_s=0.003), SimSession(75, gap_s=0.003)
    Sim([a, b]).run_until(30.0)
    got = shares([a, b], 2, 30)
    assert got[1] / got[0] == pytest.approx(3.0, rel=0.01)
    assert sum(got) > 0.8


def test_longer_round_trips_are_not_held() -> None:
    # 16 ms of work then 8 ms away, longer than ANTICIPATE_MAX_S: the ratio-75 program
    # asks for 67 % of the device, gets about that, and the rest goes to its neighbour.
    a, b = SimSession(25, gap_s=0.008), SimSession(75, gap_s=0.008)
    Sim([a, b]).run_until(30.0)
    got = shares([a, b], 2, 30)
    assert 0.6 < got[1] < 0.67
    assert sum(got) > 0.95


def test_programs_busy_less_than_half_their_time_get_what_they_ask_for() -> None:
    # 16 ms of work then 20 ms away: each asks for 44 %; the ratios do not matter.
    a, b = SimSession(25, gap_s=0.020), SimSession(75, gap_s=0.020)
    Sim([a, b]).run_until(10.0)
    assert shares([a, b], 1, 10) == pytest.approx([0.44, 0.44], abs=0.02)


def test_three_sessions() -> None:
    sessions = [SimSession(20), SimSession(30), SimSession(50)]
    Sim(sessions).run_until(30.0)
    got = shares(sessions, 2, 30)
    assert [x / sum(got) for x in got] == pytest.approx([0.2, 0.3, 0.5], abs=0.005)
    assert sum(got) > 0.95


def test_small_shares_are_exact_too() -> None:
    sessions = [SimSession(1, gap_s=0.0), SimSession(99, gap_s=0.0)]
    Sim(sessions).run_until(30.0)
    assert shares(sessions, 3, 30) == pytest.approx([0.01, 0.99], abs=0.002)


def test_idle_capacity_goes_to_whoever_has_work() -> None:
    # A light ratio-25 program (one 2 ms op every ~32 ms) beside a saturating ratio-75 one.
    light, heavy = SimSession(25, batch=1, gap_s=0.03), SimSession(75)
    Sim([light, heavy]).run_until(10.0)
    got = shares([light, heavy], 1, 10)
    assert got[0] == pytest.approx(0.0625, abs=0.005)  # all it asks for
    assert got[1] > 0.9                                # the rest


def test_sessions_below_their_share_get_their_demand() -> None:
    # Each asks for ~35 % (16 ms of work, then 30 ms away): both get it, whatever the ratio.
    a, b = SimSession(25, gap_s=0.03), SimSession(75, gap_s=0.03)
    Sim([a, b]).run_until(10.0)
    assert shares([a, b], 1, 10) == pytest.approx([0.348, 0.348], abs=0.01)


def test_a_late_joiner_gets_its_share_at_once_and_no_one_is_punished_for_running_alone() -> None:
    a, b = SimSession(25), SimSession(75, start=5.0)
    Sim([a, b]).run_until(20.0)
    assert a.share_between(0.5, 5.0) > 0.95
    got = shares([a, b], 6, 20)
    assert got[1] / got[0] == pytest.approx(3.0, rel=0.02)


def test_a_session_back_from_idle_does_not_starve_the_others() -> None:
    a = SimSession(50, until=2.0)          # ran alone for 2 s, then left
    b = SimSession(50, start=2.5)          # b arrives, a comes back a second later
    a2 = SimSession(50, start=3.5)
    sim = Sim([a, b, a2])
    sim.run_until(20.0)
    got = shares([b, a2], 4.0, 20.0)
    assert got[0] / got[1] == pytest.approx(1.0, rel=0.02)
