"""The worker's command loop on hostile command streams, in process: whatever a client
sends, a frame either runs (every answer a well-formed OK or ``[REPLY_ERROR, type,
message]``) or fails as a protocol error the loop turns into a closing reason; the
ledger stays within the quota and equal to what the table holds."""

from __future__ import annotations

import socket
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol import messages as m
from orion_vgpu.server import worker

LIMIT = 1 << 20
# What serve() turns into "protocol error: malformed frame" (the session then closes).
PROTOCOL_ERRORS = (msgpack.UnpackException, ValueError, TypeError)
OP_NAMES = ["aten::empty.memory_format", "aten::add.Tensor", "aten::ones.default",
            "aten::resize_.default", "aten::cat.default", "aten::nonzero.default",
            "aten::expand.default", "aten::from_file.default", "os::system", "torch::load",
            "aten::_reshape_alias.default", "prims::__class__", "aten::set_.source_Tensor",
            "aten::add.out", 42, None]


class H:
    def __init__(self, h: int) -> None:
        self.h = h


def _default(obj: Any) -> Any:
    return codec.handle_ext(obj.h) if isinstance(obj, H) else codec.encode_default(obj)


handles = st.one_of(st.integers(-2, 6), st.just(2**63 - 1))
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=8), handles.map(H), st.sampled_from(codec.DTYPES),
              st.binary(max_size=8)),
    lambda kids: st.lists(kids, max_size=4), max_leaves=12)
sizes = st.lists(st.one_of(st.integers(-2, 64), st.integers(2**20, 2**50)), max_size=3)

commands = st.one_of(
    st.tuples(st.just(m.CMD_DEF), st.integers(0, 5), st.sampled_from(OP_NAMES)),
    st.tuples(st.just(m.CMD_OP), st.integers(0, 6),
              st.one_of(st.lists(st.one_of(handles.map(H), sizes, values), max_size=3), values),
              st.one_of(st.dictionaries(st.sampled_from(["out", "dtype", "device", "x"]), values,
                                        max_size=2), values),
              st.one_of(st.lists(handles, max_size=3), values)),
    st.tuples(st.just(m.CMD_CALL), st.integers(0, 6), st.lists(handles.map(H), max_size=2),
              st.just({}), st.lists(handles, max_size=2)),
    st.tuples(st.just(m.CMD_UPLOAD), handles, st.integers(-1, 14), st.one_of(sizes, values),
              st.one_of(st.integers(-1, 2**40), values), st.one_of(st.none(), st.integers(-1, 2**40))),
    st.tuples(st.just(m.CMD_FETCH), st.one_of(handles, values), st.none()),
    st.tuples(st.just(m.CMD_FREE), st.one_of(st.lists(handles, max_size=4), values)),
    st.tuples(st.just(m.CMD_COPY), handles, handles),
    st.tuples(st.just(m.CMD_SEED), st.one_of(st.integers(-(2**63), 2**64 - 1), values)),
    st.tuples(st.just(m.CMD_SEED), st.integers(0, 2**64 - 1), st.one_of(handles, values)),
    st.tuples(st.just(m.CMD_RNG_SET), st.integers(-(2**40), 2**40)),
    st.tuples(st.sampled_from([m.CMD_STATS, m.CMD_SYNC, m.CMD_RNG_GET])),
    st.tuples(st.just(m.CMD_RNG_GET), st.one_of(handles, values)),
    st.tuples(st.just(m.CMD_SETTINGS), st.one_of(
        values, st.dictionaries(st.sampled_from(["default_dtype", "deterministic",
                                                 "cudnn.benchmark", "x"]), values,
                                max_size=2))),
    st.tuples(st.integers(-3, 20), values),
    values,  # not even a command
)


def _drain(sock: socket.socket, replies: list[Any], bad: list[str]) -> None:
    try:
        while True:
            body, n = frames.recv_frame(sock)
            frames.discard(sock, n)
            reply = msgpack.unpackb(bytes(body), raw=False, ext_hook=codec.client_ext_hook)
            replies.append(reply)
            ok = isinstance(reply, list) and reply and reply[0] in (m.REPLY_OK, m.REPLY_ERROR)
            if ok and reply[0] == m.REPLY_ERROR:
                ok = len(reply) == 3 and all(isinstance(x, str) for x in reply[1:]) and reply[2]
            if not ok:
                bad.append(repr(reply)[:200])
    except (frames.FrameError, OSError):
        pass


@pytest.fixture(autouse=True)
def _no_throttle_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "make_throttle", lambda spec: None)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(commands, max_size=8), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(1, 40)))
def test_any_command_stream_is_answered_or_refused(batches: list[list[Any]],
                                                   cut: int | None) -> None:
    mine, client = socket.socketpair()
    spec = {"device": "cpu", "gmem_bytes": LIMIT, "session_id": "f" * 32}
    session = worker.Session(spec, mine, control=None)  # type: ignore[arg-type]
    replies: list[Any] = []
    bad: list[str] = []
    reader = threading.Thread(target=_drain, args=(client, replies, bad), daemon=True)
    reader.start()
    try:
        for i, batch in enumerate(batches):
            body = b"".join(msgpack.packb(list(c) if isinstance(c, tuple) else c,
                                          default=_default) for c in batch)
            if cut is not None and i == len(batches) - 1:
                body = body[:-cut] if cut < len(body) else body
            try:
                if session._run_frame(bytearray(body)):
                    break
            except PROTOCOL_ERRORS:
                break  # the session would close here with "protocol error: ..."
            led = session.ex.ledger
            assert led.used <= LIMIT
            assert led.used == led.recount()
    finally:
        mine.close()
        reader.join(5)
        client.close()
    assert not bad, bad
