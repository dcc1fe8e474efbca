"""Graphs a session keeps: CUDA-graph captures and torch.compile programs.

The client defines a graph once (``CMD_GRAPH_DEF``) and runs it with one short command
(``CMD_GRAPH_RUN``), so a replay or a compiled call costs one message on the wire.

- A **stream** is what ``torch.cuda.graph`` recorded: the session's own commands, kept as
  bytes and run again through the session's command path (every check of an eager op still
  applies). Defining it binds the handles the capture created to fresh tensors, as a CUDA
  capture allocates its memory: the program may use its static outputs before the first
  replay (``torch.empty_like(static_out)``).
- An **fx** graph is a torch.compile program: aten/prims nodes that name earlier values,
  decoded without pickle and resolved against the executor's allowlist when defined. It runs
  in a small interpreter, or compiled by inductor (the default on CUDA devices; ``ORION_GRAPH_
  COMPILER=inductor|interpret`` on the server chooses). Nodes that resize storages are
  refused; intermediates must be tensors the session table could hold; the graph's peak
  memory, estimated when defined (meta tensors), is checked against the quota before a run.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m
from orion_vgpu.server.executor import (
    STORABLE_DTYPES,
    Executor,
    Missing,
    OpInfo,
    SessionError,
    _Args,
    describe_op,
    oom_message,
    resolve_op,
)
from orion_vgpu.server.replay import Plan

log = logging.getLogger("orion.session")

MAX_GRAPHS = 4096          # graphs one session may keep at once
MAX_NODES = 1 << 17        # nodes of one fx graph
MAX_NESTING = 8            # a stream may run graphs that run graphs ..., this deep
# Commands a captured stream may hold: work in stream order, nothing that reads the socket
# (uploads), answers (fetch, sync) or changes the session (free, bye).
STREAM_KINDS = frozenset({m.CMD_OP, m.CMD_COPY, m.CMD_SEED, m.CMD_GRAPH_RUN,
                          getattr(m, "CMD_COLLECTIVE", -1)})
PLAN_ENV = "ORION_GRAPH_PLAN"  # 0: replay a capture command by command, as it arrived
GETITEM = "getitem"  # the one non-operator node: an item of a multi-output node
META = torch.device("meta")


class Ref:
    """A graph value (input or node result) named inside an fx graph body."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def _err(message: str) -> SessionError:
    return SessionError("RuntimeError", message)


# -- fx graphs --------------------------------------------------------------------------

@dataclass
class _Node:
    fn: Callable[..., Any]
    info: OpInfo | None        # None for getitem
    args: list
    kwargs: dict
    refs: bool                 # arguments name graph values (else constant)
    free: list[int] = field(default_factory=list)  # values dead after this node
    # Where the references are, found once: (position, value) of a direct argument, and
    # positions of lists that hold some (cat's tensors); kwargs that hold any are rare.
    slots: list[tuple[int, int]] = field(default_factory=list)
    lists: list[int] = field(default_factory=list)
    kw_refs: bool = False

    def __post_init__(self) -> None:
        for pos, a in enumerate(self.args):
            if type(a) is Ref:
                self.slots.append((pos, a.i))
            elif type(a) is list and _has_ref(a):
                self.lists.append(pos)
        self.kw_refs = _has_ref(list(self.kwargs.values()))

    def bind(self, values: list) -> tuple[list, dict]:
        """The arguments of a run (the hot path: no recursion, one list copy)."""
        a = self.args.copy()
        for pos, i in self.slots:
            a[pos] = values[i]
        for pos in self.lists:
            a[pos] = _bind(a[pos], values, None)
        return a, (_bind(self.kwargs, values, None) if self.kw_refs else self.kwargs)


