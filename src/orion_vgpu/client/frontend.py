"""The PyTorch frontend: tensors that live on a vGPU, and the dispatch of ATen ops to it.

A ``RemoteTensor`` is a wrapper subclass with no storage. Its C++ device is ``meta`` (a
device with a guard, so autograd works on a CPU-only build of PyTorch) while Python sees
``cuda:N``. Every ATen op on it lands in ``dispatch``: output metadata comes from meta
kernels behind a cache, handles are assigned here, and the op is queued for the server
without waiting for it.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orion_vgpu.client import generators, transport
from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m

aten = torch.ops.aten
META = torch.device("meta")
# A vGPU tensor's C++ device is meta:N, so autograd keeps track of which vGPU a gradient
# belongs to (e.g. the backward of a cross-device copy goes back to the right one).
META_DEV = [torch.device("meta", i) for i in range(64)]
CUDA_DEV = [torch.device("cuda", i) for i in range(64)]  # what Python sees (immutable)
_next_handle = itertools.count(1).__next__
_op_ids: dict[Any, int] = {}
_op_names: dict[int, str] = {}
_meta_cache: dict[tuple, Any] = {}
# Ops whose output shape depends on float argument values (so their values key the cache).
_VALUE_KEYED = frozenset({aten.arange.default, aten.arange.start, aten.arange.start_step,
                          aten.range.default, aten.linspace.default, aten.logspace.default})
_SYNC = "sync"  # cache marker: this op (for these inputs) runs synchronously on the server


class RemoteTensor(torch.Tensor):
    """A tensor on a vGPU. No local storage; ``_h`` names it in the server session."""

    _h: int
    _dev: int
    _ext: Any
    _key: tuple
    # A tensor whose server handle is shared (with client-made views, see _view) leaves
    # its free to that handle's _Owner; a view the server has no handle for is _lazy.
    _own: _Owner | None = None
    _lazy = False

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return CUDA_DEV[self._dev]

    @property  # type: ignore[override]
    def is_cuda(self) -> bool:
        return True

    @property  # type: ignore[override]
    def is_meta(self) -> bool:
        return False

    @property  # type: ignore[override]
    def is_cpu(self) -> bool:
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return self._dev

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return _BASE_DATA.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        """``x.data = y``: PyTorch gives the wrapper y's sizes, dtype and device; the server
        handle must follow, so that x and y share y's memory from now on, as on CUDA."""
        _BASE_DATA.__set__(self, new)
        if type(new) is RemoteTensor and new is not self:
            _adopt_handle(self, new)

    def __format__(self, spec: str) -> str:
        """f"{loss:.4f}" formats a 0-d tensor's value, as PyTorch does for its own tensors
        (its check is for the exact Tensor type, which a wrapper is not)."""
        if self.dim() == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def __del__(self) -> None:
        try:
            if self._own is None:
                _pending_free.append((self._dev, self._h))  # _free, inlined: every op's output
        except Exception:  # interpreter shutdown: the session is gone with the process
            pass

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError(f"can't convert cuda:{self._dev} device type tensor to numpy. Use "
                        "Tensor.cpu() to copy the tensor to host memory first.")

    def tolist(self) -> Any:  # type: ignore[override]
        return self.cpu().tolist()

    def apply_(self, callable: Any) -> Any:  # type: ignore[override]
        raise TypeError("apply_ is only implemented on CPU tensors")

    def map_(self, tensor: Any, callable: Any) -> Any:  # type: ignore[override]
        raise TypeError("map_ is only implemented on CPU tensors")

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return _repr(self)

    # Indexing: as for a CUDA tensor, host index tensors are allowed (x[cpu_mask]), and an
    # index list (x[[0, 2]]) is built on the host; both go to the vGPU first. (An assigned
    # number becomes a tensor with this one's options: install_meta_factories.)
    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(_vgpu_index(index, self._dev))

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(_vgpu_index(index, self._dev), value)

    def type(self, dtype: Any = None, non_blocking: bool = False,  # type: ignore[override]
             **kwargs: Any) -> Any:
        """x.type() names a CUDA tensor type ("torch.cuda.FloatTensor", not the wrapper's
        "torch.meta..."); a legacy type name converts as on CUDA."""
        if dtype is None:
            return "torch.cuda." + super().type().rpartition(".")[2]
        if isinstance(dtype, type) and dtype.__name__ in _LEGACY_TYPES:
            dtype = f"{dtype.__module__}.{dtype.__name__}"  # torch.cuda.HalfTensor & co.
        if isinstance(dtype, str):
            prefix, _, name = dtype.rpartition(".")
            target = _LEGACY_TYPES.get(name)
            if target is None or prefix not in ("torch", "torch.cuda"):
                raise ValueError(f"invalid type: '{dtype}'")
            device = self.device if prefix == "torch.cuda" else "cpu"
            return self.to(device=device, dtype=target, non_blocking=non_blocking)
        return super().type(dtype, non_blocking, **kwargs)

    def record_stream(self, stream: Any) -> None:
        """A vGPU session runs its work in order: no stream outlives another's use."""

    def share_memory_(self) -> RemoteTensor:
        return self  # as for a CUDA tensor: already shareable, nothing to move

    def __copy__(self) -> RemoteTensor:
        """copy.copy: a tensor sharing this one's memory on the same vGPU, as PyTorch's
        (which rebuilds it from the storage: this one's __reduce_ex__ is for torch.save
        and would give a host copy)."""
        new = self.detach()
        if self.requires_grad:
            new.requires_grad_(True)
        for name, value in self.__dict__.items():
            if name not in _OWN_ATTRS:
                setattr(new, name, value)
        return new

    def __deepcopy__(self, memo: dict) -> RemoteTensor:
        """A copy on the same vGPU with its own handle (copy.deepcopy of a model, of a state
        dict, of an optimizer's state). PyTorch's own copies the storage, which a wrapper
        has not, and then this tensor's __dict__, handle included."""
        if id(self) in memo:
            return memo[id(self)]
        if not self.is_leaf:
            raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) "
                               "support the deepcopy protocol at the moment.")
        with torch.no_grad():
            new = self.clone()
        if self.requires_grad:
            new.requires_grad_(True)
        memo[id(self)] = new
        # As nn.Parameter.__deepcopy__: a parameter's copy comes without its gradient.
        if self.grad is not None and not self.__dict__.get("_is_param"):
            new.grad = copy.deepcopy(self.grad, memo)
        for name, value in self.__dict__.items():  # e.g. _is_param, a user's attributes
            if name not in _OWN_ATTRS:
                setattr(new, name, copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, proto: Any) -> Any:
        host = self.detach().cpu()
        _saved_cuda[host.untyped_storage()._cdata] = self._dev
        if self.requires_grad:
            host.requires_grad_(True)
        return host.__reduce_ex__(proto)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        # dispatch(), inlined: a Python call is 0.15 us of an op's 5 on the client
        op = _ops_by_id.get(id(func))
        if op is None or op.func is not func:
            op = _op_of(func)
        if op.view and _inference_mode():
            return _view_in_inference_mode(op, args, kwargs or {}, None)
        if op.special is not None:
            return op.special(func, args, kwargs or {}, None)
        return _generic(op, args, kwargs or {}, None)


