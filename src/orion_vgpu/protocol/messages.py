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
CMD_FREE = 2     # [2, [handles]]  (tensor handles and generator ids)
CMD_UPLOAD = 3   # [3, handle, dtype, shape, nbytes, shm_offset | None(, chunk: streamed)]
CMD_FETCH = 4    # [4, handle, dtype | None(, may_stream(, host_buffer))]  -> [OK, dtype, shape, nbytes, shm_offset | None | IN_HOST_BUFFER(, chunk)] + payload
CMD_CALL = 5     # [5, op_id, args, kwargs, out_handles] -> [OK, values, out_meta]
CMD_SYNC = 6     # [6] -> [OK]
CMD_SEED = 7     # [7, seed(, generator_id)]  (without an id: the vGPU's default generator)
CMD_STATS = 8    # [8] -> [OK, {stats}]
CMD_BYE = 9      # [9]
CMD_RNG_GET = 10  # [10(, generator_id)] -> [OK] + payload (generator state bytes)
CMD_RNG_SET = 11  # [11, nbytes(, generator_id)] + payload
CMD_COPY = 12    # [12, dst_handle, src_handle] server-side copy between this session's tensors
# [13, op_id, args, kwargs, first_handle] -> [OK, kind, items]: run an op the client has no
# output description for yet; the server describes its outputs (new tensors get handles
# first_handle, first_handle + 1, ...; aliases and views of inputs are named by input index).
CMD_PROBE = 13
# A probe's "new" item may end with flags: a lazy conjugate / negative view (conj(), .mH).
VIEW_CONJ = 1
VIEW_NEG = 2
# Server-to-server copy between two vGPUs of one client (docs/data-plane.md, "Peer copies").
# [14, handle, transfer_id (16 bytes), seq]: offer the tensor as it is at this point of the
# stream to the one peer that proves it knows transfer_id.
CMD_PEER_SEND = 14
# [15, new_handle, transfer_id, seq, ["unix", name] | ["tcp", host, port], dtype, shape]:
# pull the transfer from the source session's peer endpoint into a new contiguous tensor.
CMD_PEER_RECV = 15
# torch.distributed between the workers holding the tensors (docs/data-plane.md, "Distributed
# training (DDP)"). [16, pg_id, {"step": "listen", "timeout_s"}] -> [OK, {"port"}] (rank 0's
# worker hosts the group's store); [16, pg_id, {"step": "join", "host", "port", "prefix",
# "rank", "size", "timeout_s", "name"}] -> [OK, {}] once every rank's worker has joined.
CMD_PG_INIT = 16
# [17, pg_id, kind, {args}]: one collective on this session's tensors, in place, in stream
# order (kinds in orion_vgpu.server.collectives; "destroy" drops the group).
CMD_COLLECTIVE = 17
# Graphs the session keeps (docs/data-plane.md, "Graphs and torch.compile"; server/graphs.py).
# [18, graph_id, "stream", bytes]: a CUDA-graph capture (recorded commands); handles it creates
# are bound to fresh tensors now, as a capture allocates its memory. [18, graph_id, "fx",
# bytes]: a torch.compile graph (msgpack map; inside it, handle ext values name graph values).
# [18, graph_id, nil, nil] drops the graph. Errors are reported at the next sync point.
CMD_GRAPH_DEF = 18
# [19, graph_id, input_handles, out_handles]: run a kept graph (a stream takes no inputs).
CMD_GRAPH_RUN = 19
# [20, {name: value}]: process-wide torch settings of the program for the ops after it
# (default dtype, deterministic algorithms, matmul precision, cuDNN/cuBLAS flags; the names
# in protocol/settings.py), only those that changed.
CMD_SETTINGS = 20

ANSWERED = frozenset({CMD_FETCH, CMD_CALL, CMD_SYNC, CMD_STATS, CMD_RNG_GET, CMD_PROBE,
                      CMD_PG_INIT})

# host_buffer of a fetch: [file name in the shm directory, its size, [names the worker may
# unmap]]; the reply's offset is IN_HOST_BUFFER when the bytes were written there.
IN_HOST_BUFFER = -1
MAX_HOST_BUFFERS = 256  # mapped per session

REPLY_OK = 0
REPLY_ERROR = 1
# session_ended reason of a session its client closed (CMD_BYE): the program is ending.
REASON_CLIENT_CLOSED = "client closed the session"
# Error kind of a reply that ends the session (its allocation is over); the client stops.
ERR_SESSION_ENDED = "SessionEnded"