class FxGraph:
    """One torch.compile graph of a session, ready to run."""

    def __init__(self, body: dict, device: torch.device) -> None:
        self.device = device
        self.inputs = _metas(body.get("inputs"), "inputs")
        self.out_meta = [None if x is None else _meta(x, "out_meta")
                         for x in _list(body.get("out_meta"), "out_meta")]
        nodes = _list(body.get("nodes"), "nodes")
        if len(nodes) > MAX_NODES:
            raise _err(f"a compiled graph may have at most {MAX_NODES} nodes")
        self.nodes = [self._node(i, n) for i, n in enumerate(nodes)]
        self.outputs = _list(body.get("outputs"), "outputs")
        if len(self.out_meta) != len(self.outputs):
            raise SessionError("ProtocolError", "graph outputs and out_meta differ in length")
        self._check_refs(self.outputs, len(self.inputs) + len(self.nodes))
        self._plan_frees()
        self.peak = self._estimate_peak()
        self.compiled: Callable[..., Any] | None = None
        self.runs = 0

    def _node(self, i: int, raw: Any) -> _Node:
        if not isinstance(raw, list) or len(raw) != 3 or not isinstance(raw[1], list) \
                or not isinstance(raw[2], dict):
            raise SessionError("ProtocolError", f"graph node {i} is not [op, args, kwargs]")
        name, args, kwargs = raw
        self._check_refs([args, list(kwargs.values())], len(self.inputs) + i)
        refs = _has_ref(args) or _has_ref(list(kwargs.values()))
        if name == GETITEM:
            if len(args) != 2 or type(args[0]) is not Ref or type(args[1]) is not int or kwargs:
                raise SessionError("ProtocolError", f"graph node {i}: malformed getitem")
            return _Node(operator.getitem, None, args, {}, True)
        try:
            info = describe_op(resolve_op(name))
        except SessionError as exc:
            raise _err(f"torch.compile graph refused: {exc}") from None
        if info.grows:
            raise _err(f"torch.compile graph refused: operator {name!r} may resize a tensor's "
                       "storage, which a vGPU graph does not allow (run it outside the "
                       "compiled region)")
        _check_static(info, args, kwargs)
        fn = info.op
        if self.device.type == "cpu":
            fn = _AS_ON_GPU.get(fn, fn)
        return _Node(fn, info, args, kwargs, refs)

    @staticmethod
    def _check_refs(value: Any, limit: int) -> None:
        stack = [value]
        while stack:
            v = stack.pop()
            if type(v) is Ref:
                if not 0 <= v.i < limit:
                    raise SessionError("ProtocolError", f"graph value {v.i} used before it "
                                       "is defined")
            elif type(v) is list:
                stack.extend(v)
            elif type(v) is Missing or isinstance(v, torch.Tensor):
                raise SessionError("ProtocolError", "a graph body cannot name session tensors")

    def _plan_frees(self) -> None:
        """Drop every intermediate after its last use, as eager code drops temporaries."""
        n_in = len(self.inputs)
        last: dict[int, int] = {}
        for k, node in enumerate(self.nodes):
            for r in _refs_in([node.args, list(node.kwargs.values())]):
                last[r] = k
        keep = set(_refs_in(self.outputs))
        for r, k in last.items():
            if r >= n_in and r not in keep:
                self.nodes[k].free.append(r)

    def _estimate_peak(self) -> int | None:
        """Bytes of intermediates alive at once, from a run on meta tensors (None if an op has
        no meta kernel). Also type-checks the graph: a shape error refuses it here."""
        values: list[Any] = [torch.empty_strided(s, st, dtype=d, device=META)
                             for s, st, d in self.inputs]
        inputs = {v.untyped_storage()._cdata for v in values}
        live: dict[int, list[int]] = {}  # storage -> [nbytes, values referring to it]
        owner: dict[int, list[int]] = {}  # value -> storages it holds
        now = peak = 0
        for k, node in enumerate(self.nodes):
            try:
                out = node.fn(*_bind(node.args, values, META), **_bind(node.kwargs, values, META))
            except (NotImplementedError, TypeError):
                return None
            except RuntimeError as exc:
                if "meta" in str(exc).lower() or "not implemented" in str(exc).lower():
                    return None
                raise _err(f"torch.compile graph refused: node {k} ({_name(node)}) fails: "
                           f"{str(exc).splitlines()[0]}") from None
            values.append(out)
            _check_intermediate(out, None)
            held = []
            for t in _tensors_of(out):
                key = t.untyped_storage()._cdata
                if key in inputs:
                    continue
                entry = live.get(key)
                if entry is None:
                    live[key] = entry = [t.untyped_storage().nbytes(), 0]
                    now += entry[0]
                entry[1] += 1
                held.append(key)
            owner[len(values) - 1] = held
            peak = max(peak, now)
            for r in node.free:
                values[r] = None
                for key in owner.pop(r, ()):
                    entry = live[key]
                    entry[1] -= 1
                    if entry[1] == 0:
                        now -= entry[0]
                        del live[key]
        return peak

    # run ------------------------------------------------------------------------------
    def run(self, ex: Executor, args: list, outs: list) -> None:
        inputs = self._check_inputs(args)
        if type(outs) is not list or len(outs) != len(self.outputs) or \
                any(type(h) is not int for h in outs):
            raise SessionError("ProtocolError", "graph run needs one integer handle per output")
        if self.peak is not None and ex.ledger.used + self.peak > ex.ledger.limit:
            raise SessionError("OutOfMemoryError", oom_message(self.peak, ex.ledger))
        throttle = ex.throttle
        if throttle is not None:
            throttle.before_op()
        ex.meta_epoch += 1  # a compiled graph may change tensors' layouts in place
        t0 = time.perf_counter()
        try:
            results = ex.call(self._execute, (ex, inputs), {})
        finally:
            if throttle is not None:
                throttle.after_op(time.perf_counter() - t0)
        self.runs += 1
        self._store(ex, results, outs)

    def _check_inputs(self, args: Any) -> list[torch.Tensor]:
        if type(args) is not list or len(args) != len(self.inputs):
            raise SessionError("ProtocolError", f"graph takes {len(self.inputs)} inputs")
        for i, (a, (shape, stride, dtype)) in enumerate(zip(args, self.inputs, strict=True)):
            if type(a) is Missing:
                raise _err(f"tensor handle {a.handle} is not held by this session (freed, or "
                           "never created because of an earlier error)")
            if not isinstance(a, torch.Tensor) or tuple(a.shape) != shape or \
                    tuple(a.stride()) != stride or a.dtype != dtype:
                got = (f"{tuple(a.shape)}/{tuple(a.stride())}/{a.dtype}"
                       if isinstance(a, torch.Tensor) else type(a).__name__)
                raise _err(f"graph input {i} is {got}; the graph was defined for "
                           f"{shape}/{stride}/{dtype}")
        return args

    def _execute(self, ex: Executor, inputs: list) -> list:
        if self.compiled is not None:
            out = self.compiled(list(inputs))
            return list(out) if isinstance(out, (tuple, list)) else [out]
        values: list[Any] = list(inputs)
        dev = self.device
        # The meta run checked what the per-node guards check (sizes, against the peak;
        # layouts), for these very input shapes; without it every node is checked here.
        checked = self.peak is not None
        for node in self.nodes:
            a, kw = node.bind(values) if node.refs else (node.args, node.kwargs)
            info = node.info
            if not checked and info is not None and info.guarded:
                ex._guard(info, _Args(info.names, a, kw))
            out = node.fn(*a, **kw)
            if not checked:
                _check_intermediate(out, dev)
            values.append(out)
            for r in node.free:
                values[r] = None
        return [values[o.i] if type(o) is Ref else o for o in self.outputs]

    def _store(self, ex: Executor, results: list, outs: list) -> None:
        """Outputs into the session table with the layout the client was promised."""
        ex.store_within_quota(self._promised(results, outs))

    def _promised(self, results: list, outs: list) -> Iterator[tuple[int, torch.Tensor]]:
        for h, r, meta in zip(outs, results, self.out_meta, strict=True):
            if h <= 0 or not isinstance(r, torch.Tensor):
                continue
            if meta is not None and (tuple(r.shape) != meta[0] or tuple(r.stride()) != meta[1]):
                fixed = torch.empty_strided(meta[0], meta[1], dtype=meta[2], device=r.device)
                r = fixed.copy_(r)
            yield h, r

    # inductor ---------------------------------------------------------------------------
    def compile_inductor(self) -> None:
        """Compile with inductor (no guards of ours are lost: inputs are checked on every run,
        and the nodes are the allowlisted ones checked above)."""
        g = torch.fx.Graph()
        vals: list[Any] = [g.placeholder(f"in{i}") for i in range(len(self.inputs))]
        for node in self.nodes:
            vals.append(g.call_function(node.fn, tuple(_bind(node.args, vals, None)),
                                        _bind(node.kwargs, vals, None)))
        g.output(tuple(_bind(self.outputs, vals, None)))
        gm = torch.fx.GraphModule(torch.nn.Module(), g)
        examples = [torch.empty_strided(s, st, dtype=d, device=self.device)
                    for s, st, d in self.inputs]
        from torch._inductor import compile as inductor_compile
        fn = inductor_compile(gm, examples)
        self.compiled = lambda inputs: fn(*inputs)


