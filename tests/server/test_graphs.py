"""The graphs a session keeps (server/graphs.py), driven the way a worker drives them.

The bodies are built with the protocol codec as the client builds them; the executor is
the real one, so the allowlist, the quota and the handle table are the session's own.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m
from orion_vgpu.server.executor import Executor, SessionError
from orion_vgpu.server.graphs import GraphStore
from orion_vgpu.server.replay import IN_PLACE, INTO_LAST, SKIP, SLOW, Plan

CPU = torch.device("cpu")
F32 = torch.float32
H = codec.handle_ext


def _store(ex: Executor) -> GraphStore:
    def execute(cmd: list) -> None:  # what the worker does with a stream's op commands
        if cmd[0] == m.CMD_OP:
            ex.run(cmd[1], cmd[2], cmd[3], cmd[4])

    def unpacker() -> msgpack.Unpacker:
        return msgpack.Unpacker(ext_hook=codec.make_ext_hook(ex.resolve, CPU), raw=False,
                                strict_map_key=False)

    return GraphStore(ex, CPU, execute, unpacker, "test")


def _mlp_body() -> dict[str, Any]:
    """relu(x @ w.T + b) + ones(16), and its matmul input: inputs x [4,8], w [16,8], b [16]."""
    return {"inputs": [[[4, 8], [8, 1], F32], [[16, 8], [8, 1], F32], [[16], [1], F32]],
            "nodes": [["aten::t", [H(1)], {}],
                      ["aten::addmm", [H(2), H(0), H(3)], {}],
                      ["aten::relu", [H(4)], {}],
                      ["aten::ones", [[16]], {"dtype": F32, "device": codec.DEVICE_REMOTE}],
                      ["aten::add.Tensor", [H(5), H(6)], {}]],
            "outputs": [H(7), H(4)],
            "out_meta": [[[4, 16], [16, 1], F32], [[4, 16], [16, 1], F32]]}


def _define(store: GraphStore, gid: int, body: dict[str, Any]) -> None:
    store.define([m.CMD_GRAPH_DEF, gid, "fx", msgpack.packb(body, default=codec.encode_default)])


def _inputs(ex: Executor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    ts = [torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)]
    for h, t in enumerate(ts, start=1):
        ex.store(h, t)
    return ts


def test_fx_graph_runs_like_eager_and_binds_outputs() -> None:
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    _define(store, 1, _mlp_body())
    x, w, b = _inputs(ex)
    store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[1], ex.tensors[2], ex.tensors[3]], [10, 11]])
    mm = torch.addmm(b, x, w.t())
    assert torch.equal(ex.tensors[10], torch.relu(mm) + 1)
    assert torch.equal(ex.tensors[11], mm)
    assert ex.ledger.used == sum(t.untyped_storage().nbytes() for t in ex.tensors.values())


@pytest.mark.parametrize(("name", "why"), [
    ("orion_test::scale", "only aten, prims operators run remotely"),
    ("aten::from_file", "is not allowed on a vGPU"),
    ("aten::resize_", "may resize a tensor's storage"),
    ("aten::no_such_op", "unknown operator"),
])
def test_fx_graph_with_a_refused_operator_is_not_kept(name: str, why: str) -> None:
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    body = _mlp_body()
    body["nodes"][2] = [name, [H(4)], {}]
    with pytest.raises(SessionError, match="torch.compile graph refused") as err:
        _define(store, 1, body)
    assert why in str(err.value)
    assert not store.graphs
    with pytest.raises(SessionError, match="not defined in this session"):
        store.run([m.CMD_GRAPH_RUN, 1, [], []])


def test_fx_graph_checked_when_defined() -> None:
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    body = _mlp_body()
    body["nodes"][4] = ["aten::add.Tensor", [H(5), H(9)], {}]  # names a later value
    with pytest.raises(SessionError, match="used before it is defined"):
        _define(store, 1, body)
    body = _mlp_body()
    body["nodes"][3] = ["aten::ones", [[15]], {"dtype": F32, "device": codec.DEVICE_REMOTE}]
    with pytest.raises(SessionError, match=r"node 4 \(aten::add\) fails"):  # shapes disagree
        _define(store, 2, body)


def test_fx_graph_inputs_must_match_their_definition() -> None:
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    _define(store, 1, _mlp_body())
    _inputs(ex)
    ex.store(4, torch.randn(4, 9))
    with pytest.raises(SessionError, match=r"graph input 0 is \(4, 9\)"):
        store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[4], ex.tensors[2], ex.tensors[3]], [10, 11]])
    assert 10 not in ex.tensors


def test_fx_graph_peak_memory_is_checked_before_it_runs() -> None:
    body = {"inputs": [[[1024], [1], F32]],
            "nodes": [["aten::expand", [H(0), [4096, 1024]], {}],
                      ["aten::clone", [H(1)], {}],  # 16 MiB intermediate
                      ["aten::sum", [H(2)], {}]],
            "outputs": [H(3)], "out_meta": [[[], [], F32]]}
    ex = Executor(CPU, 8 << 20)
    store = _store(ex)
    _define(store, 1, body)
    assert store.graphs[1].peak >= 16 << 20  # type: ignore[union-attr]
    ex.store(1, torch.ones(1024))
    with pytest.raises(SessionError) as err:
        store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[1]], [2]])
    assert err.value.kind == "OutOfMemoryError"
    assert ex.n_ops == 0  # refused before anything ran


def test_fx_graph_intermediate_the_table_would_refuse_stops_the_run() -> None:
    body = {"inputs": [[[4, 4], [4, 1], F32]],
            "nodes": [["aten::_to_sparse", [H(0)], {}], ["aten::_to_dense", [H(1)], {}]],
            "outputs": [H(2)], "out_meta": [[[4, 4], [4, 1], F32]]}
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    ex.store(1, torch.eye(4))
    with pytest.raises(SessionError, match="sparse_coo"):  # at the meta run, else at the run
        _define(store, 1, body)
        store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[1]], [2]])
    assert 2 not in ex.tensors


def test_stream_binds_its_handles_when_defined_and_replays_on_them() -> None:
    ex = Executor(CPU, 1 << 30)
    ex.define(1, "aten::mul.Tensor")
    ex.define(2, "aten::add_.Tensor")
    ex.store(1, torch.full((3,), 2.0))
    stream = b"".join(msgpack.packb(c, default=codec.encode_default) for c in (
        [m.CMD_OP, 1, [H(1), H(1)], {}, [5]],   # static output 5 = x * x
        [m.CMD_OP, 2, [H(1), H(5)], {}, [0]],   # x += 5 (in place)
    ))
    store = _store(ex)
    store.define([m.CMD_GRAPH_DEF, 7, "stream", stream])
    assert ex.tensors[5].shape == (3,)  # exists before the first replay, as on a GPU
    store.run([m.CMD_GRAPH_RUN, 7, [], []])
    store.run([m.CMD_GRAPH_RUN, 7, [], []])
    assert ex.tensors[1].tolist() == [42.0] * 3  # 2 -> 2 + 4 = 6 -> 6 + 36 = 42
    store.define([m.CMD_GRAPH_DEF, 7, None, None])
    assert 7 not in store.graphs


def test_stream_that_does_not_fit_leaves_nothing_behind() -> None:
    ex = Executor(CPU, 1 << 20)
    ex.define(1, "aten::zeros")
    stream = msgpack.packb([m.CMD_OP, 1, [[1 << 30]], {"dtype": F32}, [5]],
                           default=codec.encode_default)
    store = _store(ex)
    with pytest.raises(SessionError) as err:
        store.define([m.CMD_GRAPH_DEF, 1, "stream", stream])
    assert err.value.kind == "OutOfMemoryError"
    assert 5 not in ex.tensors and ex.ledger.used == 0


@pytest.mark.parametrize("cmd", [[m.CMD_UPLOAD, 5, 0, [4], 16, None], [m.CMD_FETCH, 1, None],
                                 [m.CMD_FREE, [1]], [m.CMD_BYE]])
def test_stream_refuses_commands_a_capture_cannot_hold(cmd: list) -> None:
    ex = Executor(CPU, 1 << 30)
    with pytest.raises(SessionError, match="cannot be part of a graph"):
        _store(ex).define([m.CMD_GRAPH_DEF, 1, "stream", msgpack.packb(cmd)])


def test_streams_nest_at_most_a_few_levels() -> None:
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    store.execute = lambda cmd: store.run(cmd)  # a stream that runs itself, as a worker would
    store.define([m.CMD_GRAPH_DEF, 1, "stream", msgpack.packb([m.CMD_GRAPH_RUN, 1, [], []])])
    with pytest.raises(SessionError, match="nest more than"):
        store.run([m.CMD_GRAPH_RUN, 1, [], []])


def test_inductor_compiles_the_same_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (inductor) on the emulated device: same results as the interpreter."""
    monkeypatch.setenv("ORION_GRAPH_COMPILER", "inductor")
    ex = Executor(CPU, 1 << 30)
    store = _store(ex)
    _define(store, 1, _mlp_body())
    assert store.graphs[1].compiled is not None  # type: ignore[union-attr]
    x, w, b = _inputs(ex)
    store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[1], ex.tensors[2], ex.tensors[3]], [10, 11]])
    assert torch.allclose(ex.tensors[10], torch.relu(torch.addmm(b, x, w.t())) + 1)


