"""Compute share (ORION_RATIO, [throttle]): holds each session to its share of its GPU.

The worker calls ``make_throttle(spec)`` once per session, then ``before_op()`` /
``after_op(seconds, ops)`` around every run of ops (a frame's consecutive ops, a graph
replay; see ``Executor.begin_batch``) and ``close()`` at the end. Three mechanisms, all per physical GPU:

* **Share table.** A small file in /dev/shm named from the GPU's uuid (and, for an
  emulated GPU, the daemon's pid), mmap'd by every worker on that GPU: one slot per
  session with its share, virtual time (busy seconds / share), state and last activity.
  Slots are claimed under ``flock`` on the file; slots of dead workers are reclaimed.
  The same ``flock`` is the *device lock*: while other sessions hold slots, each op
  runs holding it, so on an emulated GPU "busy time" is real device time, not time
  stretched by a neighbour's op on the same cores.
* **Fair queueing in time slices when sessions contend** (start-time fair queueing):
  the device goes to the backlogged session with the lowest virtual time, whose *time
  slice* lasts until it is ``TURN_S`` of its busy time ahead of a waiting contender, so
  busy time splits in proportion to the ratios. A session that saturates the device
  keeps its slice through its short pauses (its client's round trip), which are
  otherwise the moments a neighbour would slip in; a light session's pauses go to
  whoever has work. One idle for longer than ``ACTIVE_WINDOW_S`` queues level with the
  least served contender (idle time is not banked); nobody is owed more than
  ``CREDIT_S``. The queue is for contention only: a session that finds the device idle,
  nobody queuing (a byte per slot says who queues) and no saturating session between two
  ops takes it at once, without reading the slots.
* **Cap** (``throttle_level``): a token bucket holds busy/wall to
  ``ratio + (100 - ratio) * level / 100`` percent, contended or not. Level 0 is a
  strict cap at the ratio even on an idle GPU; level 100 has no cap (idle capacity goes
  to whoever has work); levels between interpolate.

Alone on its GPU at level 100 a session makes no system call per op: it reads the
table header at most every ``SCAN_INTERVAL_S`` (a memory read) and writes its slot as
rarely. Waiting never spins: a waiting session sleeps on a futex in the table that is
bumped when the device may be free for it (a time slice handed on, a session left, an op
of a light session ended while somebody queued; at most ``POLL_MAX_S``), or blocks on the
device lock.

On CUDA, busy time is metered with CUDA events (read once they complete, without
synchronizing); while contended each op is synchronized inside the device lock so the
lock covers its execution. With ``throttle_level = 0`` and the MPS daemon running,
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = ratio`` is set before CUDA initialises (a
hardware partition) and ops are only metered. The CUDA paths are not exercised by the
test suite (no GPU where it runs).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import re
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("orion.session")

# A session idle for longer than this queues again level with the least served contender
# (it banks no priority). A shorter pause keeps what it is owed: its client's sync round
# trip, or its worker waiting for a core on a loaded host (tens of ms at load 10 on 2
# cores).
ACTIVE_WINDOW_S = 0.200
# Time slice: a session keeps the device until it is this much of its own busy time
# ahead of a waiting contender. The first op after a hand-over is slower (cold caches,
# the worker's threads waking up) and is charged to the session that runs it; long slices
# keep that small, where op-by-op turns would charge it mostly to the smaller share.
TURN_S = 0.050
# What a session may be owed beyond a time slice, in the busy time of the least share
# present: bounds the priority anyone can bank, however it paused.
CREDIT_S = 0.100
# Longest the device is held idle for a session between two ops (twice its usual round
# trip); a session with longer round trips is not waited for at all.
ANTICIPATE_MAX_S = 0.010
# A session keeping the device busy at least this much of its own time saturates it: its
# short pauses (its client's round trip; the host not scheduling its worker at once) are
# held for it. A lighter session's pauses go to whoever has work.
SATURATED_DUTY = 0.5
# Pauses shorter than this are the worker decoding the next op, not a client round trip.
LONG_PAUSE_MIN_S = 0.0002
# Weight of the newest op in a session's pace averages.
PACE_ALPHA = 1.0 / 32
# How often the uncontended path looks at the table, and publishes its own slot.
SCAN_INTERVAL_S = 0.001
POLL_MIN_S = 0.0001
POLL_MAX_S = 0.005
# Busy seconds the cap lets through at once (a session starts with a full bucket).
BURST_S = 0.050
# A slot marked backlogged but not refreshed for this long belongs to a stuck worker.
STALL_S = 1.0
LIVENESS_INTERVAL_S = 0.5
# CUDA: events awaiting completion beyond this are settled by synchronizing.
MAX_PENDING_EVENTS = 4096

# A slot's state: between ops; waiting for or running an op; held back by its own cap.
IDLE, BACKLOGGED, CAPPED = 0, 1, 2
TABLE_VERSION = 4


@dataclass(frozen=True)
class Clock:
    """Time source, injectable so the policy can be tested deterministically."""

    now: Callable[[], float] = time.monotonic  # CLOCK_MONOTONIC: the same in every process
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Peer:
    """One session's slot as another session reads it."""

    slot: int
    share: float        # ratio / 100
    vtime: float        # busy seconds / share
    state: int          # IDLE, BACKLOGGED or CAPPED
    last_active: float  # monotonic time its last op ended
    stamp: float        # monotonic time its owner last wrote the slot
    busy: float = 0.0
    duty: float = 0.0       # busy / (busy + pauses) lately: how hard it drives the device
    anticipate: float = 0.0  # how long it is worth waiting for its next op after one ends
    pid: int = 0