# A graph is traced with the metadata a GPU's kernels give; an emulated GPU runs the CPU's,
# which differ in one place that matters: batch norm in eval mode saves nothing on the CPU
# (empty tensors) and the running mean and 1/std on a GPU, and the graph's other nodes and
# outputs were built for the latter.
def _bn_eval_as_on_gpu(input: torch.Tensor, weight: Any, bias: Any, running_mean: torch.Tensor,
                       running_var: torch.Tensor, momentum: float, eps: float) -> tuple:
    out = torch.ops.aten._native_batch_norm_legit_no_training.default(
        input, weight, bias, running_mean, running_var, momentum, eps)[0]
    return out, running_mean.clone(), torch.rsqrt(running_var + eps)


def _bn_as_on_gpu(input: torch.Tensor, weight: Any, bias: Any, running_mean: Any,
                  running_var: Any, training: bool, momentum: float, eps: float) -> tuple:
    if training or running_mean is None or running_var is None:
        return torch.ops.aten.native_batch_norm.default(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
    return _bn_eval_as_on_gpu(input, weight, bias, running_mean, running_var, momentum, eps)


_AS_ON_GPU: dict[Any, Callable[..., Any]] = {
    torch.ops.aten._native_batch_norm_legit_no_training.default: _bn_eval_as_on_gpu,
    torch.ops.aten.native_batch_norm.default: _bn_as_on_gpu,
}


def _check_static(info: OpInfo, args: list, kwargs: dict) -> None:
    """The executor's guards that do not depend on the session's state, checked once: a
    compiled graph (inductor) runs without the per-node ones."""
    a = _Args(info.names, args, kwargs)
    for name in info.device_args:
        dev = a.get(name)
        if dev is not None and not isinstance(dev, torch.device):
            raise _err(f"torch.compile graph refused: device argument {dev!r} of {info.name}: "
                       "a vGPU op runs on its own device")
    if info.unsafe_flag and a.get("unsafe"):
        raise _err(f"torch.compile graph refused: {info.name} with unsafe=True is not allowed "
                   "on a vGPU")


def _name(node: _Node) -> str:
    return node.info.name if node.info is not None else GETITEM


def _check_intermediate(out: Any, dev: torch.device | None) -> None:
    """What the session table would refuse must not flow into the next node either (sparse
    or quantized tensors carry indices the kernels trust; other devices are not ours).
    ``dev`` None: the meta run, where devices are meta (and by construction ours)."""
    for t in _tensors_of(out):
        if t.layout is not torch.strided or t.is_nested or t.dtype not in STORABLE_DTYPES:
            raise _err(f"a compiled graph produced a {t.layout}/{t.dtype} tensor, which a "
                       "vGPU does not support")
        if dev is not None and t.device != dev and t.device.type != "cpu":
            raise _err(f"a compiled graph produced a tensor on {t.device}: this vGPU is {dev}")


def _tensors_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors_of(o)]  # aten results nest one level at most
    return []