_LEGACY_TYPES = {"FloatTensor": torch.float32, "DoubleTensor": torch.float64,
                 "HalfTensor": torch.float16, "BFloat16Tensor": torch.bfloat16,
                 "ByteTensor": torch.uint8, "CharTensor": torch.int8, "ShortTensor": torch.int16,
                 "IntTensor": torch.int32, "LongTensor": torch.int64, "BoolTensor": torch.bool}
_OWN_ATTRS = frozenset({"_h", "_dev", "_ext", "_key", "_st", "_own", "_lazy"})  # wrap, _view
_saved_cuda: dict[int, int] = {}
_BASE_DATA = torch._C.TensorBase.data
_make = torch.Tensor._make_wrapper_subclass
_inference_mode = torch.is_inference_mode_enabled
_InferenceMode = torch._C._InferenceMode
# Bytes of live storages per vGPU, as the program holds them: instant memory_allocated()
# and an OutOfMemoryError at the offending line (the server's ledger stays authoritative).
used_bytes: dict[int, int] = {}
peak_bytes: dict[int, int] = {}
ooms: dict[int, int] = {}  # OutOfMemoryErrors raised at the line that asked (memory_stats)


class Storage:
    """Shared by a tensor and its views; gives its bytes back when the last one dies."""

    __slots__ = ("nbytes", "dev")

    def __init__(self, nbytes: int, dev: int) -> None:
        self.nbytes = nbytes
        self.dev = dev
        used = used_bytes.get(dev, 0) + nbytes
        used_bytes[dev] = used
        if used > peak_bytes.get(dev, 0):
            peak_bytes[dev] = used

    def __del__(self) -> None:
        try:
            used_bytes[self.dev] = used_bytes.get(self.dev, 0) - self.nbytes
        except Exception:  # interpreter shutdown
            pass


_limits: dict[int, int] = {}  # the quota of each vGPU (or the program's fraction of it)
_fractions: dict[int, float] = {}  # set_per_process_memory_fraction's, per vGPU


def check_quota(dev: int, nbytes: int, used: int | None = None) -> None:
    if nbytes <= 0:
        return
    limit = _limits.get(dev)
    if limit is None:
        limit = _limits[dev] = get_runtime().quota(dev)
    if used is None:
        used = used_bytes.get(dev, 0)
    if limit and used + nbytes > limit:
        ooms[dev] = ooms.get(dev, 0) + 1
        mib = 1 << 20
        why = ("the program's torch.cuda.set_per_process_memory_fraction" if dev in _fractions
               else "ORION_GMEM quota")
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {nbytes / mib:.2f} MiB. vGPU {dev} has a "
            f"total capacity of {limit / mib:.2f} MiB of which {(limit - used) / mib:.2f} MiB is "
            f"free ({why}). Ask for a larger ORION_GMEM or use less memory.")


_new_tuple = tuple.__new__
_ExtType = msgpack.ExtType
_pack_handle = struct.Struct("<q").pack


def wrap(size: Any, stride: Any, offset: int, dtype: torch.dtype, dev: int,
         handle: int, storage: Storage | None = None, key: tuple | None = None,
         dense: bool = False) -> RemoteTensor:
    """``key``: the cache key of this metadata, when the caller has it built already.
    ``dense``: the caller knows ``stride`` is contiguous and ``offset`` 0; the wrapper is
    then made from its sizes alone, which _make_wrapper_subclass parses 0.2 us faster."""
    if dense:
        t = _make(RemoteTensor, size, dtype=dtype, device=META_DEV[dev])
    else:
        # A view's storage is its base's, as PyTorch reports it (untyped_storage().nbytes():
        # shared-tensor checks such as safetensors' compare storages by pointer and size).
        t = _make(RemoteTensor, size, stride, offset, dtype=dtype, device=META_DEV[dev],
                  storage_size=_storage_size(storage, size, stride, offset, dtype))
    t._h = handle
    t._dev = dev
    # codec.handle_ext without ExtType's argument checks (a Python __new__): same value.
    t._ext = _new_tuple(_ExtType, (codec.EXT_HANDLE, _pack_handle(handle)))
    t._key = (tuple(size), tuple(stride), offset, dtype) if key is None else key
    t._st = storage
    return t


def _storage_size(storage: Storage | None, size: Any, stride: Any, offset: int,
                  dtype: torch.dtype) -> int:
    if storage is not None:
        return storage.nbytes
    return _nbytes(size, stride, offset, dtype)


_pending_free: list[tuple[int, int]] = []


class _Owner:
    """A server handle shared by a tensor and the views made of it on the client: freed
    when the last of them is gone."""

    __slots__ = ("dev", "h", "ext", "key")

    def __init__(self, t: RemoteTensor) -> None:
        self.dev, self.h, self.ext, self.key = t._dev, t._h, t._ext, t._key

    def __del__(self) -> None:
        try:
            _pending_free.append((self.dev, self.h))
        except Exception:  # interpreter shutdown
            pass


def _adopt_handle(t: RemoteTensor, src: RemoteTensor) -> None:
    """Make ``t`` name ``src``'s memory on the server (after ``t.data = src``): the handle
    goes to an _Owner shared by both, and ``t``'s own is freed if nothing else has it."""
    if t._own is None:
        _pending_free.append((t._dev, t._h))
    own = src._own
    if own is None:
        own = src._own = _Owner(src)
    t._h, t._dev, t._ext, t._key = src._h, src._dev, src._ext, src._key
    t._st, t._lazy, t._own = src._st, src._lazy, own


def _view(base: RemoteTensor, it: tuple, dev: int) -> RemoteTensor:
    """A view op's output (t, view, transpose, slice, detach, ...), made without the server:
    the server has it as ``as_strided`` of a tensor sharing its storage wherever an op uses
    it (codec.EXT_VIEW), so a view costs it nothing, and this side no command. Its metadata
    is the one the server reported when it first ran the op on inputs of these shapes."""
    own = base._own
    if own is None:
        own = base._own = _Owner(base)
    t = _make(RemoteTensor, it[1], it[2], it[3], dtype=it[4], device=META_DEV[dev],
              storage_size=_storage_size(base._st, it[1], it[2], it[3], it[4]))
    t._h = own.h
    t._dev = dev
    key = t._key = it[7]
    if key == own.key:  # detach, alias, a view to the same shape: the owner's handle is it
        t._ext = own.ext
    else:
        t._ext = _new_tuple(_ExtType, (codec.EXT_VIEW, _pack_handle(own.h) + it[8]))
        t._lazy = True
    t._st = base._st
    t._own = own
    return t


def server_handle(t: RemoteTensor) -> int:
    """The handle naming exactly ``t`` on the server (for a transfer, a peer copy, a graph
    constant): a view made on the client gets one first (own_handle)."""
    if t._lazy:
        own_handle(t)
    return t._h


