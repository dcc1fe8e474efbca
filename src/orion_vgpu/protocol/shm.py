"""Shared-memory arena between a client and its session worker.

Layout of the mapped file (``/dev/shm/orion-*`` made by the client, or an ``orionsock<N>``
file made by ``orion shm`` for containers that mount only that file):

    [0, 64)     nonce written by the client; the server proves it sees the same memory
    [64, 72)    upload ring: bytes consumed so far (u64, written by the server)
    [72, 80)    upload ring: bytes written so far by a streamed upload (u64, client)
    [80, 88)    download stream: bytes written so far (u64, server)
    [88, 96)    download stream: bytes read so far (u64, client)
    [96]        1 while the client waits for a reply, else 0 (client)
    [4096, 4096 + ring)        upload ring (client -> server), monotonic positions
    [4096 + ring, size)        download area (server -> client), one reply at a time

Large transfers are *streamed* in chunks (``chunks``): the writer publishes each chunk
as soon as it is copied in and the reader copies it out meanwhile, so the two copies run
at the same time on two cores instead of one after the other, and a transfer larger than
the ring or the download area wraps around it. Counters are written after the bytes
they cover (x86 keeps stores in program order).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

HEADER_SIZE = 4096
_U64 = struct.Struct("<Q")
_CONSUMED = 64
_PUBLISHED = 72
_DL_PUBLISHED = 80
_DL_CONSUMED = 88
_WAITING = 96
_FRAMES_DONE = 104  # frames of commands the server has run (the client's: sent)
STREAM_CHUNK = 2 << 20  # a chunk fits the L2 cache; big enough that per-chunk overhead is small
# Smaller transfers copy whole (batched, no hand-over per chunk): on a 2-core host streaming
# won from 32 MiB on (uploads 1.3-1.45x faster) and lost or tied below.
STREAM_MIN_BYTES = 32 << 20
STALL_S = 60.0  # a streaming peer that publishes nothing this long is stuck or hostile
NAME_RE = re.compile(r"^(orion-[0-9a-f]{8,64}|orionsock[0-9]{1,4})$")


class ShmError(Exception):
    """The arena cannot be used (bad name, wrong nonce, too small)."""


class ShmPeerGone(ShmError):
    """The other side closed the connection while a streamed transfer waited for it."""


def chunks(start: int, nbytes: int, chunk: int, ring: int) -> Iterator[tuple[int, int]]:
    """Monotonic positions and sizes of a streamed transfer's chunks in a ring of ``ring``
    bytes: a chunk that would straddle the end goes to the start of the next lap, exactly
    as ``Arena.place`` does, so both sides compute the same positions."""
    pos, left = start, nbytes
    while left > 0:
        c = min(chunk, left)
        if pos % ring + c > ring:
            pos += ring - pos % ring
        yield pos, c
        pos += c
        left -= c


def stream_chunk(area: int) -> int:
    """Chunk size for streaming through an area of ``area`` bytes; 0: too small to stream."""
    chunk = min(STREAM_CHUNK, (area // 4) & ~4095)
    return chunk if chunk >= 64 * 1024 else 0


_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise: Callable[..., int] | None = None


def prefer_huge_pages(t: torch.Tensor) -> None:
    """Ask for transparent huge pages on a fresh buffer about to be filled with a large
    transfer: one page fault per 2 MiB instead of 512 (a fresh 64 MiB buffer otherwise
    costs more in faults than the copy itself). A hint: failures are ignored."""
    global _madvise
    nbytes = t.numel() * t.element_size()
    if nbytes < 2 * _HUGE or not sys.platform.startswith("linux"):
        return
    if _madvise is None:
        fn = ctypes.CDLL(None).madvise
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _madvise = fn
    lo = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    hi = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A plain single-threaded memcpy: torch's copy_ would run an OpenMP region, whose
    threads wait for a core on a loaded host (10-100x slower than the copy itself)."""
    np.copyto(dst.numpy(), src.numpy())


def shm_dir() -> str:
    return os.environ.get("ORION_SHM_DIR", "/dev/shm")


def validate_path(path: str) -> str:
    """Only plain arena names directly in the shm directory: no traversal, no other files."""
    base = os.path.basename(path)
    if (not NAME_RE.match(base) or os.path.normpath(path) != path
            or os.path.dirname(path) != shm_dir()):
        raise ShmError(f"refusing shared-memory path {path!r}: expected {shm_dir()}/orion-<hex>"
                       " or an orionsock<N> file")
    return path


