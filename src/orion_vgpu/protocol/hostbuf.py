"""Layout of a host buffer file, shared by the client's pool (client.hostpool, which says why
they exist) and the worker (server.hostbuffers).

    [0, 64)       the session's arena nonce: the worker maps only its own session's buffers
    [64, 72)      state (u64): LENT while the worker holds an upload in the buffer, else FREE
    [4096, ...)   data
"""

from __future__ import annotations

import hashlib
import struct

HEADER = 4096
NONCE_LEN = 64
STATE_AT = 64
FREE, LENT = 0, 1
U64 = struct.Struct("<Q")


def nonce_bytes(nonce: str) -> bytes:
    return nonce.encode()[:NONCE_LEN].ljust(NONCE_LEN, b"\0")


def file_prefix(nonce: str) -> str:
    """``orion-<tag>``: the start of every buffer file of the session with ``nonce`` (the
    worker removes the ones left at the session's end; others cannot guess the tag)."""
    return "orion-" + hashlib.sha256(b"orion-host-buffer:" + nonce.encode()).hexdigest()[:16]