def own_handle(t: RemoteTensor) -> None:
    """Give ``t`` a server handle no other tensor shares (one ``as_strided`` op), if it
    shares one: before an op changes its sizes or strides in place (t_, resize_ ...)."""
    own = t._own
    if own is None:
        return
    conn = get_runtime().conn(t._dev)
    oid = op_id(aten.as_strided.default)
    if oid not in conn.defined:
        conn.define(oid, _op_names[oid])
    h = _next_handle()
    conn.push([m.CMD_OP, oid, [own.ext, list(t.shape), list(t.stride()), t.storage_offset()],
               {}, [h]])
    t._h = h
    t._ext = codec.handle_ext(h)
    t._lazy = False
    t._own = None  # it frees its own handle now; the shared one may go after this op


def _own_handles(args: Any) -> None:
    for a in args:
        if type(a) is RemoteTensor:
            own_handle(a)
        elif isinstance(a, (list, tuple)):
            _own_handles(a)


def _set_meta(t: RemoteTensor, size: tuple, stride: tuple, offset: int) -> None:
    """Give the wrapper the sizes, strides and offset an in-place op gave its tensor on
    the server (its meta storage grows as needed; it holds no data)."""
    span = _nbytes(size, stride, offset, t.dtype) // t.dtype.itemsize
    with torch._C._AutoDispatchBelowADInplaceOrView(), torch._C._DisableTorchDispatch():
        aten.as_strided_.default(t, [0], [1], 0)
        aten.resize_.default(t, [max(span, offset)])
        aten.as_strided_.default(t, list(size), list(stride), offset)
    t._key = (tuple(size), tuple(stride), offset, t.dtype)


def server_ext(t: RemoteTensor) -> Any:
    """``t``'s ext value for a command that needs a real handle (see server_handle)."""
    if t._lazy:
        own_handle(t)
    return t._ext


def _restride(spec: _OutSpec, inputs: list) -> None:
    for i, size, stride, offset in spec.restride or ():
        _set_meta(inputs[i], size, stride, offset)


def _free(dev: int, handle: int) -> None:
    # Called from __del__ at any time (even inside our own send path): only append.
    _pending_free.append((dev, handle))


def _drain_frees() -> None:
    if not _pending_free:
        return
    conns = get_runtime().conns
    n = len(conns)
    pop = _pending_free.pop
    while _pending_free:
        dev, h = pop()
        if dev < n:
            conns[dev].frees.append(h)


transport.collect_frees = _drain_frees


# --------------------------------------------------------------------------- encoding
class _Walk:
    """One pass over an op's arguments: encode for the wire, key the meta cache."""

    __slots__ = ("dev", "inputs", "temps", "host_target", "value_keyed", "gen_dev")

    def __init__(self, dev: int | None, value_keyed: bool) -> None:
        self.dev = dev
        self.inputs: list[torch.Tensor] = []
        self.temps: list[RemoteTensor] = []
        self.host_target = False
        self.value_keyed = value_keyed
        self.gen_dev: int | None = None  # the vGPU of a torch.Generator argument

    def enc_seq(self, seq: Any) -> tuple[list, tuple]:
        """The hot path: flat argument lists of tensors and plain scalars, no recursion."""
        encs = []
        keys = []
        value_keyed = self.value_keyed
        for a in seq:
            t = type(a)
            if t is RemoteTensor:
                d = a._dev
                if self.dev != d:
                    if self.dev is not None:
                        raise RuntimeError("Expected all tensors to be on the same device, but "
                                           f"found at least two devices, cuda:{self.dev} and "
                                           f"cuda:{d}!")
                    self.dev = d
                self.inputs.append(a)
                encs.append(a._ext)
                keys.append(a._key)
            elif t is int or t is bool or a is None:
                encs.append(a)
                keys.append(a)
            elif t is float and not value_keyed:
                encs.append(a)
                keys.append(float)
            else:
                e, k = self.enc(a)
                encs.append(e)
                keys.append(k)
        return encs, tuple(keys)

    def enc(self, a: Any) -> tuple[Any, Any]:
        if isinstance(a, RemoteTensor):
            d = a._dev
            if self.dev is None:
                self.dev = d
            elif self.dev != d:
                raise RuntimeError("Expected all tensors to be on the same device, but found at "
                                   f"least two devices, cuda:{self.dev} and cuda:{d}!")
            self.inputs.append(a)
            return a._ext, a._key
        if isinstance(a, torch.Tensor):
            return self._host_tensor(a)
        if isinstance(a, (list, tuple)):
            return self.enc_seq(a)
        if isinstance(a, float) and not self.value_keyed:
            return a, float
        if isinstance(a, torch.device):
            if a.type == "cpu":
                self.host_target = True
                return codec.DEVICE_HOST, "cpu"
            return codec.DEVICE_REMOTE, "remote"
        if isinstance(a, (torch.SymInt, torch.SymFloat)):
            raise NotImplementedError("symbolic shapes are not supported on a vGPU")
        if isinstance(a, torch._C.Generator):
            self.gen_dev, ext = generators.encode(a)
            return ext, "generator"  # its state is not metadata
        return a, a

    def _host_tensor(self, a: torch.Tensor) -> tuple[Any, Any]:
        if a.device.type == "cpu" and a.dim() == 0:
            return self._temp_upload(a)
        if a.device.type == "meta":
            raise RuntimeError("cannot mix meta tensors with vGPU tensors")
        raise RuntimeError("Expected all tensors to be on the same device, but found at least "
                           f"two devices, cuda:{self.dev or 0} and cpu!")

    def _temp_upload(self, a: torch.Tensor) -> tuple[Any, Any]:
        # PyTorch lets 0-dim CPU tensors mix with CUDA ones; ship the value along.
        dev = 0 if self.dev is None else self.dev
        t = upload(a, dev)
        self.temps.append(t)
        self.inputs.append(t)
        return t._ext, ("cpu0", a.dtype)

    def enc_kwargs(self, kwargs: dict) -> tuple[dict, tuple]:
        if not kwargs:
            return kwargs, ()
        encs = {}
        keys = []
        for k, v in kwargs.items():
            e, key = self.enc(v)
            encs[k] = e
            keys.append((k, key))
        return encs, tuple(keys)


def op_id(func: Any) -> int:
    oid = _op_ids.get(func)
    if oid is None:
        oid = len(_op_ids) + 1
        _op_ids[func] = oid
        _op_names[oid] = f"{func.namespace}::{func._schema.name.split('::', 1)[1]}" + (
            f".{func._overloadname}" if func._overloadname != "default" else "")
    return oid