@pytest.mark.parametrize(("node", "why"), [
    (["aten::ones", [[4]], {"device": "cuda:1"}], "device argument 'cuda:1'"),
    (["aten::segment_reduce", [H(0), "sum"], {"lengths": H(0), "unsafe": True}], "unsafe=True"),
])
def test_fx_graph_guards_that_need_no_session_state_run_when_defined(node: list, why: str) -> None:
    body = {"inputs": [[[4], [1], F32]], "nodes": [node], "outputs": [H(1)],
            "out_meta": [None]}
    with pytest.raises(SessionError, match="torch.compile graph refused") as err:
        _define(_store(Executor(CPU, 1 << 30)), 1, body)
    assert why in str(err.value)


_OPS = ["aten::add.Tensor", "aten::mul.Tensor", "aten::t", "aten::expand", "aten::ones",
        "aten::empty.memory_format", "aten::cat", "aten::sum", "aten::split.Tensor", "getitem",
        "aten::clone", "aten::copy_", "aten::resize_", "aten::from_file", "aten::_to_sparse",
        "aten::_reshape_alias", "aten::as_strided", "orion_test::x", 7]
_values = st.recursive(
    st.one_of(st.none(), st.integers(-3, 1 << 40), st.floats(allow_nan=False, width=32),
              st.integers(0, 8).map(H), st.sampled_from([F32, torch.int64]),
              st.just(codec.DEVICE_REMOTE), st.just(codec.DEVICE_HOST), st.text(max_size=3)),
    lambda kids: st.lists(kids, max_size=3), max_leaves=8)
