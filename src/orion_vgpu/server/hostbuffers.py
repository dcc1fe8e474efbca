"""The client's host buffers a session's worker reads uploads from and writes downloads into
(client.hostpool has the layout and why).

A buffer is mapped the first time a command names it, only if its header holds the
session's arena nonce, and its file is unlinked then (both sides have it mapped). The
mapping is kept for the next command naming the buffer until the client says it dropped
the buffer, or the session ends; then ``sweep`` removes the session's files never named
(the client died while filling one).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref

import numpy as np
import torch

from orion_vgpu.protocol import messages as m
from orion_vgpu.protocol.hostbuf import (
    FREE,
    HEADER,
    NONCE_LEN,
    STATE_AT,
    U64,
    file_prefix,
    nonce_bytes,
)
from orion_vgpu.protocol.shm import ShmError, shm_dir, validate_path
from orion_vgpu.server.executor import SessionError


class HostBuffers:
    def __init__(self, nonce: str) -> None:
        self.nonce = nonce_bytes(nonce)
        self.prefix = file_prefix(nonce)
        self.maps: dict[str, mmap.mmap] = {}

    def get(self, dest: object) -> mmap.mmap:
        """The mapping of the buffer a command names (``[name, size, [dropped names]]``)."""
        if not (isinstance(dest, list) and len(dest) == 3 and isinstance(dest[0], str)
                and type(dest[1]) is int and isinstance(dest[2], list)):
            raise SessionError("ProtocolError", "a host buffer must be named as "
                               "[name, size, [dropped names]]")
        name, size, dropped = dest
        for old in dropped:
            if isinstance(old, str):
                self.maps.pop(old, None)  # unmapped when no tensor uses it any more
        found = self.maps.get(name)
        if found is not None and len(found) == HEADER + size:
            return found
        if len(self.maps) >= m.MAX_HOST_BUFFERS:
            raise SessionError("ProtocolError", f"more than {m.MAX_HOST_BUFFERS} host buffers "
                               "mapped; drop some before naming new ones")
        mm = self._map(name, size)
        self.maps[name] = mm
        return mm

    def _map(self, name: str, size: int) -> mmap.mmap:
        try:
            path = validate_path(os.path.join(shm_dir(), name))
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except (ShmError, OSError) as exc:
            raise SessionError("ProtocolError", f"host buffer {name!r} unusable: {exc}") from None
        try:
            if size <= 0 or os.fstat(fd).st_size != HEADER + size:
                raise SessionError("ProtocolError", f"host buffer {name} is not {size} bytes")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, HEADER + size, flags=flags)
        finally:
            os.close(fd)
        if mm[0:NONCE_LEN] != self.nonce:
            mm.close()
            raise SessionError("ProtocolError", f"host buffer {name} is not this session's")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return mm

    def sweep(self) -> int:
        """At the session's end: unlink this session's buffer files (its name tag, and its
        nonce or an empty header: a program killed right after creating the file)."""
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(shm_dir()):
                if name.startswith(self.prefix) and self._ours(os.path.join(shm_dir(), name)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(shm_dir(), name))
                        removed += 1
        return removed

    def _ours(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            head = os.pread(fd, NONCE_LEN, 0)
        finally:
            os.close(fd)
        # Only this session's client can make names with its tag (derived from its secret).
        return head == self.nonce or head.strip(b"\0") == b""

    @staticmethod
    def capacity(mm: mmap.mmap) -> int:
        """Bytes of data the buffer holds."""
        return len(mm) - HEADER

    @staticmethod
    def data(mm: mmap.mmap, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of a buffer's data, as bytes."""
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=HEADER)

    @staticmethod
    def adopt(mm: mmap.mmap, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """An upload's tensor on the buffer itself (an emulated GPU's memory is host memory);
        the buffer is marked free for the client when the tensor and its views are gone."""
        arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=HEADER)
        weakref.finalize(arr, release, mm).atexit = False
        return torch.from_numpy(arr).view(dtype).view(shape)


def release(mm: mmap.mmap) -> None:
    """The worker is done with the upload in this buffer: the client may reuse it."""
    if not mm.closed:
        U64.pack_into(mm, STATE_AT, FREE)