class Arena:
    def __init__(self, path: str, size: int | None = None, create: bool = False) -> None:
        validate_path(path)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size or 0)
            real = os.fstat(fd).st_size
            if real < HEADER_SIZE * 4:
                raise ShmError(f"shared memory {path} is too small ({real} bytes)")
            self.mm = mmap.mmap(fd, real)
        finally:
            os.close(fd)
        self.path = path
        self.size = real
        self.ring_size = ((real - HEADER_SIZE) // 2) & ~4095
        self.download_off = HEADER_SIZE + self.ring_size
        self.download_size = real - self.download_off
        self._bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.produced = self.consumed()

    def close(self) -> None:
        self._bytes = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process

    # nonce: proves client and server map the same memory
    def write_nonce(self, nonce: str) -> None:
        data = nonce.encode()[:64].ljust(64, b"\0")
        self.mm[0:64] = data

    def read_nonce(self) -> str:
        return bytes(self.mm[0:64]).rstrip(b"\0").decode(errors="replace")

    def consumed(self) -> int:
        return _U64.unpack_from(self.mm, _CONSUMED)[0]

    def set_consumed(self, pos: int) -> None:
        _U64.pack_into(self.mm, _CONSUMED, pos)

    def set_published(self, pos: int) -> None:
        _U64.pack_into(self.mm, _PUBLISHED, pos)

    def set_dl_published(self, pos: int) -> None:
        _U64.pack_into(self.mm, _DL_PUBLISHED, pos)

    def set_dl_consumed(self, pos: int) -> None:
        _U64.pack_into(self.mm, _DL_CONSUMED, pos)

    def set_waiting(self, waiting: bool) -> None:
        self.mm[_WAITING] = 1 if waiting else 0

    def set_frames_done(self, n: int) -> None:
        _U64.pack_into(self.mm, _FRAMES_DONE, n)

    def frames_done(self) -> int:
        return _U64.unpack_from(self.mm, _FRAMES_DONE)[0]

    def client_running(self) -> bool:
        """False while the client waits for a reply (blocked: not on a core)."""
        return not self.mm[_WAITING]

    def reset_download(self) -> None:
        """Before a streamed reply: the client reads nothing until the reply arrives."""
        _U64.pack_into(self.mm, _DL_CONSUMED, 0)
        _U64.pack_into(self.mm, _DL_PUBLISHED, 0)

    def wait_published(self, pos: int, alive: Callable[[], bool] | None = None) -> None:
        self._wait(_PUBLISHED, pos, alive, "the client stopped writing a streamed upload")

    def wait_consumed(self, pos: int, alive: Callable[[], bool] | None = None) -> None:
        self._wait(_CONSUMED, pos, alive, "the server stopped reading a streamed upload")

    def wait_dl_published(self, pos: int, alive: Callable[[], bool] | None = None) -> None:
        self._wait(_DL_PUBLISHED, pos, alive, "the server stopped writing a streamed download")

    def wait_dl_consumed(self, pos: int, alive: Callable[[], bool] | None = None) -> None:
        self._wait(_DL_CONSUMED, pos, alive, "the client stopped reading a streamed download")

    def _wait(self, field: int, pos: int, alive: Callable[[], bool] | None, what: str) -> None:
        """Until the counter at ``field`` reaches ``pos``: spin briefly (the peer is
        usually one chunk copy away), then sleep in short steps; check every 50 ms that
        the peer is still connected, give up after ``STALL_S`` without progress."""
        mm, unpack = self.mm, _U64.unpack_from
        for _ in range(64):
            if unpack(mm, field)[0] >= pos:
                return
        last, now = unpack(mm, field)[0], time.monotonic()
        stall_at, check_at = now + STALL_S, now + 0.05
        while (cur := unpack(mm, field)[0]) < pos:
            time.sleep(0.00002)
            now = time.monotonic()
            if cur != last:
                last, stall_at = cur, now + STALL_S
            elif now > stall_at:
                raise ShmError(f"{what} for {STALL_S:.0f} s")
            if alive is not None and now > check_at:
                if not alive():
                    raise ShmPeerGone(f"{what}: connection closed")
                check_at = now + 0.05

    def region(self, offset: int, nbytes: int) -> torch.Tensor:
        if offset < HEADER_SIZE or offset + nbytes > self.size:
            raise ShmError("shared-memory region out of bounds")
        return self._bytes[offset:offset + nbytes]

    # client side: reserve ring space for an upload, return its monotonic position
    def place(self, nbytes: int) -> tuple[int, int]:
        """Where an upload of ``nbytes`` goes, and how far the server must have consumed."""
        pos = self.produced
        if pos % self.ring_size + nbytes > self.ring_size:
            pos += self.ring_size - pos % self.ring_size  # skip the tail; never straddle
        # The skipped tail held nothing, so only bytes actually produced must be consumed.
        return pos, min(self.produced, pos + nbytes - self.ring_size)

    def fits(self, nbytes: int) -> bool:
        return self.consumed() >= self.place(nbytes)[1]

    def reserve(self, nbytes: int, timeout: float = 60.0) -> int:
        if self.consumed() >= self.produced and nbytes <= self.ring_size:
            # Empty ring: start the next lap, at the ring's first pages (mapped and likely
            # cached), rather than walk on into pages not touched yet: a first touch costs
            # a page fault per 4 KiB, more than the copy (64 KiB uploads ran at 1 GB/s).
            pos = -(-self.produced // self.ring_size) * self.ring_size
            self.produced = pos + nbytes
            return pos
        pos, need = self.place(nbytes)
        deadline = None
        while self.consumed() < need:
            deadline = deadline or time.monotonic() + timeout
            if time.monotonic() > deadline:
                raise ShmError("shared-memory ring stayed full: server not consuming")
            time.sleep(0.0001)
        self.produced = pos + nbytes
        return pos

    def reserve_chunk(self, nbytes: int, alive: Callable[[], bool] | None = None) -> int:
        """``reserve`` for a chunk of a streamed upload: waits as long as the server is
        connected and making progress."""
        pos, need = self.place(nbytes)
        self.wait_consumed(need, alive)
        self.produced = pos + nbytes
        return pos

    def ring_region(self, pos: int, nbytes: int) -> torch.Tensor:
        off = HEADER_SIZE + pos % self.ring_size
        return self.region(off, nbytes)