_metas = st.tuples(st.lists(st.integers(0, 5), max_size=2), st.sampled_from([F32, torch.int64]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(_metas, max_size=3),
       nodes=st.lists(st.tuples(st.sampled_from(_OPS), st.lists(_values, max_size=3),
                                st.dictionaries(st.sampled_from(["dtype", "device", "dim"]),
                                                _values, max_size=2)), max_size=6),
       outputs=st.lists(st.one_of(st.integers(0, 8).map(H), st.none()), max_size=3))
def test_hostile_fx_graphs_fail_cleanly_and_keep_the_ledger_true(
        inputs: list, nodes: list, outputs: list) -> None:
    ex = Executor(CPU, 1 << 20)
    store = _store(ex)
    metas = [[shape, [int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape))], dt]
             for shape, dt in inputs]
    body = {"inputs": metas, "nodes": [list(n) for n in nodes], "outputs": outputs,
            "out_meta": [None] * len(outputs)}
    args = []
    for h, (shape, _stride, dt) in enumerate(metas, start=1):
        ex.store(h, torch.zeros(shape, dtype=dt))
        args.append(ex.tensors[h])
    before = dict(ex.tensors)
    try:
        _define(store, 1, body)
        store.run([m.CMD_GRAPH_RUN, 1, args, list(range(100, 100 + len(outputs)))])
        event("ran")
    except Exception as exc:  # the worker reports any failure to the client (SessionError)
        event(f"failed: {type(exc).__name__}")
        assert not isinstance(exc, (MemoryError, RecursionError, SystemError)), exc
    assert ex.ledger.used == ex.ledger.recount() <= ex.ledger.limit
    assert all(ex.tensors[h] is t for h, t in before.items())


def test_fx_graph_without_meta_kernels_is_guarded_node_by_node() -> None:
    """No peak estimate (nonzero has no meta kernel): each node's guards run before it."""
    body = {"inputs": [[[4], [1], F32]],
            "nodes": [["aten::nonzero", [H(0)], {}],
                      ["aten::ones", [[1 << 40]], {"dtype": F32}]],
            "outputs": [H(1), H(2)], "out_meta": [None, None]}
    ex = Executor(CPU, 1 << 20)
    store = _store(ex)
    _define(store, 1, body)
    assert store.graphs[1].peak is None  # type: ignore[union-attr]
    ex.store(1, torch.ones(4))
    with pytest.raises(SessionError) as err:  # refused before 4 TiB are asked of the host
        store.run([m.CMD_GRAPH_RUN, 1, [ex.tensors[1]], [2, 3]])
    assert err.value.kind == "OutOfMemoryError"
    assert 2 not in ex.tensors and ex.ledger.used == 16