# -- policy (pure functions) ---------------------------------------------------------


def share_of(ratio: float) -> float:
    return min(1.0, max(0.01, float(ratio) / 100.0))


def cap_fraction(ratio: float, level: int) -> float:
    """busy/wall a session may reach: its ratio at level 0, the whole GPU at level 100."""
    r = share_of(ratio)
    return r + (1.0 - r) * min(100, max(0, level)) / 100.0


class Pace:
    """A session's rhythm, from its own ops: the fraction of its time (waiting for the
    device aside) it keeps the device busy, and how long its client round trips last."""

    def __init__(self) -> None:
        self.busy = 0.0        # average op
        self.pause = 0.0       # average pause between ops (capped at ACTIVE_WINDOW_S)
        self.round_trip = 0.0  # average pause longer than LONG_PAUSE_MIN_S
        self._n = [0, 0, 0]    # samples so far: the first ones average plainly

    def _mix(self, which: int, old: float, new: float) -> float:
        self._n[which] += 1
        return old + max(PACE_ALPHA, 1.0 / self._n[which]) * (new - old)

    def paused(self, seconds: float) -> None:
        self.pause = self._mix(0, self.pause, min(seconds, ACTIVE_WINDOW_S))
        if LONG_PAUSE_MIN_S < seconds < ACTIVE_WINDOW_S:
            self.round_trip = self._mix(1, self.round_trip, seconds)

    def ran(self, spent: float) -> None:
        self.busy = self._mix(2, self.busy, spent)

    def duty(self) -> float:
        total = self.busy + self.pause
        return self.busy / total if total > 0 else 0.0

    def held(self) -> bool:
        """Whether others hold the device for it between its ops (see expected_wait)."""
        return self.duty() >= SATURATED_DUTY and self.anticipate() > 0

    def anticipate(self) -> float:
        """How long to hold the device for it after an op: twice its usual round trip,
        nothing if that is too long to be worth holding the device idle for."""
        hold = 2 * self.round_trip + POLL_MIN_S
        return hold if hold <= ANTICIPATE_MAX_S else 0.0


def contenders(peers: list[Peer], now: float) -> list[Peer]:
    """Peers asking for the device now, or between two of their ops."""
    return [p for p in peers
            if (p.state == BACKLOGGED and now - p.stamp < STALL_S)
            or now - p.last_active < ACTIVE_WINDOW_S]


def catch_up(vtime: float, share: float, active: list[Peer], returning: bool) -> float:
    """The virtual time to queue with: idleness banks no priority.

    A session returning after more than ACTIVE_WINDOW_S idle starts level with the least
    served contender (start-time fair queueing). One that only paused keeps what it is
    owed, but never more than a time slice plus CREDIT_S of the least share's busy time
    (which also settles two sessions racing to rejoin at once).
    """
    if not active:
        return vtime
    if returning:
        vtime = max(vtime, min(p.vtime for p in active))
    bound = (TURN_S + CREDIT_S) / min(share, min(p.share for p in active))
    return max(vtime, max(p.vtime for p in active) - bound)


def _poll(seconds: float) -> float:
    return min(POLL_MAX_S, max(POLL_MIN_S, seconds))


def expected_wait(p: Peer, now: float, my_op: float = 0.0) -> float:
    """How much longer a contender between two ops is worth waiting for (0: not at all).

    Only one that saturates the device when it runs: its pauses are round trips (or the
    host not scheduling its worker at once), not a light load. Only until its usual
    round trip is over. Not if our op (``my_op``, its usual length) easily fits in the
    rest of that round trip: then running it costs the contender nothing.
    """
    if p.state != IDLE or p.duty < SATURATED_DUTY:
        return 0.0  # a session held back by its own cap is not coming back soon
    elapsed = now - p.last_active
    round_trip_left = p.anticipate / 2 - elapsed  # anticipate is twice its round trip
    if elapsed >= p.anticipate or 4 * my_op < round_trip_left:
        return 0.0
    return p.anticipate - elapsed


