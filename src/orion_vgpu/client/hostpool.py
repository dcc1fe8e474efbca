"""Host buffers in shared memory that a session's worker reads uploads from and writes
downloads into: one copy per transfer instead of two.

Through the arena a transfer costs two copies (this process into the ring, the worker out
of it; or the other way round), which on one host compete for the same memory bandwidth.
With a host buffer:

- a download is one copy by the worker straight into memory this process maps, and the
  tensor ``.cpu()`` returns *is* that memory (as CUDA copies into pinned host memory);
- an upload is one copy by this process into the buffer; the worker of an emulated GPU,
  whose device memory is host memory, makes the buffer the tensor's memory (a CUDA worker
  copies it to the device with one DMA and hands the buffer back at once).

A buffer file ``/dev/shm/orion-<hex>`` holds a 4 KiB header, then the data. The header
starts with the session's arena nonce: the worker maps a buffer only if it finds it there
(a program cannot make the server open another program's buffer), then unlinks the file.
File names start with a tag derived from the nonce (``file_prefix``): when the session
ends, the worker removes files of the session it never mapped (a program killed while
filling one), so nothing is left behind. Space is reserved up front
(``posix_fallocate``: a full tmpfs is an error here, not a SIGBUS later). A download buffer
returns to the pool when the last tensor (or view) on it is gone; an upload buffer when the
worker marks it free in the header (its tensor was freed). Free buffers beyond
``ORION_HOST_CACHE_MB`` (default 2048; 0 turns host buffers off) are given back to the
system, and the worker is told to unmap them with the next command naming a buffer.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref

import numpy as np
import torch

from orion_vgpu.protocol.hostbuf import (
    FREE,
    HEADER,
    LENT,
    STATE_AT,
    file_prefix,
    nonce_bytes,
)
from orion_vgpu.protocol.hostbuf import U64 as _U64
from orion_vgpu.protocol.shm import shm_dir

ONE_COPY_MIN = 1 << 20  # smaller downloads go through the arena (a buffer costs a mapping)
UPLOAD_MIN = 8 << 20  # parameters below this stay in the ring (a buffer each is a mapping)
UNIT = 2 << 20
MAX_BUFFERS = 64  # per session; the worker maps each one (protocol.messages.MAX_HOST_BUFFERS)
DEFAULT_CACHE_MB = 2048


def cache_bytes() -> int:
    """``ORION_HOST_CACHE_MB``: free buffers kept for reuse; 0 turns host buffers off."""
    raw = os.environ.get("ORION_HOST_CACHE_MB", "").strip()
    try:
        return max(0, int(raw or DEFAULT_CACHE_MB)) << 20
    except ValueError:
        return DEFAULT_CACHE_MB << 20


class HostBuffer:
    __slots__ = ("name", "path", "size", "mm", "mapped")

    def __init__(self, path: str, size: int, mm: mmap.mmap) -> None:
        self.path, self.size, self.mm = path, size, mm
        self.name = os.path.basename(path)
        self.mapped = False  # named to the worker (which maps it and unlinks the file)

    def data(self, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=HEADER)

    def lent(self) -> bool:
        return _U64.unpack_from(self.mm, STATE_AT)[0] != FREE


class HostPool:
    def __init__(self, cache: int, nonce: str) -> None:
        self.cache_bytes = cache
        self.nonce = nonce_bytes(nonce)
        self.prefix = file_prefix(nonce)
        self.free: list[HostBuffer] = []
        self.lent: list[HostBuffer] = []  # uploads the worker holds
        self.released: list[HostBuffer] = []  # appended by finalizers, from any thread
        self.dropped: list[str] = []  # names the worker may unmap
        self.buffers: set[HostBuffer] = set()
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> HostBuffer | None:
        """A free buffer of at least ``nbytes`` (the smallest that is not more than twice as
        large), or a new one; None when shared memory is full or the pool at its limit."""
        with self.lock:
            self._collect()
            fits = [b for b in self.free if nbytes <= b.size <= 2 * nbytes + UNIT]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self.free.remove(buf)
                return buf
            while len(self.buffers) >= MAX_BUFFERS and self.free:
                self._drop(max(self.free, key=lambda b: b.size))
            if len(self.buffers) >= MAX_BUFFERS:
                return None
            buf = _create(-(-nbytes // UNIT) * UNIT, self.prefix, self.nonce)
            if buf is not None:
                self.buffers.add(buf)
            return buf

    def destination(self, buf: HostBuffer) -> list:
        """The command field naming the buffer, with the buffers the worker may unmap."""
        with self.lock:
            dropped, self.dropped = self.dropped, []
        buf.mapped = True
        return [buf.name, buf.size, dropped]

    def wrap(self, buf: HostBuffer, dtype: torch.dtype, shape: list[int],
             nbytes: int) -> torch.Tensor:
        """The tensor on ``buf``; the buffer comes back when it and its views are gone."""
        arr = buf.data(nbytes)
        weakref.finalize(arr, self.released.append, buf).atexit = False
        return torch.from_numpy(arr).view(dtype).view(shape)

    def lend(self, buf: HostBuffer) -> None:
        """``buf`` carries an upload: the worker owns it until it marks it free."""
        _U64.pack_into(buf.mm, STATE_AT, LENT)
        with self.lock:
            self.lent.append(buf)

    def give_back(self, buf: HostBuffer) -> None:
        self.released.append(buf)

    def forget(self, buf: HostBuffer) -> None:
        """A command naming ``buf`` failed and whether the worker mapped it is unknown: it
        is not used again (the worker keeps at most a mapping of it until the session ends)."""
        with self.lock:
            self.buffers.discard(buf)
        _unlink(buf.path)
        _close(buf)

    def close(self) -> None:
        with self.lock:
            self._collect()
            while self.free:
                self._drop(self.free[-1])
            # Buffers still held by tensors stay mapped here, but no file is left behind.
            for buf in self.buffers:
                _unlink(buf.path)

    def _collect(self) -> None:
        while self.released:
            self.free.append(self.released.pop())
        if self.lent:
            back = [b for b in self.lent if not b.lent()]
            if back:
                self.lent = [b for b in self.lent if b.lent()]
                self.free.extend(back)
        cached = sum(b.size for b in self.free)
        while cached > self.cache_bytes and self.free:
            buf = max(self.free, key=lambda b: b.size)
            cached -= buf.size
            self._drop(buf)

    def _drop(self, buf: HostBuffer) -> None:
        self.free.remove(buf)
        self.buffers.discard(buf)
        if buf.mapped:
            self.dropped.append(buf.name)
        _unlink(buf.path)
        _close(buf)


def _create(size: int, prefix: str, nonce: bytes) -> HostBuffer | None:
    path = os.path.join(shm_dir(), prefix + secrets.token_hex(8))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except OSError:
        return None
    try:
        os.pwrite(fd, nonce, 0)  # first: the worker's sweep knows the file as the session's
        os.posix_fallocate(fd, 0, HEADER + size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return HostBuffer(path, size, mmap.mmap(fd, HEADER + size, flags=flags))
    except OSError:
        _unlink(path)
        return None
    finally:
        os.close(fd)


def _close(buf: HostBuffer) -> None:
    try:
        buf.mm.close()
    except BufferError:
        pass  # a numpy view not yet collected; the mapping goes with it


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