def _bind(value: Any, values: list, device: torch.device | None) -> Any:
    """``value`` with graph references replaced by their values (devices by ``device`` when
    given: the meta run)."""
    if type(value) is Ref:
        return values[value.i]
    if type(value) is list:
        return [_bind(v, values, device) for v in value]
    if type(value) is dict:
        return {k: _bind(v, values, device) for k, v in value.items()}
    if device is not None and isinstance(value, torch.device):
        return device
    return value


def _has_ref(value: Any) -> bool:
    return any(True for _ in _refs_in(value))


def _refs_in(value: Any) -> list[int]:
    out: list[int] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is Ref:
            out.append(v.i)
        elif type(v) is list:
            stack.extend(v)
    return out


def _list(v: Any, what: str) -> list:
    if type(v) is not list:
        raise SessionError("ProtocolError", f"graph {what} is not an array")
    return v


def _meta(x: Any, what: str) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    if type(x) is not list or len(x) != 3 or type(x[0]) is not list or type(x[1]) is not list \
            or not isinstance(x[2], torch.dtype) or len(x[0]) != len(x[1]) \
            or not all(type(d) is int and 0 <= d < 1 << 40 for d in x[0] + x[1]):
        raise SessionError("ProtocolError", f"graph {what}: not [shape, stride, dtype]")
    return tuple(x[0]), tuple(x[1]), x[2]