def turn_delay(vtime: float, share: float, active: list[Peer], now: float,
               my_op: float = 0.0) -> float:
    """0 when this session may run its next op now, else how long to sleep first.

    It waits while it is more than TURN_S of its busy time ahead of a contender that
    wants the device (fair queueing in time slices), or that is between two ops and
    expected back (anticipation: without it every round trip of a busy session would go
    to its neighbours). A light contender holds nobody up. The sleep is about the time
    the one it waits for needs, bounded so a hand-off is noticed quickly.
    """
    turn = vtime - TURN_S / share
    owed = [(p, expected_wait(p, now, my_op)) for p in active if p.vtime < turn]
    owed = [(p, w) for p, w in owed if p.state == BACKLOGGED or w > 0]
    if not owed:
        return 0.0
    first, wait = min(owed, key=lambda x: x[0].vtime)
    if first.state == BACKLOGGED:
        return _poll((turn - first.vtime) * first.share)
    return _poll(wait)


def slice_delay(owner: Peer | None, vtime: float, active: list[Peer], now: float,
                my_op: float = 0.0) -> float:
    """0 when the time slice of ``owner`` (the session that ran last) no longer holds this
    session up, else how long to wait first.

    The owner keeps the device, through its short pauses if it saturates the device,
    until it is TURN_S of its busy time ahead of a session that wants the device (it
    then yields); a session that stopped, or whose pause outlasts its usual round trip,
    has lost its slice.
    """
    if owner is None:
        return 0.0
    waiting = [p.vtime for p in active if p.state == BACKLOGGED and p.slot != owner.slot]
    if owner.vtime - TURN_S / owner.share > min(waiting + [vtime]):
        return 0.0  # its slice is over
    if owner.state == BACKLOGGED and now - owner.stamp < STALL_S:
        return POLL_MAX_S  # running, or about to: it wakes us if it lets go
    wait = expected_wait(owner, now, my_op)
    return _poll(wait) if wait > 0 else 0.0


class TokenBucket:
    """Keeps busy/wall <= rate over any long window; ``burst`` busy seconds may come at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.t = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next op (ops are charged after they ran)."""
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def charge(self, spent: float, now: float) -> None:
        self._refill(now)
        self.tokens -= spent


# -- the shared table ----------------------------------------------------------------

_HEADER = struct.Struct("<4sIII")    # magic, version, claimed slots, high-water mark
_GEN = struct.Struct("<I")           # at _GEN_OFF: bumped (and futex-woken) to wake waiters
_GEN_OFF = 16
_OWNER = struct.Struct("<i")         # at _OWNER_OFF: slot + 1 of the time slice's owner, 0: none
_OWNER_OFF = 20
_SEQ = struct.Struct("<I")           # per-slot seqlock counter: odd while being written
# state pid share vtime last_active stamp busy duty anticipate start
_BODY = struct.Struct("<Iidddddddq")
_START = 9  # index of the process start time in _BODY
_MAGIC = b"ORTH"
HEADER_SIZE = 64
SLOT_SIZE = 128
SLOTS = 128
# After the header, one byte per slot: 1 while its session queues for the device (see
# Throttle._take_turn). Each session writes only its own byte, and one memchr over them
# tells whether anybody is waiting.
_QUEUED_OFF = HEADER_SIZE
_SLOTS_OFF = _QUEUED_OFF + SLOTS
TABLE_SIZE = _SLOTS_OFF + SLOTS * SLOT_SIZE


def slot_offset(slot: int) -> int:
    return _SLOTS_OFF + slot * SLOT_SIZE


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None if it is gone: a pid plus its
    start time names one process even after the pid is recycled."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Futex:
    """A futex on a 32-bit word of a shared file mapping: a waiter sleeps until another
    process bumps the word (or a timeout), instead of polling. Linux only; elsewhere
    ``make`` gives None and waiters sleep for their timeout."""

    def __init__(self, word: ctypes.c_uint32, syscall: Callable[..., int]) -> None:
        self.word = word  # keeps the mapping exported: release() before closing it
        self._addr = ctypes.addressof(word)
        self._syscall = syscall

    @classmethod
    def make(cls, mm: mmap.mmap, offset: int) -> Futex | None:
        if _SYS_FUTEX is None:
            return None
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        return cls(ctypes.c_uint32.from_buffer(mm, offset), syscall)

    def wait(self, expected: int, timeout: float) -> None:
        ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
        self._syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr), _FUTEX_WAIT,
                      ctypes.c_uint32(expected), ctypes.byref(ts), None, 0)

    def wake(self) -> None:
        self._syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr), _FUTEX_WAKE, 0x7FFFFFFF,
                      None, None, 0)

    def release(self) -> None:
        del self.word