# -- replay plans (server/replay.py) ------------------------------------------------------

_PLAN_OPS = ("aten::mm", "aten::t", "aten::relu", "aten::add_.Tensor", "aten::_foreach_sqrt",
             "aten::_foreach_add_.Scalar", "aten::view", "aten::sum")


def _plan_session(planned: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Executor, GraphStore]:
    """Weights 1 [4,4] and 2 [4,4], input 3 [2,4]; a stream of views, out=-able ops,
    functional and in-place foreach ops, as a captured training step has."""
    monkeypatch.setenv("ORION_GRAPH_PLAN", "1" if planned else "0")
    ex = Executor(CPU, 1 << 30)
    for op_id, name in enumerate(_PLAN_OPS, start=1):
        ex.define(op_id, name)
    torch.manual_seed(0)
    ex.store(1, torch.rand(4, 4))
    ex.store(2, torch.rand(4, 4))
    ex.store(3, torch.rand(2, 4))
    stream = b"".join(msgpack.packb(c, default=codec.encode_default) for c in (
        [m.CMD_OP, 2, [H(1)], {}, [10]],                  # 10 = w1.t()        (view)
        [m.CMD_OP, 1, [H(3), H(10)], {}, [11]],           # 11 = x @ 10        (out=)
        [m.CMD_OP, 3, [H(11)], {}, [12]],                 # 12 = relu(11)
        [m.CMD_OP, 7, [H(12), [8]], {}, [13]],            # 13 = 12.view(8)    (view)
        [m.CMD_OP, 8, [H(13)], {}, [14]],                 # 14 = sum(13)
        [m.CMD_OP, 5, [[H(1), H(2)]], {}, [15, 16]],      # 15, 16 = sqrt(w1), sqrt(w2)
        [m.CMD_OP, 6, [[H(1), H(2)], 0.5], {}, []],       # w1 += .5, w2 += .5 (in place)
        [m.CMD_OP, 4, [H(3), H(3)], {}, [0]],             # x += x             (in place)
    ))
    store = _store(ex)
    store.define([m.CMD_GRAPH_DEF, 1, "stream", stream])
    return ex, store


def _replay(store: GraphStore) -> None:
    store.run([m.CMD_GRAPH_RUN, 1, [], []])


def test_planned_replays_match_command_by_command_replays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for planned in (True, False):
        ex, store = _plan_session(planned, monkeypatch)
        for _ in range(4):
            _replay(store)
        assert isinstance(store.graphs[1].plan, Plan) is planned
        results.append({h: t.clone() for h, t in ex.tensors.items()})
        assert ex.ledger.used == ex.ledger.recount()
    assert results[0].keys() == results[1].keys()
    for h in results[0]:
        assert torch.equal(results[0][h], results[1][h]), h


def test_a_replay_writes_into_the_tensors_of_the_last_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    _replay(store)
    static, used = ex.tensors[11], ex.ledger.used
    view = static[0]  # made outside the graph, as a program may: it sees each replay
    _replay(store)
    assert ex.tensors[11] is static and ex.ledger.used == used
    assert torch.equal(view, ex.tensors[11][0])


def test_a_replay_follows_tensors_changed_between_replays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    _replay(store)
    _replay(store)
    # The weight moved to other memory in place, as a program's set_ does (an op).
    ex.define(50, "aten::set_.source_Tensor")
    ex.store(20, torch.full((4, 4), 3.0))
    ex.run(50, [ex.tensors[1], ex.tensors[20]], {}, [0])
    ex.store(3, torch.full((2, 4), 2.0))    # the input rebound to another tensor
    ex.free([11])                           # an output freed: stored again
    x, w1 = ex.tensors[3].clone(), ex.tensors[1].clone()
    _replay(store)
    expect = torch.relu(x @ w1.t())
    assert torch.equal(ex.tensors[11], x @ w1.t())
    assert torch.equal(ex.tensors[13], expect.view(8))
    assert torch.equal(ex.tensors[14], expect.sum())
    assert ex.ledger.used == ex.ledger.recount()


