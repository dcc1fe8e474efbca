"""The executor's per-op path: handles decoded as commands arrive, outputs bound, and the
memory ledger kept exact through in-place ops that swap or grow storages."""

from __future__ import annotations

import msgpack
import pytest
import torch

from orion_vgpu.protocol import codec
from orion_vgpu.server.executor import Executor, SessionError
from orion_vgpu.server.replay import Plan

H = codec.handle_ext


def _session(held: bool = True) -> tuple[Executor, msgpack.Unpacker]:
    """The worker's decoder looks handles up in the executor's table first (``held``)."""
    ex = Executor(torch.device("cpu"), 1 << 24)
    hook = codec.make_ext_hook(ex.resolve, ex.device, resolve_view=ex.resolve_view,
                               held=ex.tensors if held else None)
    unpacker = msgpack.Unpacker(ext_hook=hook, raw=False, strict_map_key=False)
    for oid, name in enumerate(("aten::add.Tensor", "aten::add_.Tensor", "aten::cat.default",
                                "aten::set_.source_Tensor", "aten::resize_.default",
                                "aten::add.out"), start=1):
        ex.define(oid, name)
    ex.store(1, torch.ones(4))
    ex.store(2, torch.ones(16))
    return ex, unpacker


def _run(ex: Executor, unpacker: msgpack.Unpacker, cmd: list) -> None:
    """Decode ``cmd`` as the worker does (handles resolve while it is read), then run it."""
    unpacker.feed(msgpack.packb(cmd, default=codec.encode_default))
    _kind, op_id, args, kwargs, outs = next(unpacker)
    ex.run(op_id, args, kwargs, outs)


def _exact(ex: Executor) -> None:
    assert ex.ledger.used == ex.ledger.recount()
    assert ex.ledger.peak >= ex.ledger.used


@pytest.mark.parametrize("held", [True, False])
def test_a_missing_handle_is_named_whatever_came_before(held: bool) -> None:
    ex, unpacker = _session(held)
    with pytest.raises(SessionError, match="tensor handle 99 is not held"):
        _run(ex, unpacker, [1, 1, [H(1), H(99)], {}, [10]])
    _run(ex, unpacker, [1, 1, [H(1), H(1)], {}, [10]])  # the next op runs
    assert torch.equal(ex.tensors[10], torch.full((4,), 2.0))
    # A handle missing from something that never ran as an op leaves no trace on the next
    unpacker.feed(msgpack.packb([2, [H(77)]], default=codec.encode_default))
    next(unpacker)
    _run(ex, unpacker, [1, 1, [H(10), H(1)], {}, [11]])
    with pytest.raises(SessionError, match="tensor handle 98 is not held"):
        _run(ex, unpacker, [1, 3, [[H(1), H(98)]], {}, [12]])  # inside a tensor list
    assert 12 not in ex.tensors
    _exact(ex)


def test_outputs_and_inplace_writes_keep_the_ledger_exact() -> None:
    ex, unpacker = _session()
    _run(ex, unpacker, [1, 2, [H(1), 1.0], {}, [0]])            # add_: an alias, no handle
    _run(ex, unpacker, [1, 1, [H(1), H(1)], {}, [20]])          # add: one new tensor
    _run(ex, unpacker, [1, 6, [H(1), H(1)], {"out": H(20)}, [0]])  # out=: written in place
    assert torch.equal(ex.tensors[20], torch.full((4,), 4.0))
    _exact(ex)
    before = ex.ledger.used
    _run(ex, unpacker, [1, 4, [H(1), H(2)], {}, [0]])   # set_: 1 now shares 2's storage
    assert ex.ledger.used == before - 16  # 1's old 4 floats are gone, 2's are counted once
    _exact(ex)
    _run(ex, unpacker, [1, 5, [H(2), [64]], {}, [0]])   # resize_: the shared storage grows
    assert ex.ledger.used == before - 16 + 48 * 4
    _exact(ex)
    ex.free([1, 2, 20])
    assert ex.ledger.used == 0 and ex.ledger.recount() == 0


def test_an_op_past_the_quota_leaves_nothing_behind() -> None:
    ex, unpacker = _session()
    ex.store(3, torch.ones(3 << 20))  # 12 MiB of the 16
    with pytest.raises(SessionError, match="out of memory"):
        _run(ex, unpacker, [1, 1, [H(3), H(3)], {}, [30]])
    assert 30 not in ex.tensors
    _exact(ex)


