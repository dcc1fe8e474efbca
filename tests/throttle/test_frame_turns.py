"""A frame's run of ops takes one turn of the compute share (Executor.begin_batch): one
before_op / after_op pair for them all, cut at a command that is not an op (frees aside)
and after executor.BATCH_MAX_S of busy time."""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest
import torch

from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol import messages as m
from orion_vgpu.server import executor, worker

H = codec.handle_ext


class Recorder:
    """Stands for the throttle: records the turns the session takes."""

    def __init__(self) -> None:
        self.turns: list[int] = []
        self.open = False

    def before_op(self) -> None:
        assert not self.open, "a turn began inside another"
        self.open = True

    def after_op(self, spent: float, ops: int = 1) -> None:
        assert self.open and spent >= 0
        self.open = False
        self.turns.append(ops)

    def close(self) -> None:
        pass


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    rec = Recorder()
    monkeypatch.setattr(worker, "make_throttle", lambda spec: rec)
    mine, client = socket.socketpair()
    spec = {"device": "cpu", "gmem_bytes": 1 << 24, "session_id": "f" * 32}
    s = worker.Session(spec, mine, control=None)  # type: ignore[arg-type]
    replies: list = []

    def drain() -> None:
        try:
            while True:
                body, n = frames.recv_frame(client)
                frames.discard(client, n)
                replies.append(msgpack.unpackb(bytes(body), raw=False))
        except (frames.FrameError, OSError):
            pass

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    s.ex.define(1, "aten::add_.Tensor")
    s.ex.store(1, torch.zeros(4))
    s.ex.store(2, torch.ones(4))
    yield s, rec, replies
    mine.close()
    t.join(5)
    client.close()


def _frame(*cmds: list) -> bytearray:
    return bytearray(b"".join(msgpack.packb(c, default=codec.encode_default) for c in cmds))


ADD = [m.CMD_OP, 1, [H(1), H(2)], {}, []]


def test_a_frame_of_ops_is_one_turn(session) -> None:  # noqa: ANN001
    s, rec, _ = session
    s._run_frame(_frame(*[ADD] * 10))
    assert rec.turns == [10]
    assert torch.equal(s.ex.tensors[1], torch.full((4,), 10.0))
    assert s.ex.throttle is rec  # given back after the batch


def test_a_command_that_is_not_an_op_ends_the_turn(session) -> None:  # noqa: ANN001
    s, rec, replies = session
    s._run_frame(_frame(ADD, ADD, ADD, [m.CMD_SYNC], ADD, ADD))
    assert rec.turns == [3, 2]
    assert not rec.open


def test_frees_between_ops_stay_in_the_turn(session) -> None:  # noqa: ANN001
    s, rec, _ = session
    s.ex.store(3, torch.ones(4))
    used = s.ex.ledger.used
    s._run_frame(_frame(ADD, [m.CMD_FREE, [3]], ADD, [m.CMD_FREE, [3, 77]], ADD))
    assert rec.turns == [3] and not rec.open
    assert 3 not in s.ex.tensors and s.ex.ledger.used == used - 16
    assert torch.equal(s.ex.tensors[1], torch.full((4,), 3.0))
    assert s.pending is None  # freeing a handle twice, or one never held, is no error


def test_a_malformed_free_is_the_clients_error_and_ends_no_turn_early(session) -> None:  # noqa: ANN001
    s, rec, _ = session
    s._run_frame(_frame(ADD, [m.CMD_FREE, 5], ADD))
    assert rec.turns == [2] and not rec.open
    assert s.pending is not None and "free expects a list" in str(s.pending)


def test_a_failing_op_does_not_leave_a_turn_open(session) -> None:  # noqa: ANN001
    s, rec, _ = session
    bad = [m.CMD_OP, 1, [H(1), H(99)], {}, []]
    s._run_frame(_frame(ADD, bad, ADD))
    assert rec.turns == [2] and not rec.open  # the refused op ran no kernel: not metered
    assert s.pending is not None  # reported with the next answer, as before


def test_a_long_run_is_cut_into_short_turns(session, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    s, rec, _ = session
    monkeypatch.setattr(executor, "BATCH_MAX_S", 0.0)
    s._run_frame(_frame(*[ADD] * 4))
    assert rec.turns == [1, 1, 1, 1]
