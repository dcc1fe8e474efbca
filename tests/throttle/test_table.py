"""The shared per-GPU table and the throttle on it, with real files, locks and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orion_vgpu.server import throttle as th
from orion_vgpu.server.throttle import (
    BACKLOGGED,
    SLOTS,
    Peer,
    ShareTable,
    Throttle,
    proc_start_ticks,
    share_of,
    slot_offset,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "orion-throttle-test"


def test_sessions_claim_slots_and_the_last_one_removes_the_file(path: Path) -> None:
    a = ShareTable.join(path, 0.25)
    b = ShareTable.join(path, 0.75)
    assert a is not None and b is not None
    assert (a.slot, b.slot) == (0, 1)
    assert a.claimed() == b.claimed() == 2
    assert [p.share for p in a.peers()] == [0.75]
    a.close()
    assert path.exists() and b.claimed() == 1 and b.peers() == []
    c = ShareTable.join(path, 0.5)
    assert c is not None and c.slot == 0  # the lowest free slot is reused
    c.close()
    b.close()
    assert not path.exists()


def test_a_full_table_turns_newcomers_away(path: Path) -> None:
    tables = [ShareTable.join(path, 0.01) for _ in range(SLOTS)]
    try:
        assert all(t is not None for t in tables)
        assert ShareTable.join(path, 0.01) is None
    finally:
        for t in tables:
            assert t is not None
            t.close()


def test_published_slots_are_read_back_and_torn_ones_skipped(path: Path) -> None:
    a, b = ShareTable.join(path, 0.25), ShareTable.join(path, 0.75)
    assert a is not None and b is not None
    b.publish(Peer(-1, 0.75, 12.5, BACKLOGGED, 3.0, 4.0, 9.0, 0.9, 0.002))
    (seen,) = a.peers()
    assert (seen.vtime, seen.state, seen.last_active, seen.stamp, seen.busy, seen.duty,
            seen.anticipate, seen.pid) == (12.5, BACKLOGGED, 3.0, 4.0, 9.0, 0.9, 0.002,
                                           os.getpid())
    off = slot_offset(b.slot)
    seq = int.from_bytes(b.mm[off:off + 4], "little")
    b.mm[off:off + 4] = (seq + 1).to_bytes(4, "little")  # a writer is mid-way
    assert a.peers() == []
    b.mm[off:off + 4] = (seq + 2).to_bytes(4, "little")
    assert len(a.peers()) == 1
    a.close()
    b.close()


def test_a_garbage_file_is_started_afresh(path: Path) -> None:
    path.write_bytes(b"not a table" * 100)
    t = ShareTable.join(path, 0.5)
    assert t is not None and t.slot == 0 and t.claimed() == 1
    t.close()


def test_slots_of_killed_workers_are_reclaimed(path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; "
            "from orion_vgpu.server.throttle import ShareTable; "
            "t = ShareTable.join(Path(sys.argv[1]), 0.5); print(t.slot, flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "0"
        me = ShareTable.join(path, 0.5)
        assert me is not None and me.claimed() == 2
        assert me.reap_dead() == 0  # alive
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert me.reap_dead() == 1
        assert me.claimed() == 1 and me.peers() == []
        me.close()
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_recycled_pid_is_not_taken_for_the_dead_worker(path: Path) -> None:
    me = ShareTable.join(path, 0.5)
    other = ShareTable.join(path, 0.5, pid=os.getpid())
    assert me is not None and other is not None
    start = proc_start_ticks(os.getpid())
    assert isinstance(start, int)
    # Same pid, another start time: a different process now has that pid.
    assert me.reap_dead(lambda pid, s: s == start + 1) == 1
    assert me.claimed() == 1
    me.close()
    other.close()
    assert not path.exists()


def test_waiters_are_woken_when_an_op_ends(path: Path) -> None:
    a, b = ShareTable.join(path, 0.5), ShareTable.join(path, 0.5)
    assert a is not None and b is not None
    generation = a.generation()
    threading.Timer(0.05, b.bump).start()
    t0 = time.monotonic()
    a.wait_change(generation, 5.0)
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    a.wait_change(a.generation() + 1, 5.0)  # changed already: no sleep at all
    assert time.monotonic() - t0 < 1.0
    a.close()
    b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to someone else")
def test_a_table_file_of_another_user_is_not_used(path: Path) -> None:
    path.write_bytes(b"")
    os.chown(path, 12345, 12345)
    with pytest.raises(OSError, match="another user"):
        ShareTable.join(path, 0.5)


# -- throttles on one table, in threads (each has its own open file: its own lock) -------


def run_sessions(path: Path, ratios: list[int], seconds: float, op: float = 0.002,
                 level: int = 100) -> list[tuple[Throttle, list[tuple[float, float]]]]:
    """Each session sleeps ``op`` per op (the GIL is free meanwhile) for ``seconds``."""
    out: list[tuple[Throttle, list[tuple[float, float]]]] = []
    sessions = [Throttle(ratio=r, level=level, table=ShareTable.join(path, share_of(r)))
                for r in ratios]
    barrier = threading.Barrier(len(sessions))

    def work(t: Throttle) -> None:
        spans: list[tuple[float, float]] = []
        barrier.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t.before_op()
            t0 = time.perf_counter()
            time.sleep(op)
            t1 = time.perf_counter()
            t.after_op(t1 - t0)
            spans.append((t0, t1))
        out.append((t, spans))

    threads = [threading.Thread(target=work, args=(t,)) for t in sessions]
    for x in threads:
        x.start()
    for x in threads:
        x.join()
    for t in sessions:
        t.close()
    return sorted(out, key=lambda x: x[0].ratio)


def test_contending_sessions_share_by_ratio_and_never_overlap(path: Path) -> None:
    (low, low_spans), (high, high_spans) = run_sessions(path, [25, 75], seconds=2.0)
    assert low.contended_ops > 0.9 * low.ops and high.contended_ops > 0.9 * high.ops
    assert 2.3 < high.busy_s / low.busy_s < 3.8
    spans = sorted(low_spans + high_spans)
    overlaps = sum(1 for (_, e), (s, _) in zip(spans, spans[1:], strict=False) if s < e)
    assert overlaps == 0
    assert not path.exists()


def test_alone_a_session_takes_no_lock(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_flock = th.fcntl.flock

    def counting_flock(fd: int, op: int) -> None:
        calls.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(th.fcntl, "flock", counting_flock)
    ((alone, spans),) = run_sessions(path, [50], seconds=0.3, op=0.0005)
    assert len(spans) > 100 and alone.contended_ops == 0
    assert len(calls) <= 4  # joining and leaving only


def test_beside_an_idle_neighbour_ops_take_the_lock_but_never_wait(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    neighbour = ShareTable.join(path, 0.75)  # joined, never ran an op
    calls: list[int] = []
    real_flock = th.fcntl.flock

    def counting_flock(fd: int, op: int) -> None:
        calls.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(th.fcntl, "flock", counting_flock)
    ((me, spans),) = run_sessions(path, [25], seconds=0.3, op=0.0005)
    assert me.contended_ops == 0 and me.wait_s < 0.05
    assert len(calls) >= 2 * len(spans) - 10  # the lock around (nearly) every op
    assert neighbour is not None
    neighbour.close()


def test_level_0_caps_a_session_alone(path: Path) -> None:
    ((alone, _spans),) = run_sessions(path, [50], seconds=1.5, level=0)
    assert alone.busy_s / 1.5 < 0.5 + (th.BURST_S + 0.01) / 1.5
    assert alone.wait_s > 0.5