@pytest.mark.parametrize(("setting", "small_threads"), [(None, 1), ("0", 2)])
def test_an_emulated_gpu_runs_small_ops_on_one_thread(
        monkeypatch: pytest.MonkeyPatch, setting: str | None, small_threads: int) -> None:
    """Small ops on one thread, large ones on all (ORION_EMULATED_PARALLEL_MIN=0: all)."""
    if setting is not None:
        monkeypatch.setenv("ORION_EMULATED_PARALLEL_MIN", setting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ex, unpacker = _session()
        ex.store(3, torch.ones(1 << 18))
        _run(ex, unpacker, [1, 1, [H(1), H(1)], {}, [10]])      # 4 elements
        assert torch.get_num_threads() == small_threads
        _run(ex, unpacker, [1, 1, [H(3), H(3)], {}, [11]])      # 262,144 elements
        assert torch.get_num_threads() == 2
        _run(ex, unpacker, [1, 3, [[H(1), H(1)]], {}, [12]])     # a list of small tensors
        assert torch.get_num_threads() == small_threads
        assert torch.equal(ex.tensors[11], torch.full((1 << 18,), 2.0))
    finally:
        torch.set_num_threads(before)


def test_a_running_client_on_the_host_keeps_one_core() -> None:
    """While a co-located client issues ops (it holds a core), a large op takes one thread
    fewer; while the client waits for a reply, all of them. Graph replays alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    running = [True]
    try:
        ex, unpacker = _session()
        ex.client_running = lambda: running[0]
        ex.store(3, torch.ones(1 << 18))
        _run(ex, unpacker, [1, 1, [H(3), H(3)], {}, [11]])      # a large op, client running
        assert torch.get_num_threads() == 1
        running[0] = False
        _run(ex, unpacker, [1, 1, [H(3), H(3)], {}, [12]])      # the client waits
        assert torch.get_num_threads() == 2
        stream = msgpack.packb([1, 1, [H(3), H(11)], {}, [13]], default=codec.encode_default)
        plan = Plan.build(stream, ex, ex.device)
        assert plan is not None
        for state, threads in ((True, 1), (False, 2), (True, 1)):
            running[0] = state
            plan.run(lambda exc: pytest.fail(str(exc)))
            assert torch.get_num_threads() == threads
        assert torch.equal(ex.tensors[13], torch.full((1 << 18,), 3.0))
    finally:
        torch.set_num_threads(before)


def test_a_client_made_view_is_its_storage_seen_through_its_strides() -> None:
    ex = Executor(torch.device("cpu"), 1 << 24)
    unpacker = msgpack.Unpacker(ext_hook=codec.make_ext_hook(
        ex.resolve, ex.device, resolve_view=ex.resolve_view, held=ex.tensors), raw=False,
        strict_map_key=False)
    ex.define(1, "aten::add_.Tensor")
    ex.define(2, "aten::add.Tensor")
    ex.store(1, torch.zeros(3, 4))
    col = codec.view_ext(1, (3,), (4,), 2)  # column 2 of handle 1, as a client made it
    _run(ex, unpacker, [1, 1, [col, 5.0], {}, [0]])  # in place: written through
    expect = torch.zeros(3, 4)
    expect[:, 2] = 5.0
    assert torch.equal(ex.tensors[1], expect)
    _run(ex, unpacker, [1, 2, [codec.view_ext(1, (4, 3), (1, 4), 0), 1.0], {}, [5]])
    assert torch.equal(ex.tensors[5], expect.t() + 1)
    used = ex.ledger.used
    with pytest.raises(SessionError, match="view of tensor handle 1 does not fit its storage"):
        _run(ex, unpacker, [1, 2, [codec.view_ext(1, (4,), (4,), 0), 1.0], {}, [6]])
    with pytest.raises(SessionError, match="tensor handle 9 is not held"):
        _run(ex, unpacker, [1, 2, [codec.view_ext(9, (1,), (1,), 0), 1.0], {}, [6]])
    assert 6 not in ex.tensors and ex.ledger.used == used
    _run(ex, unpacker, [1, 2, [col, 1.0], {}, [6]])  # the session goes on
    assert torch.equal(ex.tensors[6], torch.full((3,), 6.0))
    _run(ex, unpacker, [1, 2, [codec.view_ext(1, (), (), 6), 1.0], {}, [7]])  # one element
    assert ex.tensors[7].shape == () and ex.tensors[7].item() == 6.0
    _exact(ex)