class ShareTable:
    """One GPU's table of sessions, mapped from a file; ``flock`` on it is the device lock."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, slot: int) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.slot = slot
        self.futex = Futex.make(mm, _GEN_OFF)

    @classmethod
    def join(cls, path: Path, share: float, pid: int | None = None) -> ShareTable | None:
        """Open (creating) the table and claim a slot; None when all slots are taken."""
        pid = os.getpid() if pid is None else pid
        start = proc_start_ticks(pid) or 0
        for _ in range(10):
            fd = _open_owned(path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_nlink == 0:  # the last session removed it meanwhile
                    os.close(fd)
                    fd = -1
                    continue
                mm = _map(fd)
                slot = _claim(mm, share, pid, start)
            except BaseException:
                os.close(fd)
                raise
            finally:
                if fd >= 0:
                    _unlock_quietly(fd)
            if slot < 0:
                mm.close()
                os.close(fd)
                return None
            return cls(path, fd, mm, slot)
        raise OSError(f"{path}: kept disappearing while being opened")

    # -- device lock ---------------------------------------------------------------

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def try_lock(self) -> bool:
        """Take the device lock if nobody holds it (False: a neighbour is running an op)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    # -- waking ----------------------------------------------------------------------

    def generation(self) -> int:
        return int(_GEN.unpack_from(self.mm, _GEN_OFF)[0])

    def bump(self) -> None:
        """Wake waiting sessions: the device may be free for them."""
        _GEN.pack_into(self.mm, _GEN_OFF, (self.generation() + 1) & 0xFFFFFFFF)
        if self.futex is not None:
            self.futex.wake()

    def wait_change(self, generation: int, timeout: float) -> None:
        """Sleep until the table changes after ``generation`` was read, or ``timeout``."""
        if self.futex is not None:
            self.futex.wait(generation, timeout)
        else:
            time.sleep(timeout)

    # -- time slice ------------------------------------------------------------------

    def owner(self) -> int:
        """Slot of the session whose time slice it is, -1 for none."""
        return int(_OWNER.unpack_from(self.mm, _OWNER_OFF)[0]) - 1

    def set_owner(self, slot: int) -> None:
        _OWNER.pack_into(self.mm, _OWNER_OFF, slot + 1)

    # -- reading -------------------------------------------------------------------

    def claimed(self) -> int:
        return int(_HEADER.unpack_from(self.mm, 0)[2])

    def peers(self) -> list[Peer]:
        """Every other claimed slot (a slot being rewritten right now is skipped)."""
        hwm = min(SLOTS, _HEADER.unpack_from(self.mm, 0)[3])
        out = []
        for i in range(hwm):
            if i != self.slot:
                p = self.peer_at(i)
                if p is not None:
                    out.append(p)
        return out

    def peer_at(self, slot: int) -> Peer | None:
        """The session in ``slot``; None for a free slot or one being rewritten right now."""
        body = _read_slot(self.mm, slot)
        if body is None or body[1] == 0:
            return None
        state, pid, share, vtime, last_active, stamp, busy, duty, ant, _ = body
        return Peer(slot, share, vtime, state, last_active, stamp, busy, duty, ant, pid)

    def queued(self) -> bool:
        """Whether another session is queuing for the device (a memchr, no slot read)."""
        found = self.mm.find(b"\x01", _QUEUED_OFF, _QUEUED_OFF + SLOTS)
        return found >= 0 and (found != _QUEUED_OFF + self.slot
                               or self.mm.find(b"\x01", found + 1, _QUEUED_OFF + SLOTS) >= 0)

    def set_queued(self, queued: bool) -> None:
        self.mm[_QUEUED_OFF + self.slot] = 1 if queued else 0

    # -- writing -------------------------------------------------------------------

    def publish(self, me: Peer) -> None:
        """Rewrite our own slot (only its owner writes it; readers retry on a torn read)."""
        off = slot_offset(self.slot)
        body = _BODY.unpack_from(self.mm, off + _SEQ.size)
        seq = _SEQ.unpack_from(self.mm, off)[0] + 1
        _SEQ.pack_into(self.mm, off, seq)
        _BODY.pack_into(self.mm, off + _SEQ.size, me.state, body[1], me.share, me.vtime,
                        me.last_active, me.stamp, me.busy, me.duty, me.anticipate,
                        body[_START])
        _SEQ.pack_into(self.mm, off, seq + 1)

    def reap_dead(self, alive: Callable[[int, int], bool] | None = None) -> int:
        """Free the slots of workers that died without closing (under the lock)."""
        alive = alive or (lambda pid, start: proc_start_ticks(pid) == start)
        hwm = min(SLOTS, _HEADER.unpack_from(self.mm, 0)[3])
        dead = []
        for i in range(hwm):
            body = _read_slot(self.mm, i)
            if i != self.slot and body is not None and body[1] != 0 and \
                    not alive(body[1], body[_START]):
                dead.append(i)
        if not dead:
            return 0
        freed = 0
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            for i in dead:  # look again under the lock: it may have been reclaimed meanwhile
                body = _read_slot(self.mm, i)
                if body is not None and body[1] != 0 and not alive(body[1], body[_START]):
                    _free_slot(self.mm, i)
                    freed += 1
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return freed

    def close(self, locked: bool = False) -> None:
        """Give the slot back; the last session removes the file."""
        try:
            if not locked:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            if self.owner() == self.slot:
                self.set_owner(-1)
            if _free_slot(self.mm, self.slot) == 0:
                _unlink_quietly(self.path)
            else:
                self.bump()  # whoever waited for us stops waiting
        finally:
            if self.futex is not None:
                self.futex.release()
            self.mm.close()
            os.close(self.fd)  # also drops the lock


