"""Shared-memory arena between a client and its session worker.

Layout of the mapped file (``/dev/shm/orion-*`` made by the client, or an ``orionsock<N>``
file made by ``orion shm`` for containers that mount only that file):

    [0, 64)     nonce written by the client; the server proves it sees the same memory
    [64, 72)    upload ring: bytes consumed so far (u64, written by the server)
    [4096, 4096 + ring)        upload ring (client -> server), monotonic positions
    [4096 + ring, size)        download area (server -> client), one reply at a time
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time

import torch

HEADER_SIZE = 4096
_U64 = struct.Struct("<Q")
_CONSUMED = 64
NAME_RE = re.compile(r"^(orion-[0-9a-f]{8,64}|orionsock[0-9]{1,4})$")


class ShmError(Exception):
    """The arena cannot be used (bad name, wrong nonce, too small)."""


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
        pos, need = self.place(nbytes)
        deadline = None
        while self.consumed() < need:
            deadline = deadline or time.monotonic() + timeout
            if time.monotonic() > deadline:
                raise ShmError("shared-memory ring stayed full: server not consuming")
            time.sleep(0.0001)
        self.produced = pos + nbytes
        return pos

    def ring_region(self, pos: int, nbytes: int) -> torch.Tensor:
        off = HEADER_SIZE + pos % self.ring_size
        return self.region(off, nbytes)