# --------------------------------------------------------------------------- meta
class _OutSpec:
    """How to build an op's outputs from its inputs, computed once per cache key."""

    __slots__ = ("kind", "items", "fresh_bytes", "one", "dense", "alias", "restride")

    def __init__(self, kind: str, items: list, fresh_bytes: int,
                 restride: list | None = None) -> None:
        self.kind = kind      # "tensor", "tuple", "list", "none"
        # per item: ("new", size, stride, offset, dtype, view_of_input | -1, nbytes, key,
        #            view ext tail | None(, conj/neg flags))
        #           | ("alias", i) | ("none",) | ("list", [items]) | ("value", v)
        self.items = items
        self.fresh_bytes = fresh_bytes  # bytes of new storages the op allocates
        # The item of an op that makes one new tensor (most ops): built without _build.
        one = self.one = items[0] if kind == "tensor" and items[0][0] == "new" \
            and len(items[0]) == 9 else None
        # ... and whether it is dense from offset 0 (wrap's shortcut).
        self.dense = one is not None and one[3] == 0 and tuple(one[2]) == \
            _contiguous_stride(one[1])
        # The input an in-place op returns (add_, relu_, ...), or -1.
        self.alias = items[0][1] if kind == "tensor" and items[0][0] == "alias" else -1
        # Inputs an in-place op gives other sizes, strides or offset (t_, resize_, out=):
        # (input index, size, stride, offset) as the server reported them.
        self.restride = restride or None


def _to_meta(a: Any) -> Any:
    if isinstance(a, RemoteTensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=META)
    if isinstance(a, torch.device) and a.type != "cpu":
        return META
    if isinstance(a, (list, tuple)):
        return type(a)(_to_meta(x) for x in a)
    return a


def _meta_spec(func: Any, args: tuple, kwargs: dict, temps: list) -> Any:
    margs = tuple(_to_meta(a) for a in args)
    mkw = {k: _to_meta(v) for k, v in kwargs.items()}
    # 0-dim host tensors were uploaded; give the meta kernel their meta stand-ins.
    margs, mkw = _replace_host_scalars(margs, mkw)
    minputs = _collect_tensors(margs) + _collect_tensors(list(mkw.values()))
    try:
        with torch._C._DisableTorchDispatch():
            out = func(*margs, **mkw)
    except (torch._subclasses.fake_tensor.DynamicOutputShapeException, NotImplementedError):
        return _SYNC
    except RuntimeError as exc:
        msg = str(exc)
        if "meta" in msg and ("not implemented" in msg.lower() or "cannot" in msg.lower()
                              or "data-dependent" in msg):
            return _SYNC
        raise
    return _spec_of(out, minputs)


def _replace_host_scalars(margs: tuple, mkw: dict) -> tuple[tuple, dict]:
    def conv(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() == 0:
            return torch.empty((), dtype=a.dtype, device=META)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a
    return tuple(conv(a) for a in margs), {k: conv(v) for k, v in mkw.items()}


def _collect_tensors(seq: Any) -> list:
    out: list = []
    for a in seq:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_collect_tensors(a))
    return out


def _spec_of(out: Any, minputs: list) -> Any:
    fresh = 0
    in_storages = [mi.untyped_storage()._cdata for mi in minputs]

    def item(o: Any) -> tuple:
        nonlocal fresh
        if isinstance(o, torch.Tensor):
            for i, mi in enumerate(minputs):
                if o is mi:
                    return ("alias", i)
            st = o.untyped_storage()
            try:
                view_of = in_storages.index(st._cdata)
            except ValueError:
                view_of = -1
                fresh += st.nbytes()
            meta = (tuple(o.shape), tuple(o.stride()), o.storage_offset(), o.dtype)
            # (a meta kernel's storage offset is relative to its input's, not the server's)
            return ("new", *meta, view_of, st.nbytes(), meta, None)
        if o is None:
            return ("none",)
        if isinstance(o, (list, tuple)):
            return ("list", [item(x) for x in o])
        return ("value", o)

    if isinstance(out, torch.Tensor):
        return _OutSpec("tensor", [item(out)], fresh)
    if isinstance(out, (tuple, list)):
        items = [item(o) for o in out]
        if any(i[0] == "value" for i in items):
            return _SYNC
        return _OutSpec("tuple" if isinstance(out, tuple) else "list", items, fresh)
    if out is None:
        return _OutSpec("none", [], 0)
    return _SYNC  # a plain value comes from the server


def _build_one(it: tuple, inputs: list, dev: int, outs: list[int], handles: Any) -> Any:
    # A module-level function, not a recursive closure: a closure that refers to itself is a
    # reference cycle that would keep every op's inputs alive until the next gc pass.
    tag = it[0]
    if tag == "new":
        h = _next_handle() if handles is None else next(handles)
        outs.append(h)
        view_of = it[5]
        st = inputs[view_of]._st if view_of >= 0 else Storage(it[6], dev)
        t = wrap(it[1], it[2], it[3], it[4], dev, h, st, it[7])
        if len(it) > 9:  # the server's tensor is a lazy conjugate / negative view
            torch._C._set_conj(t, bool(it[9] & m.VIEW_CONJ))
            torch._C._set_neg(t, bool(it[9] & m.VIEW_NEG))
        return t
    if tag == "alias":
        outs.append(0)
        return inputs[it[1]]
    if tag == "list":
        return [_build_one(x, inputs, dev, outs, handles) for x in it[1]]
    return None


def _build(spec: _OutSpec, inputs: list, dev: int, outs: list[int],
           handles: Any = None) -> Any:
    if spec.kind == "tensor":
        return _build_one(spec.items[0], inputs, dev, outs, handles)
    if spec.kind == "none":
        return None
    built = [_build_one(x, inputs, dev, outs, handles) for x in spec.items]
    return tuple(built) if spec.kind == "tuple" else built


# --------------------------------------------------------------------------- dispatch
class _Op:
    """What dispatch needs to know of one ATen overload, found by the overload's id: an
    OpOverload hashes with a Python method, and four dict lookups keyed by it cost more
    than the rest of a cached op."""

    __slots__ = ("func", "special", "value_keyed", "oid", "dynamic", "view")

    def __init__(self, func: Any) -> None:
        self.func = func  # keeps the overload alive, so its id is never reused
        self.special = _SPECIAL.get(func)
        self.value_keyed = func in _VALUE_KEYED
        # Only overloads have a wire name; anything else fails in op_id if it meets a vGPU.
        self.oid = op_id(func) if isinstance(func, torch._ops.OpOverload) else -1
        self.dynamic = _DYNAMIC in getattr(func, "tags", ())
        self.view = _returns_view(func)
        if self.special is None and _writes_metadata(func):
            self.special = _reshaping
        if self.special is None and getattr(func, "namespace", "") == "c10d":
            self.special = _host_collective
        if self.special is None and _is_composite(func):
            self.special = _decomposed


# In-place ops that may give a tensor they write other sizes, strides or storage.
_META_WRITERS = frozenset({"t_", "transpose_", "swapdims_", "swapaxes_", "squeeze_",
                           "unsqueeze_", "as_strided_", "resize_", "resize_as_", "set_",
                           "_resize_output_"})


def _returns_view(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and any(r.alias_info is not None and not r.alias_info.is_write
                                      for r in schema.returns)


def _writes_metadata(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if not written:
        return False
    # out= overloads resize an output of the wrong shape
    return schema.name.partition("::")[2] in _META_WRITERS or any(a.kwarg_only for a in written)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


def _is_composite(func: Any) -> bool:
    """An overload made of other ops (``to``, ``cpu``, ``linear``, ``reshape``, ...)."""
    if not isinstance(func, torch._ops.OpOverload):
        return False
    return _COMPOSITE in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), _COMPOSITE)