def _open_owned(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"{path} belongs to another user")
    return fd


def _map(fd: int) -> mmap.mmap:
    if os.fstat(fd).st_size < TABLE_SIZE:
        os.ftruncate(fd, TABLE_SIZE)
    mm = mmap.mmap(fd, TABLE_SIZE)
    magic, version, _claimed, _hwm = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC or version != TABLE_VERSION:
        mm[:TABLE_SIZE] = bytes(TABLE_SIZE)  # new (or foreign) file: start empty
        _HEADER.pack_into(mm, 0, _MAGIC, TABLE_VERSION, 0, 0)
    return mm


def _claim(mm: mmap.mmap, share: float, pid: int, start: int) -> int:
    """Take the lowest free slot (caller holds the lock); -1 when full."""
    _magic, _version, claimed, hwm = _HEADER.unpack_from(mm, 0)
    for i in range(SLOTS):
        off = slot_offset(i)
        if _BODY.unpack_from(mm, off + _SEQ.size)[1] == 0:
            seq = (_SEQ.unpack_from(mm, off)[0] | 1) + 1
            _BODY.pack_into(mm, off + _SEQ.size, IDLE, pid, share, 0.0, 0.0, 0.0, 0.0, 0.0,
                            0.0, start)
            _SEQ.pack_into(mm, off, seq)
            _HEADER.pack_into(mm, 0, _MAGIC, TABLE_VERSION, claimed + 1, max(hwm, i + 1))
            return i
    return -1


