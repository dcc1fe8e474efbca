"""Bad input to a real session worker: every case gets a clear error to that client, the
session (and its neighbour on the same server) keeps serving, and the worker's memory
stays bounded. Unparseable streams close that one session with a reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from security_support import (
    H,
    RawClient,
    closed_with_reason,
    error_of,
    open_client,
    pack,
    peak_rss_bytes,
    rss_bytes,
)
from sessions_support import Server

from orion_vgpu.protocol import frames
from orion_vgpu.protocol import messages as m

GMEM_MIB = 64
TIB = 1 << 40

# (what the client sends, error type, a piece of the message). Each is followed by a
# sync; the session must answer with exactly that error and keep serving.
DEFINE_CASES: list[tuple[Any, str, str]] = [
    ("os::system", "RuntimeError", "not allowed on a vGPU (only aten, prims"),
    ("torch::load", "RuntimeError", "not allowed"),
    ("builtins::eval", "RuntimeError", "not allowed"),
    ("_C::_jit_get_operation", "RuntimeError", "not allowed"),
    ("aten::from_file", "RuntimeError", "not allowed"),
    ("aten::from_file.default", "RuntimeError", "not allowed"),   # was accepted: by-name only
    ("aten::_reshape_alias.default", "RuntimeError", "not allowed"),  # view past storage
    ("aten::_segment_reduce_backward.default", "RuntimeError", "not allowed"),
    ("aten::set_.source_Storage", "RuntimeError", "not allowed"),
    ("aten::_print.default", "RuntimeError", "not allowed"),
    ("prims::__class__", "RuntimeError", "unknown operator"),
    ("aten::__getattr__.x", "RuntimeError", "unknown operator"),
    ("aten::__dict__", "RuntimeError", "unknown operator"),
    ("aten::__lshift__.__class__", "RuntimeError", "unknown operator"),  # a real dunder op
    ("aten::no_such_op.default", "RuntimeError", "unknown operator"),
    ("", "RuntimeError", "not allowed"),
    (42, "RuntimeError", "not allowed"),
    (["aten::add.Tensor"], "RuntimeError", "not allowed"),
]


def _op_cases() -> list[tuple[str, list, dict, str, str]]:
    """(op, args, kwargs, error type, message piece)."""
    return [
        ("aten::empty.memory_format", [[TIB]], {}, "OutOfMemoryError", "Tried to allocate"),
        ("aten::empty.memory_format", [[2**62, 2**62]], {}, "OutOfMemoryError", "out of memory"),
        ("aten::zeros.default", [[1 << 33]], {}, "OutOfMemoryError", "ORION_GMEM quota"),
        ("aten::full.default", [[1 << 33], 1.5], {}, "OutOfMemoryError", "out of memory"),
        ("aten::empty_strided.default", [[2], [TIB]], {}, "OutOfMemoryError", "out of memory"),
        ("aten::arange.default", [2**50], {}, "OutOfMemoryError", "out of memory"),
        ("aten::randperm.default", [2**40], {}, "OutOfMemoryError", "out of memory"),
        ("aten::eye.default", [2**30], {}, "OutOfMemoryError", "out of memory"),
        ("aten::empty.memory_format", [[-1]], {}, "RuntimeError", "negative dimension"),
        ("aten::empty.memory_format", [[2]], {"device": "meta"}, "RuntimeError",
         "device argument 'meta' is not allowed"),
        ("aten::empty.memory_format", [[2]], {"device": 1}, "RuntimeError",
         "device argument 1 is not allowed"),
        ("aten::empty.memory_format", [["x"]], {}, "RuntimeError", ""),
        ("aten::add.Tensor", ["a", "b"], {}, "RuntimeError", ""),
        ("aten::add.Tensor", [H(12345), H(12346)], {}, "RuntimeError",
         "tensor handle 12345 is not held by this session"),
        ("aten::cat.default", [[H(1), H(777)]], {}, "RuntimeError", "tensor handle 777"),
        ("aten::_to_sparse.default", [H(1)], {}, "RuntimeError", "layout torch.sparse_coo"),
        ("aten::segment_reduce.default", [H(1), "sum"], {"lengths": H(1), "unsafe": True},
         "RuntimeError", "unsafe=True is not allowed"),
        # 1 element expanded to 2**40: a view is free, its materialisation is not.
        ("aten::contiguous.default", [H(2)], {}, "OutOfMemoryError", "out of memory"),
        ("aten::mul.Tensor", [H(3), H(4)], {}, "OutOfMemoryError", "out of memory"),
        ("aten::repeat.default", [H(1), [2**20, 2**20]], {}, "OutOfMemoryError", "out of memory"),
    ]


def _raw_cases() -> list[tuple[list[Any], bytes, str, str]]:
    """(commands, payload, error type, message piece) for non-op commands."""
    return [
        ([[m.CMD_OP, 999, [], {}, [50]]], b"", "RuntimeError", "operator id 999 was never defined"),
        ([[m.CMD_UPLOAD, 60, 0, [TIB], 4 * TIB, None]], b"", "ProtocolError",
         "larger than the frame's payload"),
        ([[m.CMD_UPLOAD, 60, 0, [-1], 4, None]], b"xxxx", "ValueError", "invalid upload shape"),
        ([[m.CMD_UPLOAD, 60, 0, [2], 4, None]], b"xxxx", "ValueError", "does not match"),
        ([[m.CMD_UPLOAD, 60, 0, [1], 4, 0]], b"", "ProtocolError", "no shared memory"),
        ([[m.CMD_UPLOAD, 60, 99, [1], 4, None]], b"xxxx", "CodecError", "unknown dtype code 99"),
        ([[m.CMD_UPLOAD, 60, 0, "shape", 4, None]], b"xxxx", "ProtocolError", "shape array"),
        ([[m.CMD_COPY, 12345, 1]], b"", "RuntimeError", "12345 is not held"),
        ([[m.CMD_SEED, "abc"]], b"", "ValueError", "invalid literal"),
        ([[m.CMD_RNG_SET, TIB]], b"", "ProtocolError", "does not match the frame's payload"),
        ([[m.CMD_FREE, 7]], b"", "ProtocolError", "list of handles"),
        ([[m.CMD_SEED, 1, "g"]], b"", "ProtocolError", "generator id 'g' is not an integer"),
        ([[m.CMD_SEED, 1, -5]], b"", "ProtocolError", "generator id -5 is negative"),
        ([[m.CMD_SETTINGS, {"default_dtype": torch.int64}]], b"", "ProtocolError",
         "setting default_dtype cannot be torch.int64"),
        ([[m.CMD_SETTINGS, {"os.system": "id"}]], b"", "ProtocolError", "unknown setting"),
        ([[m.CMD_SETTINGS]], b"", "ProtocolError", "map of names to values"),
        ([[99, 1, 2]], b"", "ProtocolError", "unknown command kind 99"),
        ([[m.CMD_DEF, [1], "aten::add.Tensor"]], b"", "ProtocolError", "is not an integer"),
        ([[m.CMD_OP, 1, "args", {}, []]], b"", "ProtocolError", "args (array)"),
        ([[m.CMD_DEF, 5, "aten::add.Tensor"], [m.CMD_OP, 5, [H(1), H(1)], {}, ["h"]]], b"",
         "ProtocolError", "not all integers"),
    ]


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


def _expect(reply: list[Any], kind: str, piece: str, what: Any) -> None:
    assert reply[0] == m.REPLY_ERROR, (what, reply)
    got_kind, message = error_of(reply)
    assert got_kind == kind and piece in message and message.strip(), (what, reply)


def _setup_tensors(b: RawClient) -> None:
    """Handles the op cases refer to: 1 (a float), 2 (1 element expanded to 2**40),
    3 and 4 (column and row of 2**17: their product is 64 GiB)."""
    assert b.upload(1, torch.ones(1)) == [m.REPLY_OK]
    assert b.op("aten::expand.default", [H(1), [TIB]], outs=[2]) == [m.REPLY_OK]
    assert b.op("aten::ones.default", [[1 << 17, 1]], outs=[3]) == [m.REPLY_OK]
    assert b.op("aten::ones.default", [[1, 1 << 17]], outs=[4]) == [m.REPLY_OK]


def test_bad_commands_get_clear_errors_and_nothing_stops(
        start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    neighbour = open_client(server)
    b = open_client(server, gmem_mib=GMEM_MIB, vgpu=1)
    rss0 = rss_bytes(b.worker_pid)
    _setup_tensors(b)
    for name, kind, piece in DEFINE_CASES:
        b.send([m.CMD_DEF, 77, name])
        _expect(b.sync(), kind, piece, name)
    for name, args, kwargs, kind, piece in _op_cases():
        t0 = time.monotonic()
        _expect(b.op(name, args, kwargs, outs=[50]), kind, piece, name)
        assert time.monotonic() - t0 < 5, f"{name} took {time.monotonic() - t0:.1f} s to fail"
    for cmds, payload, kind, piece in _raw_cases():
        b.send(*cmds, payload=payload)
        _expect(b.sync(), kind, piece, cmds)
    # Deep nesting: a clear error, not a crash of the worker's stack.
    _expect(b.op("aten::add.Tensor", [_deep(400), 1]), "RuntimeError", "", "deep")
    # An expanded view is not fetched by materialising 4 TiB.
    _expect(b.fetch(2), "OutOfMemoryError", "cannot fetch", "fetch expanded")
    _expect(b.fetch(424242), "RuntimeError", "424242 is not held", "fetch missing")
    assert b.ask([m.CMD_FREE, [12345, -1, "x"]], [m.CMD_SYNC]) == [m.REPLY_OK]

    assert b.alive() and neighbour.alive()
    stats = b.stats()
    assert stats["allocated"] <= stats["limit"] == GMEM_MIB << 20
    assert not [e for e in server.events.items if e["type"] == "session_ended"]
    # Nothing above made the worker allocate (and touch) what the client asked for.
    grew = peak_rss_bytes(b.worker_pid) - rss0
    assert grew < 2 * (GMEM_MIB << 20) + (128 << 20), f"worker peak RSS grew {grew >> 20} MiB"
    b.close()
    neighbour.close()


def _truncated_command() -> bytes:
    whole = msgpack.packb([m.CMD_OP, 1, [1, 2, 3], {}, [4]])
    return frames.HEADER.pack(len(whole) - 3, 0) + whole[:-3]


def _frame(body: bytes, payload_len: int = 0) -> bytes:
    return frames.HEADER.pack(len(body), payload_len) + body


# (raw bytes, a piece of the ProtocolError message). The session ends with that reason.
UNPARSEABLE: dict[str, tuple[bytes, str]] = {
    "reserved msgpack byte": (_frame(b"\xc1"), "malformed frame"),
    "command is not an array": (_frame(msgpack.packb(5)), "command is not a non-empty array"),
    "empty command": (_frame(msgpack.packb([])), "command is not a non-empty array"),
    "truncated command": (_truncated_command(), "truncated"),
    "malformed handle ext": (_frame(pack([m.CMD_FREE, [msgpack.ExtType(1, b"abc")]])),
                             "malformed ext value"),
    "body over the limit": (frames.HEADER.pack(frames.MAX_BODY + 1, 0), "exceeds"),
    "payload over the limit": (frames.HEADER.pack(0, frames.MAX_PAYLOAD + 1), "exceeds"),
    "nesting too deep": (_frame(b"\x91" * 5000 + b"\xc0"), "malformed frame"),
}


def test_unparseable_streams_close_only_that_session(
        start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    neighbour = open_client(server)
    for i, (case, (data, piece)) in enumerate(UNPARSEABLE.items()):
        b = open_client(server, vgpu=1 + i)
        b.sock.sendall(data)
        b.sock.settimeout(10)
        reason = closed_with_reason(b)
        assert reason is not None and reason[0] == "ProtocolError" and piece in reason[1], (
            case, reason)
        alloc = [e for e in server.events.items
                 if e["type"] == "session_started"][-1]["allocation_id"]
        ended = server.events.ended(alloc)
        assert ended["reason"].startswith("protocol error"), (case, ended)
        b.close()
        assert neighbour.alive(), case
    neighbour.close()


def test_data_dependent_outputs_count_against_the_quota(
        start_server: Callable[..., Server]) -> None:
    """nonzero's output (8 bytes per index) is known only after it runs: CMD_CALL outputs
    used to be stored without a quota check, so 10 MiB of bools became 80 MiB held."""
    server = start_server(warm_workers=1)
    b = open_client(server, gmem_mib=16)
    assert b.op("aten::ones.default", [[10 << 20]], {"dtype": torch.bool}, outs=[1]) == [
        m.REPLY_OK]
    _expect(b.call("aten::nonzero.default", [H(1)], [2]), "OutOfMemoryError", "out of memory",
            "nonzero")
    stats = b.stats()
    assert stats["allocated"] == 10 << 20 <= stats["limit"]
    _expect(b.fetch(2), "RuntimeError", "not held", "dropped output")
    assert b.alive()
    b.close()