def test_a_view_follows_its_input_transposed_in_place_between_replays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    ex.tensors[1].copy_(torch.arange(16.0).view(4, 4))
    _replay(store)
    _replay(store)  # the view 10 = w1.t() is skipped from here on...
    ex.define(51, "aten::t_.default")
    ex.run(51, [ex.tensors[1]], {}, [0])  # ...until its input changes its strides in place
    x, w1 = ex.tensors[3].clone(), ex.tensors[1].clone()
    _replay(store)
    assert torch.equal(ex.tensors[10], ex.tensors[1].t())  # a stale view would be w1 itself
    assert torch.equal(ex.tensors[11], x @ w1.t())


def test_replays_after_the_first_keep_their_bindings_and_skip_their_views(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    _replay(store)
    _replay(store)
    plan = store.graphs[1].plan
    assert isinstance(plan, Plan)
    assert [st.fast for st in plan.steps] == [SKIP, INTO_LAST, INTO_LAST, SKIP, INTO_LAST,
                                              INTO_LAST, IN_PLACE, IN_PLACE]
    ex.tensors[3].copy_(torch.full((2, 4), 0.25))  # values written in place are read
    x, w1, w2 = ex.tensors[3].clone(), ex.tensors[1].clone(), ex.tensors[2].clone()
    version, out = ex.tensors_version, ex.tensors[11]
    _replay(store)
    assert ex.tensors_version == version and ex.tensors[11] is out  # nothing bound anew
    expect = torch.relu(x @ w1.t())
    assert torch.equal(ex.tensors[11], x @ w1.t())
    assert torch.equal(ex.tensors[13], expect.view(8))
    assert torch.equal(ex.tensors[14], expect.sum())
    assert torch.equal(ex.tensors[16], w2.sqrt())
    assert torch.equal(ex.tensors[1], w1 + 0.5) and torch.equal(ex.tensors[3], x * 2)


def test_a_step_that_binds_anew_in_a_fast_replay_ends_its_fast_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    _replay(store)
    _replay(store)
    mm = store.graphs[1].plan.steps[1]  # type: ignore[union-attr]
    assert mm.fast is INTO_LAST

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("not into these outputs")

    mm.out_call = refuse  # as when an out= overload refuses: the eager way, a new tensor
    old = ex.tensors[11]
    x, w1 = ex.tensors[3].clone(), ex.tensors[1].clone()
    _replay(store)
    assert ex.tensors[11] is not old
    expect = torch.relu(x @ w1.t())
    assert torch.equal(ex.tensors[12], expect)  # relu read the new tensor, not the old one
    assert torch.equal(ex.tensors[14], expect.sum())
    assert ex.ledger.used == ex.ledger.recount()


def test_a_tensor_made_anew_at_each_replay_is_read_anew(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_GRAPH_PLAN", "1")
    ex = Executor(CPU, 1 << 30)
    ex.define(1, "aten::randn_like")
    ex.define(2, "aten::mul.Tensor")
    ex.define(3, "aten::add.Tensor")
    ex.store(1, torch.ones(4))
    stream = b"".join(msgpack.packb(c, default=codec.encode_default) for c in (
        [m.CMD_OP, 1, [H(1)], {}, [10]],           # 10 = randn_like(x): a new tensor each time
        [m.CMD_OP, 2, [H(10), H(1)], {}, [11]],    # 11 = 10 * x
        [m.CMD_OP, 3, [H(11), H(1)], {}, [12]],    # 12 = 11 + x
    ))
    store = _store(ex)
    store.define([m.CMD_GRAPH_DEF, 1, "stream", stream])
    for _ in range(4):
        _replay(store)
        assert torch.equal(ex.tensors[11], ex.tensors[10])
        assert torch.equal(ex.tensors[12], ex.tensors[10] + 1)
    assert [st.fast for st in store.graphs[1].plan.steps] == [SLOW, SLOW, INTO_LAST]  # type: ignore[union-attr]


def test_a_failing_step_is_reported_and_the_replay_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex, store = _plan_session(True, monkeypatch)
    errors: list[SessionError] = []
    store.fail = errors.append
    _replay(store)
    ex.free([2])  # the second weight: the foreach steps name it
    before = ex.tensors[3].clone()
    _replay(store)
    assert [e.kind for e in errors] == ["RuntimeError", "RuntimeError"]
    assert "tensor handle 2 is not held" in str(errors[0])
    assert torch.equal(ex.tensors[3], before * 2)  # the last step still ran