def _free_slot(mm: mmap.mmap, slot: int) -> int:
    """Clear a slot and return how many stay claimed (caller holds the lock)."""
    _magic, _version, claimed, hwm = _HEADER.unpack_from(mm, 0)
    off = slot_offset(slot)
    if _BODY.unpack_from(mm, off + _SEQ.size)[1] != 0:
        claimed = max(0, claimed - 1)
    seq = (_SEQ.unpack_from(mm, off)[0] | 1) + 1
    _BODY.pack_into(mm, off + _SEQ.size, IDLE, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    _SEQ.pack_into(mm, off, seq)
    mm[_QUEUED_OFF + slot] = 0
    while hwm > 0 and _BODY.unpack_from(mm, slot_offset(hwm - 1) + _SEQ.size)[1] == 0:
        hwm -= 1
    _HEADER.pack_into(mm, 0, _MAGIC, TABLE_VERSION, claimed, hwm)
    return claimed


def _read_slot(mm: mmap.mmap, slot: int) -> tuple | None:
    off = slot_offset(slot)
    for _ in range(64):
        seq = _SEQ.unpack_from(mm, off)[0]
        if seq & 1:
            continue
        body = _BODY.unpack_from(mm, off + _SEQ.size)
        if _SEQ.unpack_from(mm, off)[0] == seq:
            return body
    return None


def _unlock_quietly(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- CUDA metering -------------------------------------------------------------------


class CudaTimer:
    """Device time of ops on CUDA: an event pair around each op, read once it completed.

    Reading never synchronizes unless asked (contended ops, so the device lock covers
    the op's execution) or too many pairs are outstanding.
    """

    def __init__(self, new_event: Callable[[], Any], stream: Callable[[], Any]) -> None:
        self._new_event = new_event
        self._stream = stream  # the session device's current stream (not device 0's)
        self._pending: deque[tuple[Any, Any]] = deque()
        self._start: Any = None

    def start(self) -> None:
        self._start = self._new_event()
        self._start.record(self._stream())

    def stop(self, synchronize: bool) -> float:
        """Device seconds of the ops that completed since the last call."""
        end = self._new_event()
        end.record(self._stream())
        self._pending.append((self._start, end))
        if synchronize or len(self._pending) > MAX_PENDING_EVENTS:
            end.synchronize()
        done = 0.0
        while self._pending and self._pending[0][1].query():
            first, last = self._pending.popleft()
            done += first.elapsed_time(last) / 1000.0
        return done


# -- the throttle --------------------------------------------------------------------


class Throttle:
    """One session's compute share: cap, fair turn-taking with its GPU's other sessions."""

    def __init__(self, *, ratio: float, level: int, table: ShareTable | None,
                 clock: Clock | None = None, timer: CudaTimer | None = None,
                 enforce: bool = True) -> None:
        self.clock = clock or Clock()
        now = self.clock.now()
        self.ratio = ratio
        self.level = level
        self.share = share_of(ratio)
        self.cap = cap_fraction(ratio, level) if enforce else 1.0
        self.bucket = TokenBucket(self.cap, BURST_S, now) if self.cap < 0.999 else None
        self.table = table
        self.timer = timer
        self.pace = Pace()
        self.vtime = 0.0
        self.busy_s = 0.0
        self.wait_s = 0.0
        self.dropped_s = 0.0  # priority given up on returning from idle, in busy seconds
        self.ops = 0
        self.contended_ops = 0
        self._contended_turn = False
        self.started = now
        self._neighbours = False  # other sessions hold slots: ops take the device lock
        self._shared = False      # and some of them are active: take turns
        self._locked = False
        self._last_end = -1.0  # when our last op ended (-1: none yet)
        self._next_scan = 0.0
        self._next_publish = 0.0
        self._next_reap = now + LIVENESS_INTERVAL_S

    # -- hooks -----------------------------------------------------------------------

    def before_op(self) -> None:
        now = self.clock.now()
        if self._last_end >= 0:
            self.pace.paused(now - self._last_end)
        if now >= self._next_scan:
            self._scan(now)
        if self.bucket is not None:
            now = self._wait_for_tokens(now)
        if not self._shared and self._neighbours and self.table is not None:
            # Idle neighbours: no turns, but never two ops at once. A neighbour running an
            # op now is not idle: waiting on the lock unseen would let it keep the device
            # (flock is not fair), so queue for a turn, where it sees us.
            self._guard(self._try_lock)
            self._shared = not self._locked and self.table is not None
        if self._shared and not self._take_idle_device(now):
            self._take_turn(now)
        if self.timer is not None:
            self.timer.start()

    def _try_lock(self) -> None:
        self._lock_if_free()
        if not self._locked:
            self._publish(BACKLOGGED, self.clock.now())

    def _lock_if_free(self) -> None:
        assert self.table is not None
        self._locked = self.table.try_lock()

    def after_op(self, spent: float, ops: int = 1) -> None:
        """``ops``: how many ops ran since ``before_op`` (a frame's run of them takes one
        turn, see ``Executor.begin_batch``)."""
        if self.timer is not None:
            spent = self.timer.stop(synchronize=self._locked)
        now = self.clock.now()
        self.busy_s += spent
        self.vtime += spent / self.share
        self.ops += ops
        if self._contended_turn:
            self.contended_ops += ops
            self._contended_turn = False
        self.pace.ran(spent)
        self._last_end = now
        if self.bucket is not None:
            self.bucket.charge(spent, now)
        if self._shared:
            self._publish(IDLE, now)
        elif self.table is not None and now >= self._next_publish:
            # Uncontended: keep the slot fresh for newcomers, at most every SCAN_INTERVAL_S.
            self._next_publish = now + SCAN_INTERVAL_S
            self._publish(IDLE, now)
        if self._locked:
            self._release_device()

    def close(self) -> None:
        wall = max(1e-9, self.clock.now() - self.started)
        log.info("compute share: ratio %s%%, throttle_level %d: busy %.2f s of %.2f s (%.1f%%), "
                 "%d ops (%d contended), waited %.2f s for its share, %.2f s of priority "
                 "dropped; lately busy %.0f%% of its own time, round trip %.1f ms", self.ratio,
                 self.level, self.busy_s, wall, 100.0 * self.busy_s / wall, self.ops,
                 self.contended_ops, self.wait_s, self.dropped_s, 100 * self.pace.duty(),
                 1000 * self.pace.round_trip)
        table, self.table = self.table, None
        if table is not None:
            try:
                table.close(locked=self._locked)
            except OSError as exc:
                log.warning("compute share: could not leave %s: %s", table.path, exc)
        self._locked = False

    @property
    def neighbours(self) -> bool:
        """Other sessions held this GPU's slots at the last look (SCAN_INTERVAL_S)."""
        return self._neighbours

    def stats(self) -> dict[str, float | int]:
        return {"busy_s": self.busy_s, "throttle_wait_s": self.wait_s, "ops": self.ops,
                "contended_ops": self.contended_ops, "dropped_s": self.dropped_s}

    def peer(self, state: int, now: float) -> Peer:
        """This session as its neighbours see it."""
        return Peer(-1, self.share, self.vtime, state, self._last_end, now, self.busy_s,
                    self.pace.duty(), self.pace.anticipate())

    # -- internals -------------------------------------------------------------------

    def _scan(self, now: float) -> None:
        """Whether other sessions are active on the GPU (a memory read when we are alone).

        Neighbours that hold slots but are idle do not make us take turns (only take the
        device lock): when one starts, it waits its turn against us at once, and we
        notice it within SCAN_INTERVAL_S.
        """
        self._next_scan = now + SCAN_INTERVAL_S
        table = self.table
        self._neighbours = table is not None and table.claimed() > 1
        if table is None or not self._neighbours:
            self._shared = False
            return
        if now >= self._next_reap:
            self._next_reap = now + LIVENESS_INTERVAL_S
            if not self._guard(table.reap_dead):
                return
        self._shared = bool(contenders(table.peers(), now))

    def _wait_for_tokens(self, now: float) -> float:
        assert self.bucket is not None
        delay = self.bucket.delay(now)
        if delay > 0:
            self._publish(CAPPED, now)  # nobody should hold the device for us meanwhile
            self.clock.sleep(delay)
            self.wait_s += delay
            now = self.clock.now()
        return now

    def _take_idle_device(self, now: float) -> bool:
        """Take the device at once, outside the fair queue, when that delays nobody: no
        other session queues for it, nobody runs an op, and no session that saturates it
        is between two ops (its pause is held for it, see expected_wait). Work-conserving
        and cheap (a memchr and one slot read): the queue's bookkeeping reads every slot,
        which cost light sessions more than their ops (16 sessions of tiny ops per GPU:
        about 30 us per turn, a frame's reply 90 us later at the median).

        A session back from idleness queues once (``catch_up`` sets its virtual time).
        True: the op may run now.
        """
        table = self.table
        assert table is not None
        if self._last_end < 0 or now - self._last_end > ACTIVE_WINDOW_S or table.queued():
            return False
        owner = table.owner()
        if owner >= 0 and owner != table.slot:
            held = table.peer_at(owner)
            if held is not None and expected_wait(held, now, self.pace.busy) > 0:
                return False
        if not self._guard(self._lock_if_free):
            return True  # the table failed: the session runs uncoordinated from now on
        if self._locked:
            table.set_owner(table.slot)  # under the lock, as in _take_turn
        return self._locked

    def _take_turn(self, now: float) -> None:
        table = self.table
        assert table is not None
        table.set_queued(True)  # sessions arriving now queue too (_take_idle_device)
        try:
            self._queue(table, now)
        finally:
            table.set_queued(False)

    def _queue(self, table: ShareTable, now: float) -> None:
        t0 = now
        returning = self._last_end < 0 or now - self._last_end > ACTIVE_WINDOW_S
        contended = False
        while True:
            generation = table.generation()
            active = contenders(table.peers(), now)
            contended = contended or bool(active)
            caught_up = catch_up(self.vtime, self.share, active, returning)
            self.dropped_s += (caught_up - self.vtime) * self.share
            self.vtime = caught_up
            returning = False  # once: while it waits it is owed what it waits for
            delay = self._delay(active, table.owner(), now)
            self._publish(BACKLOGGED, now)  # we want the device: others see it
            if delay <= 0:
                break
            table.wait_change(generation, delay)  # woken early on a hand-over
            now = self.clock.now()
        if self._guard(table.lock):
            self._locked = True
            table.set_owner(table.slot)  # our time slice (the lock makes this write ours)
        self._contended_turn = contended  # its ops are counted when the turn ends
        self.wait_s += self.clock.now() - t0

    def _delay(self, active: list[Peer], owner_slot: int, now: float) -> float:
        assert self.table is not None
        my_op = self.pace.busy
        delay = turn_delay(self.vtime, self.share, active, now, my_op)
        if owner_slot == self.table.slot:
            if delay > 0:  # our slice is over: hand it on
                self.table.set_owner(-1)
                self.table.bump()
            return delay
        owner = next((p for p in active if p.slot == owner_slot), None)
        return max(delay, slice_delay(owner, self.vtime, active, now, my_op))

    def _release_device(self) -> None:
        self._locked = False
        if self.table is None or not self._guard(self.table.unlock):
            return
        # Wake the waiters if they may go now: not when our pauses are held for us (our
        # slice goes on through our round trips), which would wake them after every op
        # only to sleep again. They are also woken when a slice is handed on or a session
        # leaves, and look again at least every POLL_MAX_S.
        # Nobody waits unless a session queues: they all queue in _take_turn. (One that is
        # setting its flag just now reads our slot after it, or sleeps POLL_MAX_S at most.)
        if self._shared and not self.pace.held() and self.table.queued():
            self._guard(self.table.bump)

    def _publish(self, state: int, now: float) -> None:
        if self.table is not None:
            self.table.publish(self.peer(state, now))

    def _guard(self, fn: Callable[[], Any]) -> bool:
        """Run a table operation; an OS error leaves the session unshared, never failing ops."""
        try:
            fn()
            return True
        except OSError as exc:
            log.warning("compute share: table %s failed (%s); this session now runs without "
                        "coordinating with its neighbours", self.table and self.table.path, exc)
            self.table, self._shared, self._neighbours, self._locked = None, False, False, False
            return False


# -- construction --------------------------------------------------------------------


def table_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def table_path(spec: dict, base: Path | None = None) -> Path:
    """One table per physical GPU. An emulated GPU is this daemon's own (its uuid is only
    derived from the node name), so its table is also keyed by the daemon's pid."""
    uuid = re.sub(r"[^A-Za-z0-9-]", "_", str(spec.get("device_uuid") or spec.get("device")))
    scope = f"{uuid}-d{os.getppid()}" if _emulated(spec) else uuid
    return (base or table_dir()) / f"orion-throttle-v{TABLE_VERSION}-u{os.geteuid()}-{scope}"


_EMULATED_TABLE = re.compile(r"orion-throttle-v\d+-u(\d+)-.+-d(\d+)")


def sweep_stale_tables(directory: Path) -> int:
    """Remove this user's emulated-GPU tables whose daemon is gone. A daemon killed with
    its sessions leaves its table behind, and no later session opens that name again
    (it holds the daemon's pid); the daemon's workers end with it, so nobody uses it."""
    removed = 0
    for path in directory.glob("orion-throttle-*"):
        m = _EMULATED_TABLE.fullmatch(path.name)
        if m and int(m.group(1)) == os.geteuid() and not Path(f"/proc/{m.group(2)}").exists():
            _unlink_quietly(path)
            removed += 1
    return removed


def _emulated(spec: dict) -> bool:
    return bool(spec.get("emulated")) or str(spec.get("device", "cpu")) == "cpu"


def mps_active(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    pipe = env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    return os.path.exists(os.path.join(pipe, "control"))


def _cuda_timer(device: str) -> CudaTimer:
    import torch

    dev = torch.device(device)
    return CudaTimer(lambda: torch.cuda.Event(enable_timing=True),
                     lambda: torch.cuda.current_stream(dev))


def _use_mps(ratio: float, level: int) -> bool:
    """MPS thread percentage is a hardware partition: exactly level 0's strict cap."""
    if level != 0 or not mps_active():
        return False
    import torch

    if torch.cuda.is_initialized():
        log.info("compute share: MPS is running but CUDA is already initialised in this "
                 "worker; metering instead of CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        return False
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, round(share_of(ratio) * 100)))
    return True


def make_throttle(spec: dict, base: Path | None = None) -> Throttle | None:
    """The throttle for a session's spec; None when ops run unthrottled and unmetered."""
    device = str(spec.get("device", "cpu"))
    cuda = device.startswith("cuda")
    ratio = spec.get("ratio") or 100
    level = int(spec.get("throttle_level", 100))
    if not spec.get("enable_computation_throttle", True):
        # No share to enforce; on CUDA still meter device time (the op's own timing is
        # only its launch there).
        return Throttle(ratio=ratio, level=100, table=None, timer=_cuda_timer(device),
                        enforce=False) if cuda else None
    if cuda and _use_mps(ratio, level):
        log.info("compute share: ratio %s%% through MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE)",
                 ratio)
        return Throttle(ratio=ratio, level=level, table=None, timer=_cuda_timer(device),
                        enforce=False)
    table = _join_table(spec, base)
    throttle = Throttle(ratio=ratio, level=level, table=table,
                        timer=_cuda_timer(device) if cuda else None)
    log.info("compute share: ratio %s%%, throttle_level %d (cap %.0f%% of the GPU), table %s",
             ratio, level, 100 * throttle.cap, table.path if table else "none")
    return throttle


def _join_table(spec: dict, base: Path | None) -> ShareTable | None:
    path = table_path(spec, base)
    if _emulated(spec):
        sweep_stale_tables(path.parent)
    try:
        table = ShareTable.join(path, share_of(spec.get("ratio") or 100))
    except OSError as exc:
        log.warning("compute share: cannot use %s (%s); this session runs with its cap only",
                    path, exc)
        return None
    if table is None:
        log.warning("compute share: %s has no free slot (%d sessions); this session runs with "
                    "its cap only", path, SLOTS)
    return table
