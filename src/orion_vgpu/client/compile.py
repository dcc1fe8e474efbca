"""``torch.compile`` for vGPUs: graphs that run on the server, one message per call.

``torch.compile(model)`` (backend ``"inductor"``, the default, or ``"orion"``) in a program
on vGPUs compiles with the ``orion`` dynamo backend: dynamo captures the program's graphs
and guards them on the client as usual; AOTAutograd turns each into an aten-level forward
and backward graph; each of those is sent once to the vGPU's server (``CMD_GRAPH_DEF``, a
msgpack list of nodes, no pickle) and every call is one ``CMD_GRAPH_RUN`` naming its input
handles and the handles of its outputs, whose layout the graph's fake tensors give. The
server resolves every node against its operator allowlist (a graph that uses another
operator is refused with one clear error at the first call) and runs the graph in an
interpreter, or compiled by its own inductor on CUDA (server/graphs.py).

What dynamo needs to trace a vGPU tensor, set up by ``install()`` on the first
``torch.compile`` call (so only programs that compile import torch._dynamo):

- a ``RemoteTensor`` is traced as a plain tensor (dynamo otherwise treats a tensor subclass
  with ``__torch_dispatch__`` as an opaque object), faked on its C++ device ``meta:N``: fake
  CUDA tensors need a CUDA build once autograd records them;
- while dynamo traces, the process's torch-function mode only turns ``device="cuda"`` into
  that ``meta:N`` and applies the vGPU autocast policy (its eager behaviour is the usual
  one, e.g. in code between graphs).

These hooks reach into torch._dynamo internals of the torch version the client runs (a
server refuses a client whose torch major.minor differs from its own); each is marked
where it is made.

Shapes are static (``dynamic=False``): a new shape is a new graph, guarded by dynamo.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
import warnings
from types import TracebackType
from typing import Any

import msgpack
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses import meta_utils

from orion_vgpu.client import autocast, cuda_api, frontend, graphs
from orion_vgpu.client.errors import OrionError
from orion_vgpu.client.frontend import META_DEV, RemoteTensor
from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m

# Backends that mean "compile it for the device": they get the orion backend on vGPUs.
COMPILING_BACKENDS = frozenset({"inductor", "orion"})
REFUSED = "torch.compile graph refused"
_installed = False


def compile(torch_compile: Any, model: Any = None, **kwargs: Any) -> Any:  # noqa: A001
    """``torch.compile`` of a program on vGPUs (``torch_compile`` is PyTorch's own)."""
    install()
    backend = kwargs.get("backend", "inductor")
    if isinstance(backend, str) and backend in COMPILING_BACKENDS:
        kwargs["backend"] = orion_backend
        kwargs.pop("mode", None)     # inductor's tuning knobs: the server's inductor decides
        kwargs.pop("options", None)
        kwargs["dynamic"] = False    # vGPU graphs have static shapes (see the module doc)
    return torch_compile(model, **kwargs)


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _trace_remote_tensors()
    _fake_on_meta()
    _init_optimizers_with_mode()
    if "orion" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(orion_backend, name="orion")
    # Dynamo traces a torch-function mode, not the functions client/hooks.py wraps.
    cuda_api.use_process_mode(_CompilingMode)
    _never_compile_frames(_CompilingMode.__torch_function__)
    _install_excepthook()
    # Dynamo's own decompositions call inductor's prims (addcmul_ -> inductor fma), which a
    # server registers only when it loads inductor: keep the aten op in the graph.
    torch._dynamo.config.enable_dynamo_decompositions = False
    # The backward graph is called unboxed once dynamo has wrapped it in its disable();
    # RemoteGraph takes both conventions, so AOTAutograd's advice does not apply.
    warnings.filterwarnings("ignore", message="Your compiler for AOTAutograd is returning a "
                            "function that doesn't take boxed arguments")


# -- dynamo and vGPU tensors --------------------------------------------------------------

def _trace_remote_tensors() -> None:
    """Dynamo wraps exactly these types as tensors; a RemoteTensor behaves as one to it (its
    ops are traced on fakes, never dispatched to the subclass while tracing), not as a
    subclass whose Python overrides (device, __torch_function__) it must model."""
    from torch._dynamo.variables import builder

    for trace_numpy in (False, True):
        builder.VariableBuilder._type_dispatch_impl(trace_numpy)[RemoteTensor] = \
            builder.VariableBuilder.wrap_tensor
    infer = builder.infer_subclass_type
    if not getattr(infer, "_orion_vgpu", False):
        def infer_subclass_type(value: Any) -> Any:
            return None if type(value) is RemoteTensor else infer(value)

        infer_subclass_type._orion_vgpu = True  # type: ignore[attr-defined]
        builder.infer_subclass_type = infer_subclass_type
    # AOTAutograd traced the backward for plain-tensor tangents; a vGPU tangent is one.
    RemoteTensor.__coerce_same_metadata_as_tangent__ = _same_tangent  # type: ignore[attr-defined]


def _fake_on_meta() -> None:
    """A RemoteTensor's Python device says cuda; its fake lives on its C++ device meta:N."""
    describe = meta_utils.MetaTensorDescriber.describe_tensor
    if getattr(describe, "_orion_vgpu", False):
        return

    def describe_tensor(self: Any, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        desc = describe(self, t, *args, **kwargs)
        if isinstance(t, RemoteTensor):
            desc = dataclasses.replace(desc, device=META_DEV[t._dev])
        return desc

    describe_tensor._orion_vgpu = True  # type: ignore[attr-defined]
    meta_utils.MetaTensorDescriber.describe_tensor = describe_tensor  # type: ignore[method-assign]


def _init_optimizers_with_mode() -> None:
    """A compiled ``optimizer.step()``: dynamo runs the optimizer's state set-up
    (``_init_group``) for real, with the torch-function modes taken off; vGPU state
    (``torch.zeros(device=p.device)``) needs the process's mode back for that call."""
    from torch._dynamo.variables.optimizer import OptimizerVariable
    from torch._dynamo.variables.torch_function import torch_function_mode_stack_state_mgr

    call = OptimizerVariable.call_method

    def call_method(self: Any, tx: Any, name: str, args: Any, kwargs: Any) -> Any:
        if name != "_init_group":
            return call(self, tx, name, args, kwargs)
        with torch_function_mode_stack_state_mgr.temp_restore_stack():
            return call(self, tx, name, args, kwargs)

    OptimizerVariable.call_method = call_method  # type: ignore[method-assign]


def _never_compile_frames(fn: Any) -> None:
    """Between graphs a compiled function runs eagerly and dynamo compiles the Python frames
    it calls, one by one; the mode's handling of each op (and all it calls: the frontend)
    must stay plain code, not become one-op graphs. Dynamo still inlines the mode while it
    traces a program (this only concerns frames it would start compiling on its own)."""
    from torch._dynamo.eval_frame import set_code_exec_strategy
    from torch._dynamo.types import FrameAction, FrameExecStrategy

    set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


def _same_tangent(self: RemoteTensor, expected_meta: Any = None,
                  expected_type: Any = None) -> RemoteTensor:
    return self


@torch._dynamo.assume_constant_result
def _vgpu_index(d: Any) -> int | None:
    # Called by dynamo while it traces, its answer taken as a constant: the current device
    # and torchrun's local ranks are the runtime's business, not the graph's.
    return cuda_api._cuda_index(d)


def _meta_device(d: Any) -> torch.device | None:
    """``meta:N`` for a device argument naming vGPU N (``"cuda"``, ``cuda:1``, 1)."""
    if isinstance(d, str) and not d.startswith("cuda"):
        return None
    if isinstance(d, torch.device) and d.type != "cuda":
        return None
    if not isinstance(d, (str, torch.device, int)) or isinstance(d, bool):
        return None
    idx = _vgpu_index(d)
    return None if idx is None else META_DEV[idx]


_TO = (torch.Tensor.to, torch.Tensor.cuda)


class _CompilingMode(cuda_api.VGPUMode):
    """The activation mode once the program compiles: while dynamo traces, vGPU devices
    become the ``meta:N`` devices its fakes live on; otherwise it is VGPUMode."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        # True only while dynamo traces this code symbolically (real code running during a
        # compile, such as an optimizer's state set-up, sees False).
        if torch.compiler.is_dynamo_compiling():
            return _traced_call(func, args, kwargs or {})
        return super().__torch_function__(func, types, args, kwargs)


def _traced_call(func: Any, args: tuple, kwargs: dict) -> Any:
    if torch.is_autocast_enabled("cuda"):  # the vGPU autocast policy, as VGPUMode applies it
        dtype = autocast.policy_dtype(func)
        if dtype is not None:
            args = tuple(_traced_cast(a, dtype) for a in args)
            kwargs = {k: _traced_cast(v, dtype) for k, v in kwargs.items()}
    dev = kwargs.get("device")
    if dev is not None:
        meta = _meta_device(dev)
        if meta is not None:
            kwargs = dict(kwargs)
            kwargs["device"] = meta
    if func in _TO:
        if func is torch.Tensor.cuda:
            target = args[1] if len(args) > 1 else kwargs.pop("device", None)
            meta = _meta_device("cuda" if target is None else target)
            return torch.Tensor.to(args[0], meta, **kwargs)
        if len(args) > 1:
            meta = _meta_device(args[1])
            if meta is not None:
                args = (args[0], meta, *args[2:])
    return func(*args, **kwargs)


def _traced_cast(a: Any, dtype: torch.dtype) -> Any:
    if isinstance(a, torch.Tensor) and a.device.type == "meta" and a.is_floating_point() \
            and a.dtype != dtype:
        return a.to(dtype)
    if isinstance(a, (list, tuple)):
        return type(a)(_traced_cast(x, dtype) for x in a)
    return a


# -- the backend --------------------------------------------------------------------------

def orion_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Any:
    """Dynamo backend: vGPU graphs go to the server; host-only graphs to local inductor."""
    if not _on_vgpu(gm, example_inputs):
        if not _has_tensors(gm, example_inputs):
            return gm.forward  # e.g. only grad-mode changes between two graph breaks
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    return _AOT(gm, example_inputs)


def _values(gm: torch.fx.GraphModule, example_inputs: list) -> list:
    return list(example_inputs) + [n.meta.get("val", n.meta.get("example_value"))
                                   for n in gm.graph.nodes]


def _on_vgpu(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    return any(isinstance(v, RemoteTensor) or (isinstance(v, torch.Tensor) and
                                               v.device.type == "meta")
               for v in _values(gm, example_inputs))


def _has_tensors(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    return any(isinstance(v, torch.Tensor) for v in _values(gm, example_inputs))


def _forward(gm: torch.fx.GraphModule, example_inputs: list) -> RemoteGraph:
    return RemoteGraph(gm)


# The forward and backward graphs AOTAutograd makes are each one server graph. No
# decompositions: a graph of aten's own (fused) kernels is shorter to interpret.
_AOT = aot_autograd(fw_compiler=_forward, bw_compiler=_forward,
                    keep_inference_input_mutations=True)


class RemoteGraph:
    """One aten graph kept by a vGPU's server; calling it queues one ``CMD_GRAPH_RUN``."""

    _boxed_call = True  # AOTAutograd passes the inputs as one list

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        ser = _Serializer(gm)
        self.dev = ser.dev
        self.n_args = ser.n_args
        self.out_spec = ser.out_spec
        self.groups = ser.groups
        self.fresh_bytes = sum(self.groups.values())
        self.host_outputs = [i for i, spec in enumerate(self.out_spec) if spec[0] == "host"]
        self.conn = get_runtime().conn(self.dev)
        # get_attr constants (tensors built on the host while tracing) travel once
        self.consts = [frontend.upload(t, self.dev) for t in ser.consts]
        self.const_exts = [c._ext for c in self.consts]
        self.gid = graphs.next_graph_id()
        self._define(ser.body())

    def _define(self, body: bytes) -> None:
        graphs.drop_pending()
        conn = self.conn
        with conn.lock:
            conn.push([m.CMD_GRAPH_DEF, self.gid, "fx", body])
            try:
                conn.request([m.CMD_SYNC])  # a refusal surfaces here, at compile time
            except RuntimeError as exc:
                if REFUSED in str(exc):
                    raise OrionError(str(exc).replace(REFUSED, "torch.compile: the graph was "
                                                      "refused by the vGPU's server", 1)) from None
                raise

    def __call__(self, *call: Any) -> list:
        # Boxed (one list, which AOTAutograd lets us clear) or, once dynamo has wrapped the
        # backward in its disable(), the tensors themselves.
        boxed = len(call) == 1 and type(call[0]) is list
        args: list = call[0] if boxed else list(call)
        dev = self.dev
        enc = []
        for i, a in enumerate(args):
            if type(a) is not RemoteTensor or a._dev != dev:
                a = args[i] = _as_input(a, dev)
            enc.append(frontend.server_ext(a))
        enc.extend(self.const_exts)
        if frontend._pending_free:
            frontend._drain_frees()
        frontend.check_quota(dev, self.fresh_bytes)
        storages = {g: frontend.Storage(n, dev) for g, n in self.groups.items()}
        handles: list[int] = []
        results: list[Any] = []
        for spec in self.out_spec:
            results.append(self._output(spec, args, storages, handles))
        self.conn.push([m.CMD_GRAPH_RUN, self.gid, enc, handles])
        args.clear()  # the boxed convention: inputs may be freed as soon as they are used
        if self.host_outputs:  # the program wants these on the host: wait for them
            for i in self.host_outputs:
                results[i] = self.conn.fetch(handles[i])
                self.conn.frees.append(handles[i])
        return results

    def _output(self, spec: tuple, args: list, storages: dict, handles: list[int]) -> Any:
        kind = spec[0]
        if kind == "new":
            _, shape, stride, offset, dtype, group, view_of = spec
            h = frontend._next_handle()
            handles.append(h)
            st = storages[group] if view_of < 0 else self._input(view_of, args)._st
            return frontend.wrap(shape, stride, offset, dtype, self.dev, h, st)
        if kind == "host":
            handles.append(frontend._next_handle())
            return None
        handles.append(0)
        if kind == "input":
            return self._input(spec[1], args)
        return spec[1]  # "value": None or a constant

    def _input(self, i: int, args: list) -> Any:
        return args[i] if i < self.n_args else self.consts[i - self.n_args]

    def __del__(self) -> None:
        try:
            graphs._dropped.append((self.dev, self.gid))
        except Exception:  # interpreter shutdown: the session ends with the process
            pass


def _as_input(a: Any, dev: int) -> RemoteTensor:
    if isinstance(a, RemoteTensor):
        return frontend.CrossDevice.apply(a, dev)
    if isinstance(a, torch.Tensor):
        return frontend.upload(a, dev)  # a host tensor the graph moves to the vGPU itself
    raise TypeError(f"a compiled vGPU graph takes tensors, not {type(a).__name__}")


class _Serializer:
    """An aten FX graph as msgpack: nodes ``[op, args, kwargs]`` whose tensor arguments are
    handle ext values naming earlier values (inputs first, then node results)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        attrs = [n for n in nodes if n.op == "get_attr"]
        self.n_args = len(placeholders)
        self.index: dict[torch.fx.Node, int] = {}
        inputs = placeholders + attrs
        for i, n in enumerate(inputs):
            self.index[n] = i
        self.consts = [self._attr(n) for n in attrs]
        self.in_vals = [self._val(n) for n in placeholders] + \
                       [torch.empty_strided(c.shape, c.stride(), dtype=c.dtype, device="meta")
                        for c in self.consts]
        self.dev = self._device([n.meta.get("val") for n in nodes])
        self.nodes: list[list] = []
        outputs: Any = ()
        for n in nodes:
            if n.op == "call_function":
                self.index[n] = len(inputs) + len(self.nodes)
                self.nodes.append(self._node(n))
            elif n.op == "output":
                outputs = n.args[0]
            elif n.op not in ("placeholder", "get_attr"):
                raise OrionError(f"torch.compile: a graph node of kind {n.op} cannot run on a "
                                 "vGPU")
        self.outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        self.out_spec, self.groups = self._outputs()

    def _attr(self, n: torch.fx.Node) -> torch.Tensor:
        obj: Any = self.gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or isinstance(obj, RemoteTensor) or \
                obj.device.type != "cpu":
            raise OrionError(f"torch.compile: graph constant {n.target} is not a host tensor")
        return obj.detach()

    @staticmethod
    def _val(n: torch.fx.Node) -> torch.Tensor:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise OrionError(f"torch.compile: graph input {n.name} is a {type(v).__name__}, "
                             "not a tensor (vGPU graphs have static shapes)")
        return v

    @staticmethod
    def _device(vals: list) -> int:
        devs = {v.device.index or 0 for v in vals
                if isinstance(v, torch.Tensor) and v.device.type == "meta"}
        if len(devs) != 1:
            raise OrionError("torch.compile: one compiled graph must run on one vGPU (this one "
                             f"uses vGPUs {sorted(devs)}); call it on tensors of one device")
        return devs.pop()

    def _node(self, n: torch.fx.Node) -> list:
        target = n.target
        if target is operator.getitem:
            name = "getitem"
        elif isinstance(target, torch._ops.OpOverloadPacket):
            name = _op_name(target.default)
        elif isinstance(target, torch._ops.OpOverload):
            name = _op_name(target)
        else:
            raise OrionError(f"torch.compile: the graph calls {getattr(target, '__name__', target)}"
                             ", which cannot run on a vGPU (only ATen operators do)")
        return [name, self._enc(list(n.args)), self._enc(dict(n.kwargs))]

    def _enc(self, v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            return codec.handle_ext(self.index[v])
        if isinstance(v, (list, tuple)):
            return [self._enc(x) for x in v]
        if isinstance(v, dict):
            return {k: self._enc(x) for k, x in v.items()}
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise OrionError("torch.compile: symbolic shapes are not supported on a vGPU")
        if isinstance(v, torch.Tensor):
            raise OrionError("torch.compile: a tensor constant inside a graph node cannot be "
                             "sent to a vGPU")
        return v

    def _outputs(self) -> tuple[list[tuple], dict[int, int]]:
        """How to build each output on the client: a new tensor (in a storage group shared by
        outputs that alias each other, or a view of an input), an input, a host tensor
        (fetched after the run), or a value."""
        in_storages = [_storage(v) for v in self.in_vals]
        groups: dict[int, int] = {}
        specs: list[tuple] = []
        for o in self.outputs:
            if isinstance(o, torch.fx.Node) and o.op in ("placeholder", "get_attr"):
                specs.append(("input", self.index[o]))
                continue
            v = o.meta.get("val") if isinstance(o, torch.fx.Node) else o
            if not isinstance(v, torch.Tensor):
                if isinstance(v, (torch.SymInt, torch.SymFloat)):
                    raise OrionError("torch.compile: symbolic shapes are not supported on a vGPU")
                specs.append(("value", v if not isinstance(o, torch.fx.Node) else None))
                continue
            if v.device.type != "meta":  # .cpu() inside the compiled code
                specs.append(("host",))
                continue
            key = _storage(v)
            view_of = in_storages.index(key) if key in in_storages else -1
            if view_of < 0:
                groups.setdefault(key, v.untyped_storage().nbytes())
            specs.append(("new", tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype,
                          key, view_of))
        return specs, groups

    def body(self) -> bytes:
        def meta(v: torch.Tensor) -> list:
            return [list(v.shape), list(v.stride()), v.dtype]

        out_meta = []
        for o in self.outputs:
            v = o.meta.get("val") if isinstance(o, torch.fx.Node) else None
            out_meta.append(meta(v) if isinstance(v, torch.Tensor) else None)
        doc = {"inputs": [meta(v) for v in self.in_vals], "nodes": self.nodes,
               "outputs": [self._enc(o) for o in self.outputs], "out_meta": out_meta}
        return msgpack.packb(doc, default=codec.encode_default)


def _storage(v: torch.Tensor) -> int:
    return v.untyped_storage()._cdata


def _op_name(op: Any) -> str:
    oid = frontend.op_id(op)
    return frontend._op_names[oid]


# -- errors -------------------------------------------------------------------------------

def _install_excepthook() -> None:
    """Dynamo wraps a backend's errors (``BackendCompilerFailed``); an OrionError inside is
    still one clear line, like the runtime's own."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, OrionError):
            print(f"orion: error: {inner}", file=sys.stderr)
            return
        previous(kind, exc, tb)

    sys.excepthook = hook