def _metas(v: Any, what: str) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]:
    return [_meta(x, what) for x in _list(v, what)]


# -- captured streams -------------------------------------------------------------------

class StreamGraph:
    """A CUDA-graph capture: recorded commands, run again on the same handles."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.runs = 0
        self.plan: Plan | None = None  # made at the first replay (server/replay.py)
        self.planned = False


def _check_stream(data: Any, ex: Executor) -> list:
    """The commands of a capture, decoded without resolving handles (for checks)."""
    if not isinstance(data, bytes):
        raise SessionError("ProtocolError", "a captured stream must be bytes")
    cmds = _unpack_all(data)
    for cmd in cmds:
        if not isinstance(cmd, list) or not cmd or cmd[0] not in STREAM_KINDS:
            kind = cmd[0] if isinstance(cmd, list) and cmd else cmd
            raise SessionError("ProtocolError", f"command {kind!r} cannot be part of a graph")
        if cmd[0] == m.CMD_OP and (len(cmd) != 5 or cmd[1] not in ex.ops):
            raise SessionError("ProtocolError", "a captured op names an undefined operator")
    return cmds


def _view_ref(handle: int, size: tuple, stride: tuple, offset: int) -> Ref:
    return Ref(handle)


def _unpack_all(data: bytes) -> list:
    # Generators stay ids here: this pass only checks which commands the stream holds.
    unpacker = msgpack.Unpacker(ext_hook=codec.make_ext_hook(Ref, META, int, _view_ref), raw=False,
                                strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    out = list(unpacker)
    unpacker.feed(b"\xc0")
    try:
        whole = unpacker.unpack() is None
    except msgpack.OutOfData:
        whole = False
    if not whole:
        raise SessionError("ProtocolError", "captured stream ends inside a command")
    return out


def _instantiate(cmds: list, ex: Executor, bound: list[int]) -> list[int]:
    """Bind the handles a capture created to fresh tensors of the right layout, from a pass
    on meta tensors (values are undefined until the first replay, as on a GPU). Stops at
    the first op that cannot run on meta; later handles stay unbound until the replay."""
    metas: dict[int, torch.Tensor] = {}

    def meta_of(h: int) -> torch.Tensor:
        t = metas.get(h)
        if t is None:
            real = ex.tensors.get(h)
            if real is None:
                raise KeyError(h)
            t = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=META)
            metas[h] = t
        return t

    def conv(v: Any) -> Any:
        if type(v) is Ref:
            return meta_of(v.i)
        if type(v) is list:
            return [conv(x) for x in v]
        if type(v) is dict:
            return {k: conv(x) for k, x in v.items()}
        return META if isinstance(v, torch.device) else v

    for cmd in cmds:
        if cmd[0] != m.CMD_OP:
            continue
        _, op_id, args, kwargs, outs = cmd
        try:
            out = ex.ops[op_id].op(*conv(args), **conv(kwargs))
        except Exception:  # no meta kernel, a handle of a nested graph: replay binds the rest
            break
        flat = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        for h, t in zip(outs, flat, strict=False):
            if type(h) is not int or h <= 0:
                continue
            metas[h] = t
            if h not in ex.tensors:
                # checked before the allocation: a few bytes of stream may describe any size
                ex.check_alloc(_span_bytes(t))
                ex.store(h, torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                device=ex.device))
                bound.append(h)
    return bound


def _raise(exc: SessionError) -> None:
    raise exc


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes ``empty_strided(t.shape, t.stride())`` allocates."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))) \
        * t.element_size()


def _flat(out: Any) -> list:
    if isinstance(out, (list, tuple)):
        flat: list = []
        for o in out:
            flat.extend(o if isinstance(o, (list, tuple)) else [o])
        return flat
    return [out]


# -- the session's store ----------------------------------------------------------------

class GraphStore:
    """The graphs of one session, keyed by the client's graph ids."""

    def __init__(self, ex: Executor, device: torch.device, execute: Callable[[list], None],
                 unpacker: Callable[[], msgpack.Unpacker], session: str = "",
                 fail: Callable[[SessionError], None] | None = None) -> None:
        self.ex = ex
        self.device = device
        self.execute = execute      # runs one command of a stream like any other command
        self.fail = fail or _raise  # what ``execute`` does with a command's error
        self.unpacker = unpacker    # a fresh unpacker resolving the session's handles
        self.session = session
        self.graphs: dict[int, FxGraph | StreamGraph] = {}
        self.depth = 0
        choice = os.environ.get("ORION_GRAPH_COMPILER", "").strip().lower()
        self.use_inductor = choice == "inductor" or (choice == "" and device.type == "cuda")

    def define(self, cmd: list) -> None:
        if len(cmd) != 4 or type(cmd[1]) is not int:
            raise SessionError("ProtocolError", "graph definition is [18, id, kind, body]")
        _, gid, kind, body = cmd
        if kind is None:
            self.graphs.pop(gid, None)
            return
        if gid in self.graphs:
            raise SessionError("ProtocolError", f"graph {gid} is already defined")
        if len(self.graphs) >= MAX_GRAPHS:
            raise _err(f"a session may keep at most {MAX_GRAPHS} graphs")
        if kind == "stream":
            self._define_stream(gid, body)
        elif kind == "fx":
            self._define_fx(gid, body)
        else:
            raise SessionError("ProtocolError", f"unknown graph kind {kind!r}")

    def _define_stream(self, gid: int, body: Any) -> None:
        cmds = _check_stream(body, self.ex)
        bound: list[int] = []
        try:
            bound = _instantiate(cmds, self.ex, bound)
        except SessionError:
            self.ex.free(bound)  # a capture that does not fit leaves nothing behind
            raise
        self.graphs[gid] = StreamGraph(body)
        log.info("session %s graph %d: captured stream of %d commands (%d bytes)",
                 self.session, gid, len(cmds), len(body))

    def _define_fx(self, gid: int, body: Any) -> None:
        if not isinstance(body, bytes):
            raise SessionError("ProtocolError", "an fx graph body must be bytes")
        try:
            decoded = msgpack.unpackb(body, ext_hook=codec.make_ext_hook(Ref, self.device),
                                      raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SessionError("ProtocolError", f"malformed graph body: {exc}") from None
        if not isinstance(decoded, dict):
            raise SessionError("ProtocolError", "graph body is not a map")
        graph = FxGraph(decoded, self.device)
        how = "interpreted"
        # Compiled code skips the per-node guards, so only a graph whose peak memory is known
        # (checked before each run) is compiled.
        if self.use_inductor and graph.peak is not None:
            t0 = time.perf_counter()
            try:
                graph.compile_inductor()
                how = f"compiled by inductor in {time.perf_counter() - t0:.1f} s"
            except Exception as exc:  # inductor is an optimisation: interpret instead
                how = f"interpreted (inductor failed: {type(exc).__name__}: {exc})"
        self.graphs[gid] = graph
        log.info("session %s graph %d: torch.compile graph of %d nodes, %d inputs, peak %s, %s",
                 self.session, gid, len(graph.nodes), len(graph.inputs),
                 "unknown" if graph.peak is None else f"{graph.peak >> 10} KiB", how)

    def run(self, cmd: list) -> None:
        if len(cmd) != 4:
            raise SessionError("ProtocolError", "graph run is [19, id, inputs, outs]")
        graph = self.graphs.get(cmd[1]) if type(cmd[1]) is int else None
        if graph is None:
            raise _err(f"graph {cmd[1]!r} is not defined in this session (refused or dropped)")
        if self.depth >= MAX_NESTING:
            raise _err(f"graphs nest more than {MAX_NESTING} deep")
        self.depth += 1
        try:
            if isinstance(graph, FxGraph):
                graph.run(self.ex, cmd[2], cmd[3])
            else:
                self._run_stream(graph)
        finally:
            self.depth -= 1

    def _run_stream(self, graph: StreamGraph) -> None:
        if not graph.planned:
            graph.planned = True
            if os.environ.get(PLAN_ENV, "1") != "0":
                graph.plan = Plan.build(graph.data, self.ex, self.device)
        if graph.plan is not None:
            graph.plan.run(self.fail)
            graph.runs += 1
            return
        unpacker = self.unpacker()
        unpacker.feed(graph.data)
        for cmd in unpacker:  # handles resolve as each command is reached, as in a frame
            self.execute(cmd)
        graph.runs += 1
