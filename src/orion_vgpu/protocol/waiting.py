"""Waiting for the peer's next message awake (polling the socket) or asleep in recv.

A process asleep in recv is woken by its peer's send, which then takes 30-45 us instead of
10-15 (a client's 2.8 KB frame on this 2-vCPU VM: an interrupt to a halted vCPU), and it
runs again as late. A wait expected to be short is therefore spent polling, giving the
core to any other runnable thread at each turn, as long as this thread has not had to
queue for a core lately: on a crowded host a poller takes the time of those it keeps
waiting, so it sleeps there.
"""

from __future__ import annotations

import os
import select
import socket
import time

# How often the thread's run-queue delay is read, and the share of that time it may have
# spent queued for a core and still poll.
CHECK_S = 0.01
QUEUED_MAX = 0.05
_SCHEDSTAT = "/proc/thread-self/schedstat"  # run time, run-queue delay (ns), timeslices


class Waiter:
    """Awake waits on one socket, for one thread (the one that reads it)."""

    def __init__(self, sock: socket.socket, spin_max_s: float, mean_s: float = 0.0) -> None:
        self.sock = sock
        self.spin_max_s = spin_max_s
        self.mean_s = mean_s  # how long recent waits took (a moving average)
        self._poll: select.poll | None = None
        self._next_check = 0.0
        self._queued_ns = -1  # run-queue delay at the last check (-1: none yet)
        self._checked_at = 0.0
        self._crowded = False

    def before(self, t0: float) -> None:
        """Called as a wait starts at ``t0`` (time.perf_counter): polls while it expects
        the message soon and has a core to itself, then returns (recv sleeps for the rest)."""
        mean = self.mean_s
        if mean < self.spin_max_s and not self.crowded(t0):
            self._poll_until(t0 + min(2 * mean + 50e-6, self.spin_max_s))

    def after(self, t0: float) -> None:
        """Called when the message has come, with the wait's ``t0``."""
        self.mean_s = (self.mean_s + time.perf_counter() - t0) / 2

    def crowded(self, now: float) -> bool:
        """This thread waited for a core more than QUEUED_MAX of the time lately."""
        if now < self._next_check:
            return self._crowded
        self._next_check = now + CHECK_S
        queued = _queued_ns()
        if queued < 0:  # no schedstat (not Linux): poll as if the host were quiet
            self._next_check = float("inf")
            return False
        if self._queued_ns >= 0:
            self._crowded = queued - self._queued_ns > QUEUED_MAX * (now - self._checked_at) * 1e9
        self._queued_ns, self._checked_at = queued, now
        return self._crowded

    def _poll_until(self, deadline: float) -> None:
        poll = self._poll
        if poll is None:
            poll = self._poll = select.poll()
            poll.register(self.sock, select.POLLIN)
        clock = time.perf_counter
        while not poll.poll(0):
            if clock() > deadline:
                return
            os.sched_yield()


def _queued_ns() -> int:
    try:
        with open(_SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return -1
