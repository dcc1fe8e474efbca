"""Awake waits (protocol.waiting): a short expected wait polls until the message is there; a
long one, or one on a thread that has had to queue for a core, leaves the wait to recv,
unless the peer runs on other cores (a short poll that keeps the core)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
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


def _crowded_waiter(sock: socket.socket) -> waiting.Waiter:
    w = waiting.Waiter(sock, spin_max_s=0.001)
    w._crowded, w._next_check = True, float("inf")  # as after a look at a busy run queue
    return w


def test_a_crowded_thread_sleeps_unless_its_peer_is_on_other_cores(monkeypatch) -> None:
    yields = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    a, b = socket.socketpair()
    with a, b:
        w = _crowded_waiter(b)
        w.before(time.perf_counter())  # crowd_spin_s 0: left to recv at once
        assert w._poll is None

        w.crowd_spin_s = 5.0
        threading.Timer(0.05, a.sendall, (b"frame",)).start()
        t0 = time.perf_counter()
        w.before(t0)  # polls, keeping the core, until the message is readable
        assert 0.04 < time.perf_counter() - t0 < 4.0
        assert b.recv(16, socket.MSG_DONTWAIT) == b"frame"
        assert yields == []

        t0 = time.perf_counter()
        w.crowd_spin_s = 0.02
        w.before(t0)  # nothing comes: gives up after crowd_spin_s
        assert 0.02 <= time.perf_counter() - t0 < 1.0


def test_cores_apart_compares_kernel_and_cpus() -> None:
    own = waiting.placement()
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert own["kernel"] == f.read().strip()
    assert own["cpus"] == sorted(os.sched_getaffinity(0))
    assert not waiting.cores_apart(own)
    assert not waiting.cores_apart(None)  # a server too old to say: as if shared
    assert not waiting.cores_apart({"cpus": [999]})
    assert waiting.cores_apart({"kernel": "another-host", "cpus": own["cpus"]})
    assert waiting.cores_apart({"kernel": own["kernel"], "cpus": [max(own["cpus"]) + 1]})
    assert not waiting.cores_apart({"kernel": own["kernel"], "cpus": own["cpus"][-1:]})
    for bad in ({"kernel": 7, "cpus": [0]}, {"kernel": "k", "cpus": 3},
                {"kernel": "k", "cpus": []}, {"kernel": "k"}, ["k", [0]]):
        assert not waiting.cores_apart(bad)  # malformed: as if shared, no exception
