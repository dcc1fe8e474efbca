"""Command and reply kinds of the data-plane protocol (see docs/data-plane.md).

A client frame body is a concatenation of msgpack arrays, each a command whose first item
is one of the ``CMD_*`` kinds. Commands run in order. A command that asks for an answer
(``CMD_FETCH``, ``CMD_CALL``, ``CMD_SYNC``, ``CMD_STATS``) ends its frame and the server
replies with one frame whose body is ``[REPLY_OK, ...]`` or ``[REPLY_ERROR, type, message]``.
"""

from __future__ import annotations

# Handshake (first frame each way).
HELLO = "orion-hello"
WELCOME = "orion-welcome"
REFUSED = "orion-refused"

CMD_DEF = 0      # [0, op_id, "aten::name.overload"]
CMD_OP = 1       # [1, op_id, args, kwargs, out_handles]
CMD_FREE = 2     # [2, [handles]]
CMD_UPLOAD = 3   # [3, handle, dtype, shape, nbytes, shm_offset | None]
CMD_FETCH = 4    # [4, handle, dtype | None]  -> [OK, dtype, shape, nbytes, shm_offset | None] + payload
CMD_CALL = 5     # [5, op_id, args, kwargs, out_handles] -> [OK, values, out_meta]
CMD_SYNC = 6     # [6] -> [OK]
CMD_SEED = 7     # [7, seed]
CMD_STATS = 8    # [8] -> [OK, {stats}]
CMD_BYE = 9      # [9]
CMD_RNG_GET = 10  # [10] -> [OK] + payload (generator state bytes)
CMD_RNG_SET = 11  # [11, nbytes] + payload
CMD_COPY = 12    # [12, dst_handle, src_handle] server-side copy between this session's tensors
# [13, op_id, args, kwargs, first_handle] -> [OK, kind, items]: run an op the client has no
# output description for yet; the server describes its outputs (new tensors get handles
# first_handle, first_handle + 1, ...; aliases and views of inputs are named by input index).
CMD_PROBE = 13

ANSWERED = frozenset({CMD_FETCH, CMD_CALL, CMD_SYNC, CMD_STATS, CMD_RNG_GET, CMD_PROBE})

REPLY_OK = 0
REPLY_ERROR = 1
