"""Waiting for the peer's next message awake (polling the socket) or asleep in recv.

A process asleep in recv is woken by its peer's send, which then takes 30-45 us instead of
10-15 (a client's 2.8 KB frame on this 2-vCPU VM: an interrupt to a halted vCPU), and it
runs again as late. A wait expected to be short is therefore spent polling, giving the
core to any other runnable thread at each turn, as long as this thread has not had to
queue for a core lately: on a crowded host a poller takes the time of those it keeps
waiting, so it sleeps there, unless its peer runs on other cores (``Waiter.crowd_spin_s``):
then a short poll that keeps the core is cheaper than giving it away, as below.
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
_BOOT_ID = "/proc/sys/kernel/random/boot_id"  # one kernel: one set of cores, containers too
# A thread queued for a core among others (32 client programs on one core, their server on
# another) that sleeps in recv pays for it when it runs again: its caches were the others',
# about 220 us of user time each sleep, so the programs spent 12.3 us per tiny op against
# 8.0 alone. A wait for a server on other cores is polled this long without yielding (the
# reply came within 170 us at the median): 9.2 us per op, aggregate 75k -> 87k ops/s.
# A slower reply costs the poll, about what the sleep it replaces costs.
CROWD_SPIN_S = 0.0003


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
        # Poll this long on a crowded core (0: sleep there): set when the peer's cores are
        # not this thread's (cores_apart), where polling takes no time from the peer.
        self.crowd_spin_s = 0.0

    def before(self, t0: float) -> None:
        """Called as a wait starts at ``t0`` (time.perf_counter): polls while it expects
        the message soon and has a core to itself, or up to ``crowd_spin_s`` on a crowded
        one, then returns (recv sleeps for the rest)."""
        mean = self.mean_s
        if self.crowded(t0):
            if self.crowd_spin_s:  # without yielding: a turn given away is a sleep
                self._poll_until(t0 + self.crowd_spin_s, yield_core=False)
        elif mean < self.spin_max_s:
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

    def _poll_until(self, deadline: float, yield_core: bool = True) -> None:
        poll = self._poll
        if poll is None:
            poll = self._poll = select.poll()
            poll.register(self.sock, select.POLLIN)
        clock = time.perf_counter
        while not poll.poll(0):
            if clock() > deadline:
                return
            if yield_core:
                os.sched_yield()


def placement() -> dict:
    """Where this process runs: its kernel (boot id) and the CPUs it may use."""
    try:
        with open(_BOOT_ID) as f:
            kernel = f.read().strip()
    except OSError:
        kernel = ""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cpus = affinity(0) if affinity else range(os.cpu_count() or 1)
    return {"kernel": kernel, "cpus": sorted(cpus)}


def cores_apart(peer: object) -> bool:
    """True when a peer at ``peer`` (its ``placement()``) cannot run on this process's
    cores: another kernel, or CPUs disjoint from ours. False when unknown (an older peer)."""
    if not isinstance(peer, dict) or not isinstance(peer.get("kernel"), str):
        return False
    cpus = peer.get("cpus")
    if not isinstance(cpus, list) or not cpus:  # malformed: as if shared, the safe side
        return False
    own = placement()
    if peer["kernel"] != own["kernel"]:
        return True
    return not {c for c in cpus if isinstance(c, int)} & set(own["cpus"])


def _queued_ns() -> int:
    try:
        with open(_SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return -1
