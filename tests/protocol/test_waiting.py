"""Awake waits (protocol.waiting): a short expected wait polls until the message is there; a
long one, or one on a thread that has had to queue for a core, leaves the wait to recv."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from orion_vgpu.protocol import waiting


def test_a_short_wait_polls_until_the_message_is_readable() -> None:
    a, b = socket.socketpair()
    with a, b:
        w = waiting.Waiter(b, spin_max_s=0.5)
        a.sendall(b"frame")
        t0 = time.perf_counter()
        w.before(t0)
        assert w._poll is not None  # it polled (and returned: the message was there)
        assert b.recv(16, socket.MSG_DONTWAIT) == b"frame"
        w.after(t0)
        assert 0 < w.mean_s < 0.5


def test_a_wait_expected_to_be_long_is_left_to_recv() -> None:
    a, b = socket.socketpair()
    with a, b:
        w = waiting.Waiter(b, spin_max_s=0.001)
        w.mean_s = 0.002
        w.before(time.perf_counter())  # returns at once: nothing was sent
        assert w._poll is None


def test_a_thread_queued_for_its_core_stops_polling_and_a_quiet_one_does_not() -> None:
    w = waiting.Waiter(socket.socket(), spin_max_s=0.001)
    w.crowded(time.perf_counter())  # the first look only takes the baseline
    time.sleep(0.05)  # asleep: not queued for a core
    assert not w.crowded(time.perf_counter())

    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    rival = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(rival.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        w.crowded(time.perf_counter())
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # runnable beside a busy process on one core
            pass
        assert w.crowded(time.perf_counter())
    finally:
        os.sched_setaffinity(0, before)
        rival.kill()
        rival.wait()