def _decomposed(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    """A composite op reaches a vGPU tensor whole only where autograd is off
    (``torch.inference_mode``): elsewhere autograd has already broken it into the ops it
    is made of. Break it up here the same way, so that what crosses between host and vGPU
    is the ops this module handles for that (``to("cpu")`` is ``_to_copy``: run whole
    on the server it gave a vGPU tensor for a host one). A factory (``default_dev``) keeps
    the whole op: it has no vGPU tensor to start from, and its parts would not come back
    through the factory mode."""
    if default_dev is None:
        if _COMPOSITE not in func.py_kernels:
            # its C++ kernel, as OpOverload.decompose would call it (2 us less a call)
            return func._op_dk(_COMPOSITE, *args, **kwargs)
        out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    return _generic(_op_of(func), args, kwargs, default_dev)


def _host_collective(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    """A collective of a process group Orion does not serve (client/host_collectives.py)."""
    from orion_vgpu.client import host_collectives
    return host_collectives.run(func, args, kwargs)


def _reshaping(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    """An op that may reshape a tensor it writes: that tensor must not be another
    tensor's handle too (own_handle), and its wrapper follows (_OutSpec.restride)."""
    _own_handles(args)
    _own_handles(kwargs.values())
    return generic(func, args, kwargs, default_dev)


# Views autograd makes in every backward (AccumulateGrad's detach, the t of each linear
# layer's weight): their metadata follows from their input's, so they skip the op cache's
# key and lookup (0.6 us of 4.5 each). Keyed by the input's (sizes, strides, offset, dtype);
# False where the general path is needed (complex: conj and neg views are flags).
_t_items: dict[tuple, Any] = {}
_detach_items: dict[tuple, Any] = {}


def _view_item(key: tuple, size: tuple, stride: tuple) -> tuple:
    """A view of a tensor with metadata ``key``, as _view takes a cached op's output."""
    offset, dtype = key[2], key[3]
    return ("new", size, stride, offset, dtype, 0, 0, (size, stride, offset, dtype),
            codec.view_tail(size, stride, offset))


def _t_item(key: tuple) -> Any:
    size, stride, dtype = key[0], key[1], key[3]
    if dtype.is_complex or len(size) > 2:
        return False  # the server's t: its view, or its error for more than 2 dims
    if len(size) == 2:
        size, stride = (size[1], size[0]), (stride[1], stride[0])
    return _view_item(key, size, stride)


def _detach_item(key: tuple) -> Any:
    return False if key[3].is_complex else _view_item(key, key[0], key[1])


def _known_view(items: dict, make: Callable[[tuple], Any]) -> Callable[..., Any]:
    def handler(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
        base = args[0] if len(args) == 1 and not kwargs else None
        if type(base) is RemoteTensor:
            key = base._key
            it = items.get(key)
            if it is None:
                it = items[key] = make(key)
            if it:
                conn = get_runtime().conn(base._dev)
                if conn.capture is None:
                    return _view(base, it, base._dev)
                return _server_view(func, base, it, conn)
        return generic(func, args, kwargs, default_dev)
    return handler


def _server_view(func: Any, base: RemoteTensor, it: tuple, conn: Any) -> RemoteTensor:
    """The view as an op the server runs: a captured stream keeps its views as ops (a
    replay plan needs their handles)."""
    oid = op_id(func)
    if oid not in conn.defined:
        conn.define(oid, _op_names[oid])
    h = _next_handle()
    t = wrap(it[1], it[2], it[3], it[4], base._dev, h, base._st, it[7])
    conn.push([m.CMD_OP, oid, [base._ext], {}, [h]])
    return t


_ops_by_id: dict[int, _Op] = {}


def _op_of(func: Any) -> _Op:
    op = _ops_by_id.get(id(func))
    if op is None or op.func is not func:
        op = _ops_by_id[id(func)] = _Op(func)
    return op


def dispatch(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    op = _ops_by_id.get(id(func))
    if op is None or op.func is not func:
        op = _op_of(func)
    if op.view and _inference_mode():
        return _view_in_inference_mode(op, args, kwargs, default_dev)
    return _dispatch_op(op, args, kwargs, default_dev)


def _view_in_inference_mode(op: _Op, args: tuple, kwargs: dict,
                            default_dev: int | None) -> Any:
    """A view of a normal tensor is a normal tensor, in inference mode too (PyTorch then
    gives it its base's version counter, which an inference tensor cannot take): its
    wrapper is made outside the mode."""
    base = args[0] if args else None
    if isinstance(base, torch.Tensor) and not base.is_inference():
        with _InferenceMode(False):  # the C guard: torch.inference_mode's costs 0.7 us more
            return _dispatch_op(op, args, kwargs, default_dev)
    return _dispatch_op(op, args, kwargs, default_dev)


def _dispatch_op(op: _Op, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    if op.special is not None:
        return op.special(op.func, args, kwargs, default_dev)
    return _generic(op, args, kwargs, default_dev)


def generic(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    return _generic(_op_of(func), args, kwargs, default_dev)


# Arguments that encode as themselves and key the cache by value.
_PLAIN = frozenset({int, bool, type(None), str, torch.dtype, torch.layout, torch.memory_format})


def _enc_fast(args: tuple, kwargs: dict, value_keyed: bool) -> tuple | None:
    """What a _Walk gives for the usual arguments (vGPU tensors, scalars, dtypes, lists of
    ints, of vGPU tensors or of floats), in one loop without building one: the same
    (enc_args, akey, enc_kw, kkey, dev, inputs), so both share the meta cache's entries.
    None when an argument needs the full walk (host tensors, devices, mixed lists, ...)."""
    encs: list = []
    keys: list = []
    inputs: list = []
    dev = None
    for a in args:
        t = type(a)
        if t is RemoteTensor:
            if a._dev != dev:
                if dev is not None:
                    return None  # the walk raises the error about mixed devices
                dev = a._dev
            inputs.append(a)
            encs.append(a._ext)
            keys.append(a._key)
        elif t in _PLAIN:
            encs.append(a)
            keys.append(a)
        elif t is float:
            encs.append(a)
            keys.append(a if value_keyed else float)
        elif t is list:
            if not a or type(a[0]) is int:  # sizes, dims (a loop, not a generator: cheaper)
                for x in a:
                    if type(x) is not int:
                        return None
                encs.append(a)
                keys.append(tuple(a))
            elif type(a[0]) is RemoteTensor:  # a _foreach_ op's tensors
                lencs = []
                lkeys = []
                for x in a:
                    if type(x) is not RemoteTensor:
                        return None
                    if x._dev != dev:
                        if dev is not None:
                            return None
                        dev = x._dev
                    inputs.append(x)
                    lencs.append(x._ext)
                    lkeys.append(x._key)
                encs.append(lencs)
                keys.append(tuple(lkeys))
            elif type(a[0]) is float and not value_keyed:  # a _foreach_ op's scalars
                for x in a:
                    if type(x) is not float:
                        return None
                encs.append(a)
                keys.append((float,) * len(a))
            else:
                return None
        else:
            return None
    if not kwargs:
        return encs, tuple(keys), kwargs, (), dev, inputs
    enc_kw = {}
    kkeys = []
    for k, a in kwargs.items():
        t = type(a)
        if t is RemoteTensor:
            if a._dev != dev:
                if dev is not None:
                    return None
                dev = a._dev
            inputs.append(a)
            enc_kw[k] = a._ext
            kkeys.append((k, a._key))
        elif t in _PLAIN:
            enc_kw[k] = a
            kkeys.append((k, a))
        elif t is float:
            enc_kw[k] = a
            kkeys.append((k, a if value_keyed else float))
        else:
            return None
    return encs, tuple(keys), enc_kw, tuple(kkeys), dev, inputs


def _generic(op: _Op, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    func = op.func
    fast = _enc_fast(args, kwargs, op.value_keyed)
    if fast is not None:
        enc_args, akey, enc_kw, kkey, dev, inputs = fast
        temps: list = []
    else:
        walk = _Walk(None, op.value_keyed)
        enc_args, akey = walk.enc_seq(args)
        enc_kw, kkey = walk.enc_kwargs(kwargs)
        dev, inputs, temps = walk.dev, walk.inputs, walk.temps
        if walk.gen_dev is not None:
            generators.check_device(walk.gen_dev, default_dev if dev is None else dev)
    if dev is None:
        dev = default_dev
        if dev is None:
            # no vGPU tensor and no vGPU device: not ours (e.g. host work inside a factory)
            with torch._C._DisableTorchDispatch():
                return func(*args, **kwargs)
    oid = op.oid if op.oid >= 0 else op_id(func)
    key = (oid, akey, kkey)
    spec = _meta_cache.get(key)
    conn = get_runtime().conn(dev)
    if oid not in conn.defined:
        conn.define(oid, _op_names[oid])
    if spec is None:
        if op.dynamic:
            spec = _meta_spec(func, args, kwargs, temps)
            _meta_cache[key] = spec
        else:
            return _probe(conn, oid, enc_args, enc_kw, dev, inputs, key)
    if spec is _SYNC:
        return _call_sync(conn, oid, enc_args, enc_kw, dev)
    fresh = spec.fresh_bytes
    if fresh:
        check_quota(dev, fresh)
        if fresh >= _REUSE_BYTES:
            if _pending_free:
                # The tensors the program dropped since the last frame die on the server
                # before this one is made, as they do locally: it may take their memory,
                # still in the cache, and the session's peak stays the program's.
                conn.queue_frees()
            if fresh >= _WORK_BYTES and conn.starved():
                conn.flush_at = 1  # push sends it now: the server would wait for a full frame
    it = spec.one
    if it is not None:  # _build_one's "new" case, inline: calling it cost 0.3 us an op
        view_of = it[5]
        if it[8] is not None and conn.capture is None:
            # a captured stream keeps its views as ops: a replay plan needs their handles
            return _view(inputs[view_of], it, dev)
        h = _next_handle()
        result = wrap(it[1], it[2], it[3], it[4], dev, h,
                      inputs[view_of]._st if view_of >= 0 else Storage(it[6], dev), it[7],
                      spec.dense)
        conn.push([m.CMD_OP, oid, enc_args, enc_kw, [h]])
        return result
    if spec.alias >= 0 and spec.restride is None:  # an in-place op: no output to build
        conn.push([m.CMD_OP, oid, enc_args, enc_kw, [0]])
        return inputs[spec.alias]
    outs: list[int] = []
    result = _build(spec, inputs, dev, outs)
    conn.push([m.CMD_OP, oid, enc_args, enc_kw, outs])
    if spec.restride is not None:
        _restride(spec, inputs)
    return result


_DYNAMIC = torch.Tag.dynamic_output_shape
_WORK_BYTES = transport.FLUSH_WORK_BYTES
# An op making this much fresh memory first frees what the program dropped (see _generic):
# frees otherwise wait for the end of the frame, up to FLUSH_OPS commands later. A CNN
# step's session peaked at 113-163 MiB that way, 72 MiB with it; smaller tensors come
# from the allocator's small bins, where that matters little.
_REUSE_BYTES = 64 * 1024
_HANDLE_BLOCK = 1 << 16  # handles a probe may hand out; the counter simply skips past them


def _probe(conn: Any, oid: int, enc_args: Any, enc_kw: Any, dev: int, inputs: list,
           key: tuple) -> Any:
    """First sight of an op on these input shapes: the server runs it and describes the
    outputs (real kernels' strides, not meta kernels' guesses); the description is cached."""
    first = _next_handle()
    # Skip the rest of the block inside C (a Python loop of 65535 calls took 3-17 ms).
    deque(itertools.islice(_next_handle.__self__, _HANDLE_BLOCK - 1), maxlen=0)
    reply = conn.call([m.CMD_PROBE, oid, enc_args, enc_kw, first])
    kind, items = reply[1], reply[2]
    if kind == "value":
        _meta_cache[key] = _SYNC
        return items[0][1]
    nbytes = [0]
    specs = [_to_spec(it, inputs, nbytes) for it in items]
    fresh = nbytes[0]
    spec = _OutSpec(kind, specs, fresh, _restrided(items, inputs))
    if not any(it[0] == "value" for it in items):
        _meta_cache[key] = spec
    handles = iter(h for h in _new_handles(items))
    out = _build(spec, inputs, dev, [], handles)
    _restride(spec, inputs)
    limit = _limits.get(dev)
    if limit and fresh and used_bytes.get(dev, 0) > limit:
        # Over a limit below the server's (set_per_process_memory_fraction): dropping the
        # outputs frees them; the error is the one a later call of this op gets up front.
        used = used_bytes[dev] - fresh
        del out
        check_quota(dev, fresh, used)
    return out


def _to_spec(it: list, inputs: list, nbytes: list[int]) -> tuple:
    """One output's cache entry from the server's description; adds its new bytes to
    ``nbytes[0]``. (A module function: a recursive closure over ``inputs`` was a reference
    cycle that kept every first-seen op's inputs, and their vGPU memory, until a gc.)"""
    tag = it[0]
    if tag == "new":
        nbytes[0] += it[6]
        meta = (tuple(it[1]), tuple(it[2]), it[3], it[4])
        if len(it) > 8 and it[8]:  # a conjugate or negative view: its flags go last
            return ("new", *meta, it[5], it[6], meta, None, it[8])
        return ("new", *meta, it[5], it[6], meta, _view_tail(it, inputs))
    if tag == "alias":
        return ("alias", it[1])
    if tag == "list":
        return ("list", [_to_spec(x, inputs, nbytes) for x in it[1]])
    return ("none",)


def _restrided(items: list, inputs: list) -> list:
    """(index, size, stride, offset) of each input the op returned with other metadata."""
    out = []
    for it in items:
        if it[0] == "alias" and len(it) >= 5 and 0 <= it[1] < len(inputs):
            t = inputs[it[1]]
            meta = (tuple(it[2]), tuple(it[3]), it[4])
            if meta != (tuple(t.shape), t.stride(), t.storage_offset()):
                out.append((it[1], *meta))
    return out


def _view_tail(it: list, inputs: list) -> bytes | None:
    """For an output that views input ``it[5]`` with its dtype: the tail of its
    codec.EXT_VIEW value (fixed for this cache entry), else None (the op runs remotely).
    Complex dtypes are left out: their conjugate and negative views are flags, not strides."""
    i, dtype = it[5], it[4]
    if i < 0 or i >= len(inputs) or inputs[i].dtype != dtype or dtype.is_complex:
        return None
    return codec.view_tail(it[1], it[2], it[3])


def _new_handles(items: list) -> list[int]:
    out: list[int] = []
    for it in items:
        if it[0] == "new":
            out.append(it[7])
        elif it[0] == "list":
            out.extend(_new_handles(it[1]))
    return out


def _call_sync(conn: Any, oid: int, enc_args: Any, enc_kw: Any, dev: int) -> Any:
    # Data-dependent shapes or plain values: the server runs it and tells us the metadata.
    pre = [_next_handle() for _ in range(8)]
    reply = conn.call([m.CMD_CALL, oid, enc_args, enc_kw, pre])
    values, metas = reply[1], reply[2]
    tensors = []
    for h, (shape, stride, offset, dtype) in zip(pre, metas, strict=False):
        nbytes = _nbytes(shape, stride, offset, dtype)
        tensors.append(wrap(shape, stride, offset, dtype, dev, h, Storage(nbytes, dev)))
    unused = pre[len(metas):]
    conn.frees.extend(unused)
    if not tensors:
        return values[0] if len(values) == 1 else tuple(values)
    if len(tensors) == 1 and not values:
        return tensors[0]
    return tuple(tensors) + tuple(values)


# --------------------------------------------------------------------------- transfers
def _nbytes(shape: Any, stride: Any, offset: int, dtype: torch.dtype) -> int:
    if any(s == 0 for s in shape):
        return 0
    span = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    return span * dtype.itemsize


_SIMPLE_INDEX = (int, slice, type(None), type(Ellipsis), RemoteTensor)


def _vgpu_index(index: Any, dev: int) -> Any:
    """``index`` with its host parts on vGPU ``dev``: lists of ints or bools and host
    tensors of more than one element (a 0-dim host tensor PyTorch reads as a number)."""
    if isinstance(index, _SIMPLE_INDEX):
        return index
    if isinstance(index, tuple):
        if all(isinstance(i, _SIMPLE_INDEX) for i in index):
            return index
        return tuple(_vgpu_index_item(i, dev) for i in index)
    return _vgpu_index_item(index, dev)


def _vgpu_index_item(i: Any, dev: int) -> Any:
    if isinstance(i, _SIMPLE_INDEX):
        return i
    if isinstance(i, torch.Tensor):
        return upload(i, dev) if i.dim() > 0 and i.device.type == "cpu" else i
    if isinstance(i, list) and i and all(type(x) in (int, bool) for x in i):
        # PyTorch: a list of numbers is an index tensor
        return upload(torch.tensor(i, device="cpu"), dev)
    if type(i).__module__ == "numpy" and getattr(i, "ndim", 0) > 0:
        return upload(torch.from_numpy(i), dev)
    return i  # anything else as PyTorch takes it


def upload(t: torch.Tensor, dev: int) -> RemoteTensor:
    if t.device.type == "meta":
        raise RuntimeError("cannot mix meta tensors with vGPU tensors")
    if t.layout != torch.strided:
        raise RuntimeError(f"tensors of layout {t.layout} are not supported on a vGPU; "
                           "convert with .to_dense() before moving to the device")
    t = t.detach()
    if t.is_conj() or t.is_neg():  # a lazy view: its values go, not its bits (as CUDA's copy)
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    conn = get_runtime().conn(dev)
    check_quota(dev, nbytes)
    if _pending_free:
        # Tensors the program dropped go before the upload: the server reuses their memory
        # for it (else a loop of uploads holds every one of them until the next op).
        _drain_frees()
    h = _next_handle()
    conn.upload(h, t)
    return wrap(t.shape, t.stride(), 0, t.dtype, dev, h, Storage(nbytes, dev), dense=True)


def fetch(t: RemoteTensor) -> torch.Tensor:
    conn = get_runtime().conn(t._dev)
    if _pending_free:
        _drain_frees()
    return conn.fetch(server_handle(t), t.numel() * t.element_size())


def move(t: RemoteTensor, dev: int) -> RemoteTensor:
    """A copy of ``t`` on vGPU ``dev``: server to server when the two sessions can reach
    each other (docs/data-plane.md, "Peer copies"), else through this host."""
    rt = get_runtime()
    src, dst = rt.conn(t._dev), rt.conn(dev)
    route = src.peer_route(dst)
    nbytes = t.numel() * t.element_size()
    # The source holds a snapshot until the destination takes it; with no room for one,
    # the bytes come through this host instead (that needs no memory on the vGPU).
    limit = rt.quota(t._dev)
    if route is None or (limit and used_bytes.get(t._dev, 0) + nbytes > limit):
        return upload(fetch(t), dev)
    check_quota(dev, nbytes)
    if _pending_free:
        _drain_frees()
    h = _next_handle()
    xid = secrets.token_bytes(16)  # the secret that lets dev's server pull it, once
    seq = src.peer_send(server_handle(t), xid)
    dst.peer_recv(h, xid, seq, route, t)
    return wrap(t.shape, _contiguous_stride(t.shape), 0, t.dtype, dev, h, Storage(nbytes, dev))


def _contiguous_stride(shape: Any) -> tuple[int, ...]:
    stride: list[int] = []
    acc = 1
    for n in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


class CrossDevice(torch.autograd.Function):
    """``x.to("cuda:1")`` from cuda:0, differentiable like PyTorch's own device copies."""

    @staticmethod
    def forward(ctx: Any, x: RemoteTensor, dev: int) -> RemoteTensor:  # type: ignore[override]
        ctx.src = x._dev
        return move(x, dev)

    @staticmethod
    def backward(ctx: Any, grad: RemoteTensor) -> tuple[Any, None]:  # type: ignore[override]
        return move(grad, ctx.src), None


def _target_index(target: Any, default: int | None) -> int | None:
    """The vGPU a device argument names: meta:N / cuda:N is N; a bare one means the default."""
    if target is None or target.index is None:
        return default
    return target.index


def _to_copy(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    src = args[0]
    target = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if isinstance(src, RemoteTensor) and target is not None and target.type == "cpu":
        host = fetch(src)
        if dtype is not None and dtype != host.dtype:
            host = host.to(dtype)
        return host
    if isinstance(src, RemoteTensor):
        idx = _target_index(target, src._dev)
        if idx != src._dev:
            moved = move(src, idx)
            return moved if dtype in (None, moved.dtype) else moved.to(dtype)
    if not isinstance(src, RemoteTensor):
        dev = _target_index(target, default_dev)
        host = src if dtype is None else src.to(dtype)
        return upload(host, 0 if dev is None else dev)
    return generic(func, args, kwargs, default_dev)


def _copy_(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, RemoteTensor) and not isinstance(src, RemoteTensor):
        if src.dim() == 0:
            return generic(func, args, kwargs, default_dev)
        tmp = upload(src.to(dst.dtype) if src.dtype != dst.dtype else src, dst._dev)
        return generic(func, (dst, tmp), kwargs, default_dev)
    if not isinstance(dst, RemoteTensor):
        with torch._C._DisableTorchDispatch():
            return dst.copy_(fetch(src))
    if dst._dev != src._dev:
        tmp = move(src, dst._dev)
        return generic(func, (dst, tmp), kwargs, default_dev)
    return generic(func, args, kwargs, default_dev)


def _lift(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    src = args[0]
    if isinstance(src, RemoteTensor):
        return generic(func, args, kwargs, default_dev)
    if default_dev is None:
        with torch._C._DisableTorchDispatch():
            return func(*args, **kwargs)
    return upload(src, default_dev)


def _local_scalar(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    t = args[0]
    if not isinstance(t, RemoteTensor):  # a host number in a factory's sizes (batch_sizes[0])
        with torch._C._DisableTorchDispatch():
            return func(*args, **kwargs)
    return fetch(t).item()


def _is_pinned(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    return False


# nn.TransformerEncoder in eval mode with a padding mask packs its input into a nested
# tensor, which a vGPU cannot hold: "not left-aligned" makes it take its dense path (same
# values at the unpadded positions; the padded ones are computed, not zeroed).
def _not_left_aligned(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    return False


def _no_nested(func: Any, args: tuple, kwargs: dict, default_dev: int | None) -> Any:
    raise RuntimeError("nested tensors are not supported on a vGPU; for nn.TransformerEncoder "
                       "pass enable_nested_tensor=False (or keep mask_check=True)")


_SPECIAL: dict[Any, Callable[..., Any]] = {
    aten._nested_tensor_from_mask_left_aligned.default: _not_left_aligned,
    aten._nested_tensor_from_mask.default: _no_nested,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.lift_fresh.default: _lift,
    aten.lift_fresh_copy.default: _lift,
    aten._local_scalar_dense.default: _local_scalar,
    aten.is_pinned.default: _is_pinned,
    aten.t.default: _known_view(_t_items, _t_item),
    aten.detach.default: _known_view(_detach_items, _detach_item),
}


class FactoryMode(TorchDispatchMode):
    """Active while a torch function creates a tensor with device='cuda[:N]'."""

    def __init__(self, dev: int) -> None:
        super().__init__()
        self.dev = dev

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # The default wraps __torch_dispatch__ with torch._disable_dynamo, whose first call
        # imports all of torch._dynamo (seconds of start-up); nothing here is compiled.
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        return dispatch(func, args, kwargs or {}, self.dev)


# PyTorch's C++ makes helper tensors with the options of the tensors it has: where's
# backward ``at::zeros({}, grad.options())``, the number of ``torch.where(c, x, 0.0)``, an
# assigned value, one_hot's result. For a vGPU tensor those options name its wrapper's
# device, "meta:N", whose tensors have no data (the Meta kernels of zeros, full, ... only
# shape them): the values were lost and the next op failed. In a client process these
# factories make a tensor on meta:N on vGPU N instead, with its value; a meta tensor
# without an index is a meta tensor, as PyTorch makes it.
_META_FACTORIES = ("empty.memory_format", "zeros", "ones", "full", "scalar_tensor")


def _meta_factory(op: Any) -> Callable[..., Any]:
    scalar = op is torch.ops.aten.scalar_tensor.default

    def kernel(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and device.index is not None:
            return dispatch(op, args, kwargs, device.index)
        size = () if scalar else args[0]
        dtype = kwargs.get("dtype")
        if dtype is None:
            dtype = _fill_dtype(args[1]) if op is torch.ops.aten.full.default \
                else torch.get_default_dtype()
        stride = _strides_for(size, kwargs.get("memory_format"))
        return torch.empty_strided(size, stride, dtype=dtype, device=device)
    return kernel


# Factories whose values PyTorch's C++ also makes with a tensor's options (affine_grid's
# backward: at::linspace(-1, 1, n, grid.options())); a meta tensor without an index gets
# its metadata from PyTorch's reference implementation, which never computes values.
_META_VALUE_FACTORIES = {"arange": "arange", "arange.start": "arange",
                         "arange.start_step": "arange", "linspace": "linspace",
                         "logspace": "logspace", "eye": "eye", "eye.m": "eye"}


def _meta_value_factory(op: Any, ref: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and device.index is not None:
            return dispatch(op, args, kwargs, device.index)
        from torch import _refs  # imported on first use: ~import cost off the start-up path
        return getattr(_refs, ref)(*args, **kwargs)
    return kernel


def _fill_dtype(value: Any) -> torch.dtype:
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    if isinstance(value, complex):
        return torch.complex128 if torch.get_default_dtype() == torch.float64 \
            else torch.complex64
    return torch.get_default_dtype()


def _strides_for(size: Any, memory_format: Any) -> Any:
    from torch._prims_common import (
        make_channels_last_strides_for,
        make_contiguous_strides_for,
    )
    if memory_format in (torch.channels_last, torch.channels_last_3d):
        return make_channels_last_strides_for(size)
    return make_contiguous_strides_for(size)


_meta_lib: Any = None


def install_meta_factories() -> None:
    """Register the kernels above over PyTorch's Meta kernels of these factories, for the
    life of this process (meta tensors without an index get PyTorch's result through
    empty_strided's Meta kernel)."""
    global _meta_lib
    if _meta_lib is not None:
        return
    import warnings
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in _META_FACTORIES:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, packet), overload or "default")
            lib.impl(name, _meta_factory(op), "Meta")
        for name, ref in _META_VALUE_FACTORIES.items():
            packet, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, packet), overload or "default")
            lib.impl(name, _meta_value_factory(op, ref), "Meta")
    _meta_lib = lib


# --------------------------------------------------------------------------- printing
def _repr(t: RemoteTensor) -> str:
    host = t.detach().cpu() if t.dtype in codec.DTYPE_CODE else None
    if host is None:
        return f"tensor(..., device='cuda:{t._dev}', dtype={t.dtype})"
    text = repr(host)
    assert text.endswith(")")
    suffix = [f"device='cuda:{t._dev}'"]
    if t.grad_fn is not None:
        suffix.append(f"grad_fn=<{type(t.grad_fn).__name__}>")
    elif t.requires_grad:
        suffix.append("requires_grad=True")
    text = text[:-1] + ", " + ", ".join(suffix) + ")"
    if t.__dict__.get("_is_param"):  # nn.Parameter(vgpu_tensor) is this class, flagged
        return "Parameter containing:\n" + text
    return text

