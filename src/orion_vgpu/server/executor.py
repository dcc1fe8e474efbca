"""Executes one session's commands on its device: handle table, allowlist, memory quota.

The client names tensors by handle only; this table is the session's whole world, so a
session can neither read nor free another session's tensors. Clients are untrusted: every
operator, argument and output is checked here (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from orion_vgpu.protocol.codec import DTYPES

log = logging.getLogger("orion.session")

ALLOWED_NAMESPACES = frozenset({"aten", "prims"})
# Allowlisted namespaces still hold ops that must not run for an untrusted client. Denied
# by name, every overload (``aten::from_file.default`` is still from_file):
# - they reach outside the device: files, pinned host memory, streams, the worker's stdout;
# - they build views or reads without bounds checks (tests/security found these):
#   ``_reshape_alias`` makes a view past its storage (reads and writes the worker's heap),
#   ``_reshape_alias_copy`` copies from such a view, ``_segment_reduce_backward`` corrupts
#   the heap when the lengths do not match the data;
# - ``_efficientzerotensor`` claims any size with no memory behind it.
DENIED_OPS = frozenset({
    "aten::from_file", "aten::_pin_memory", "aten::pin_memory", "aten::record_stream",
    "aten::_copy_from_and_resize", "aten::_efficientzerotensor", "aten::_print",
    "aten::_reshape_alias", "aten::_reshape_alias_copy", "aten::_segment_reduce_backward",
})
# Storages cannot travel on the wire, but these overloads would adopt one if they could.
DENIED_OVERLOADS = frozenset({
    "aten::set_.source_Storage", "aten::set_.source_Storage_storage_offset",
})
# Ops whose ``unsafe=True`` skips the bounds checks (segment_reduce then reads past the data).
UNSAFE_FLAG_OPS = frozenset({"aten::segment_reduce"})
MAX_NUMEL = 1 << 40
# Host memory the worker spends per handle and per op id is not in the ledger; these caps
# keep a client that creates millions of empty tensors or op ids from growing it unbounded.
MAX_TENSORS = 1 << 20
MAX_GENERATORS = 4096  # torch.Generator objects a session may hold at once
MAX_OP_IDS = 1 << 16
# An emulated GPU runs an op on all cores only when its largest tensor argument (or a
# tensor list's total, for a for-each op) has this many elements (matrix products and
# convolutions: MATMUL_PARALLEL_MIN); a smaller op runs on one thread. Waking the pool's
# passive threads costs ~10 us a parallel region, more than such an op takes on one core
# (sqrt of 4,096 floats: 1.7 us on one thread, 17.8 us on two), and on a shared host the
# region also waits for a core another process holds.
# ORION_EMULATED_PARALLEL_MIN overrides the first; 0 keeps every op on all threads.
PARALLEL_MIN = 1 << 17
PARALLEL_ENV = "ORION_EMULATED_PARALLEL_MIN"
MATMUL_PARALLEL_MIN = 1 << 14
_MATMUL_WORDS = ("mm", "conv", "linear", "matmul", "attention")
# Ops whose CPU kernels keep one partial result per thread whatever the input's size
# (LayerNorm's backward sums its weight gradient in one buffer row per thread even for 96
# rows; batch and group norm, convolution weight gradients, CTC loss likewise): their bits
# depend on the thread count, so a small one runs on the threads a local process has
# (Executor.threads), not on one; otherwise the same program gives other bits on an
# emulated GPU than locally (seen on an AMD EPYC host). A large one is treated as any
# large op: one thread fewer while the co-located client runs (both threads then cost the
# CNN step 11 %; see docs/performance.md).
_PER_THREAD_WORDS = ("norm", "convolution_backward", "ctc_loss", "embedding_dense_backward",
                     "embedding_bag")
# Tensors the table may hold: what the codec can describe, strided, on the session's
# device or the host. Sparse, nested, mkldnn and quantized tensors carry indices or packed
# data the kernels trust, so they never become inputs of a later op.
STORABLE_DTYPES = frozenset(DTYPES)


class SessionError(Exception):
    """An error to report to the client at its next sync point."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Missing:
    """A handle the client named that this session does not hold (or, with ``why``, a
    view of one that does not fit its storage)."""

    __slots__ = ("handle", "why")

    def __init__(self, handle: int, why: str | None = None) -> None:
        self.handle = handle
        self.why = why


# The operators with dunder names (x << 1, x >>= 2, mask & other): names of that shape are
# refused otherwise, so that no spelling reaches a Python attribute of the op namespace.
DUNDER_OPS = frozenset({"__and__", "__iand__", "__or__", "__ior__", "__xor__", "__ixor__",
                        "__lshift__", "__ilshift__", "__rshift__", "__irshift__"})


def resolve_op(name: str) -> Any:
    """Resolve ``ns::op.overload`` against the allowlist, never anything else."""
    if not isinstance(name, str) or "::" not in name:
        raise SessionError("RuntimeError", f"operator {name!r} is not allowed on a vGPU")
    ns, rest = name.split("::", 1)
    if ns not in ALLOWED_NAMESPACES:
        raise SessionError("RuntimeError", f"operator {name!r} is not allowed on a vGPU "
                           f"(only {', '.join(sorted(ALLOWED_NAMESPACES))} operators run remotely)")
    op_name, _, overload = rest.partition(".")
    if (op_name.startswith("__") and op_name not in DUNDER_OPS) or overload.startswith("__"):
        raise SessionError("RuntimeError", f"unknown operator {name!r}")
    try:
        packet = getattr(getattr(torch.ops, ns), op_name)
        op = getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise SessionError("RuntimeError", f"unknown operator {name!r}") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise SessionError("RuntimeError", f"unknown operator {name!r}")
    # Checked on the resolved op, so no spelling of a denied op gets through.
    base = op._schema.name  # "aten::from_file" for every overload
    if base in DENIED_OPS or f"{base}.{op._overloadname}" in DENIED_OVERLOADS:
        raise SessionError("RuntimeError", f"operator {name!r} is not allowed on a vGPU")
    return op


# -- what an op may allocate, known before it runs ----------------------------------------

class _Args:
    """An op's arguments by schema name, positional or keyword."""

    __slots__ = ("args", "kwargs", "names")

    def __init__(self, names: tuple[str, ...], args: list, kwargs: dict) -> None:
        self.names, self.args, self.kwargs = names, args, kwargs

    def get(self, name: str, default: Any = None) -> Any:
        try:
            i = self.names.index(name)
        except ValueError:
            return self.kwargs.get(name, default)
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)


def _prod(dims: Any) -> int | None:
    """Number of elements of a size list, or None if it is not one (torch will say why)."""
    if not isinstance(dims, (list, tuple)) or not all(type(d) is int for d in dims):
        return None
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims)


def _itemsize(a: _Args, fallback: int) -> int:
    dtype = a.get("dtype")
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype is not None:  # a raw enum value: assume the widest type
        return 16
    return fallback


def _self_itemsize(a: _Args) -> int:
    t = a.get("self")
    return _itemsize(a, t.element_size() if isinstance(t, torch.Tensor) else 16)


def _default_itemsize() -> int:
    return torch.get_default_dtype().itemsize


def _fill_itemsize(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 8
    if isinstance(value, complex):
        return 2 * _default_itemsize()
    return _default_itemsize()


def _bytes(numel: int | None, itemsize: int) -> int | None:
    return None if numel is None else numel * itemsize


def _size_bytes(a: _Args) -> int | None:
    return _bytes(_prod(a.get("size")), _itemsize(a, _default_itemsize()))


def _strided_bytes(a: _Args, itemsize: int) -> int | None:
    size, stride = a.get("size"), a.get("stride")
    n = _prod(size)
    if n is None or _prod([abs(s) for s in stride or []]) is None:
        return None
    if n == 0:
        return 0
    if not stride:  # set_ without strides: contiguous
        return n * itemsize
    return (1 + sum((s - 1) * abs(st) for s, st in zip(size, stride, strict=False))) * itemsize


def _arange_bytes(a: _Args) -> int | None:
    start, end, step = a.get("start", 0), a.get("end"), a.get("step", 1)
    nums = (start, end, step)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in nums):
        return None
    if step == 0 or not all(math.isfinite(x) for x in nums):
        return None
    n = max(0, math.ceil((end - start) / step))
    ints = all(isinstance(x, int) for x in nums)
    return n * _itemsize(a, 8 if ints else _default_itemsize())


def _like_bytes(a: _Args) -> int | None:
    t = a.get("self")
    return t.numel() * _self_itemsize(a) if isinstance(t, torch.Tensor) else None


def _repeat_bytes(a: _Args) -> int | None:
    t, n = a.get("self"), _prod(a.get("repeats"))
    return None if not isinstance(t, torch.Tensor) or n is None else t.numel() * n * t.element_size()


def _cat_bytes(a: _Args) -> int | None:
    """A concatenation is as large as its inputs, and a short message can list one tensor
    a million times."""
    ts = a.get("tensors")
    if not isinstance(ts, list) or not all(isinstance(t, torch.Tensor) for t in ts):
        return None
    return sum(t.numel() * t.element_size() for t in ts)


def _resize_bytes(a: _Args) -> int | None:
    """Growth of the storage ``resize_`` needs (contiguous), beyond what it has."""
    t, n = a.get("self"), _prod(a.get("size"))
    if not isinstance(t, torch.Tensor) or n is None:
        return None
    need = (t.storage_offset() + n) * t.element_size() if n else 0
    return max(0, need - t.untyped_storage().nbytes())


def _resize_as_bytes(a: _Args) -> int | None:
    t, like = a.get("self"), a.get("the_template")
    if not isinstance(t, torch.Tensor) or not isinstance(like, torch.Tensor):
        return None
    need = (t.storage_offset() + like.numel()) * t.element_size()
    return max(0, need - t.untyped_storage().nbytes())


def _set_bytes(a: _Args) -> int | None:
    """Growth of ``source``'s storage that ``set_(source, offset, size, stride)`` needs."""
    src, off = a.get("source"), a.get("storage_offset")
    if not isinstance(src, torch.Tensor) or type(off) is not int or off < 0:
        return None
    extent = _strided_bytes(a, src.element_size())
    if extent is None:
        return None
    need = off * src.element_size() + extent if extent else 0
    return max(0, need - src.untyped_storage().nbytes())


def _resize_output_bytes(a: _Args) -> int | None:
    t, n = a.get("self"), _prod(a.get("size"))
    if not isinstance(t, torch.Tensor) or n is None:
        return None
    return max(0, n * t.element_size() - t.untyped_storage().nbytes())


def _int(v: Any) -> int | None:
    return v if type(v) is int and v >= 0 else None


def _count_bytes(name: str, itemsize: int) -> Callable[[_Args], int | None]:
    return lambda a: _bytes(_int(a.get(name)), _itemsize(a, itemsize))


def _eye_bytes(a: _Args) -> int | None:
    n, m = _int(a.get("n")), _int(a.get("m", a.get("n")))
    return None if n is None or m is None else n * m * _itemsize(a, _default_itemsize())


def _tri_indices_bytes(a: _Args) -> int | None:
    r, c = _int(a.get("row")), _int(a.get("col"))
    return None if r is None or c is None else 2 * r * c * _itemsize(a, 8)


# Ops that allocate what their arguments say (a few bytes of request, any size of memory):
# checked against the quota before they run, so a lying client cannot make the worker
# allocate (and touch) 1 TiB first. Every other op is bounded by its inputs, checked after
# it runs by the ledger, and on emulated GPUs capped by the worker's RLIMIT_DATA.
_SIZERS: dict[str, Callable[[_Args], int | None]] = {
    **{f"aten::{n}": _size_bytes for n in (
        "empty", "zeros", "ones", "rand", "randn", "randint", "empty_permuted", "normal",
        "bernoulli", "expand_copy")},
    "aten::full": lambda a: _bytes(_prod(a.get("size")), _itemsize(a, _fill_itemsize(a.get("fill_value")))),
    **{f"aten::new_{n}": (lambda a: _bytes(_prod(a.get("size")), _self_itemsize(a)))
       for n in ("empty", "zeros", "ones", "full")},
    "aten::empty_strided": lambda a: _strided_bytes(a, _itemsize(a, _default_itemsize())),
    "aten::new_empty_strided": lambda a: _strided_bytes(a, _self_itemsize(a)),
    **{f"aten::{n}_like": _like_bytes for n in (
        "empty", "zeros", "ones", "full", "rand", "randn", "randint")},
    "aten::arange": _arange_bytes,
    "aten::linspace": _count_bytes("steps", _default_itemsize()),
    "aten::logspace": _count_bytes("steps", _default_itemsize()),
    "aten::randperm": _count_bytes("n", 8),
    "aten::eye": _eye_bytes,
    "aten::tril_indices": _tri_indices_bytes,
    "aten::triu_indices": _tri_indices_bytes,
    "aten::repeat": _repeat_bytes,
    **{f"aten::{n}": _cat_bytes for n in (
        "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack")},
    "aten::resize_": _resize_bytes,
    "aten::resize_as_": _resize_as_bytes,
    "aten::_resize_output_": _resize_output_bytes,
    "aten::set_": _set_bytes,
}
# Longest run of a frame's ops charged to the compute share as one turn (Executor.begin_batch):
# well under the share's time slice (throttle.TURN_S, 50 ms).
BATCH_MAX_S = 0.005

# Ops that may reallocate or swap the storage of a tensor they write: checked after they
# run and rolled back if the session went past its quota (out= ops resize their outputs).
_STORAGE_WRITERS = frozenset({"aten::resize_", "aten::resize_as_", "aten::set_",
                              "aten::_resize_output_", "aten::resize_as_sparse_"})


# Words in the names of ops that may reallocate a written tensor's storage besides the
# _STORAGE_WRITERS (conservative: any op so named is recounted).
_RECOUNT_WORDS = ("resize", "set", "sparse", "swap", "storage")
# ... and of in-place ops that may change a written tensor's sizes or strides.
_RESTRIDE_WORDS = ("strided", "squeeze", "transpose", "aten::t_", "view", "permute", "expand",
                   "unfold", "narrow", "select", "slice", "diagonal", "movedim")


@dataclass(frozen=True)
class OpInfo:
    """An allowed operator with what the executor needs to know about its arguments."""

    op: Any
    name: str                                  # "aten::empty"
    names: tuple[str, ...]                     # schema argument names, in order
    device_args: tuple[str, ...]               # arguments of type Device
    written: tuple[str, ...]                   # arguments it writes (self of in-place, out=)
    grows: bool                                # may reallocate a written tensor's storage
    sizer: Callable[[_Args], int | None] | None
    unsafe_flag: bool
    parallel_min: int = PARALLEL_MIN           # elements for a run on all threads (emulated)
    exact_threads: bool = False                # bits depend on the thread count (_PER_THREAD_WORDS)
    # Derived once here so that running the op looks nothing up (see Executor.run):
    guarded: bool = field(init=False)          # something to check before it runs
    # Written tensors to recount after a run: an in-place op (add_, _foreach_mul_, ...) writes
    # into its storage and never reallocates it; out= ops and the resizing/swapping ones may.
    recount: bool = field(init=False)
    # May change the sizes, strides or storage of a tensor in place (t_, squeeze_, resize_,
    # set_, out= ...): bumps Executor.meta_epoch, which graph replays check before they
    # skip a view op whose inputs are the same tensors as last time (server/replay.py).
    restrides: bool = field(init=False)
    written_at: tuple[tuple[int, str], ...] = field(init=False)  # (position, name) written
    call: Any = field(init=False)              # the op's C++ entry (OpOverload.__call__'s)

    def __post_init__(self) -> None:
        derived = {
            "guarded": bool(self.device_args or self.sizer or self.unsafe_flag),
            "recount": self.grows or any(w in self.name for w in _RECOUNT_WORDS),
            "restrides": self.grows or (bool(self.written) and any(
                w in self.name for w in _RECOUNT_WORDS + _RESTRIDE_WORDS)),
            "written_at": tuple((self.names.index(w), w) for w in self.written),
            "call": getattr(self.op, "_op", self.op)}
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


def describe_op(op: Any) -> OpInfo:
    schema = op._schema
    args = schema.arguments
    written = tuple(a.name for a in args if a.alias_info is not None and a.alias_info.is_write)
    name = schema.name  # without the overload
    return OpInfo(
        op=op, name=name, names=tuple(a.name for a in args),
        device_args=tuple(a.name for a in args if "Device" in str(a.type)),
        written=written,
        grows=name in _STORAGE_WRITERS or any(a.is_out for a in args),
        sizer=_SIZERS.get(name),
        unsafe_flag=name in UNSAFE_FLAG_OPS,
        parallel_min=MATMUL_PARALLEL_MIN if any(w in name for w in _MATMUL_WORDS)
        else PARALLEL_MIN,
        exact_threads=any(w in name for w in _PER_THREAD_WORDS))


# -- the ledger ----------------------------------------------------------------------------

class MemoryLedger:
    """Bytes held per storage, so views and in-place ops are counted once.

    Storages are keyed by their StorageImpl (stable when ``resize_`` reallocates the
    data); each entry keeps the storage alive, so a key is never reused while counted.
    Each tensor object held remembers the storage it was counted under, so ``set_``
    moving a tensor to another storage moves its reference too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._storages: dict[int, list[Any]] = {}  # key -> [storage, nbytes, refs]
        self._held: dict[int, list[Any]] = {}      # id(tensor) -> [key, count]

    def _attach(self, st: Any) -> int:
        key = st._cdata
        entry = self._storages.get(key)
        nbytes = st.nbytes()
        if entry is None:
            self._storages[key] = [st, nbytes, 1]
            self.used += nbytes
        else:
            entry[2] += 1
            self._resized(entry, nbytes)
        return key

    def _detach(self, key: int) -> None:
        entry = self._storages[key]
        entry[2] -= 1
        if entry[2] <= 0:
            del self._storages[key]
            self.used -= entry[1]

    def _resized(self, entry: list[Any], nbytes: int) -> None:
        if nbytes != entry[1]:
            self.used += nbytes - entry[1]
            entry[1] = nbytes
        self.peak = max(self.peak, self.used)

    def add(self, t: torch.Tensor) -> None:
        rec = self._held.get(id(t))
        if rec is None:
            self._held[id(t)] = [self._attach(t.untyped_storage()), 1]
            self.peak = max(self.peak, self.used)
        else:
            rec[1] += 1
            self.refresh(t)

    def refresh(self, t: torch.Tensor) -> None:
        """Recount ``t``'s storage after an op that may have resized or swapped it."""
        rec = self._held.get(id(t))
        if rec is None:
            return
        st = t.untyped_storage()
        if st._cdata != rec[0]:
            new_key = self._attach(st)
            self._detach(rec[0])
            rec[0] = new_key
            self.peak = max(self.peak, self.used)
        else:
            entry = self._storages[rec[0]]
            nbytes = st.nbytes()
            if nbytes != entry[1]:  # unchanged (nearly always): peak >= used holds already
                self._resized(entry, nbytes)

    def remove(self, t: torch.Tensor) -> None:
        rec = self._held.get(id(t))
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] <= 0:
            del self._held[id(t)]
            self._detach(rec[0])

    def over(self) -> bool:
        return self.used > self.limit

    def recount(self) -> int:
        """Bytes of the distinct storages counted, from the storages themselves (tests)."""
        return sum(e[0].nbytes() for e in self._storages.values())


def out_of_memory(exc: BaseException, ledger: MemoryLedger) -> SessionError | None:
    """The client's OutOfMemoryError for a kernel that ran out of memory (torch's own, or the
    host allocator failing against the worker's RLIMIT_DATA); None for any other error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return SessionError("OutOfMemoryError", str(exc))
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                          or "not enough memory" in str(exc)):
        return SessionError("OutOfMemoryError", oom_message(0, ledger))
    return None


def oom_message(requested: int, ledger: MemoryLedger) -> str:
    mib = 1 << 20
    return (f"CUDA out of memory. Tried to allocate {requested / mib:.2f} MiB. vGPU has a total "
            f"capacity of {ledger.limit / mib:.2f} MiB of which {(ledger.limit - ledger.used) / mib:.2f}"
            f" MiB is free (ORION_GMEM quota). Ask for a larger ORION_GMEM or use less memory.")


# -- the executor --------------------------------------------------------------------------

@dataclass
class _Snapshot:
    """Storages and written tensors before an op that may grow them, for a rollback."""

    written: list[tuple[torch.Tensor, Any, int, tuple[int, ...], tuple[int, ...]]]
    storages: dict[int, tuple[Any, int]]


class Executor:
    def __init__(self, device: torch.device, gmem_bytes: int) -> None:
        self.device = device
        self.tensors: dict[int, torch.Tensor] = {}
        # The program's torch.Generator(device="cuda") objects, by id (ids come from the
        # client's handle counter: never a tensor's handle).
        self.generators: dict[int, torch.Generator] = {}
        self.ops: dict[int, OpInfo] = {}
        self.ledger = MemoryLedger(gmem_bytes)
        self.busy_s = 0.0
        self.n_ops = 0
        # Compute-share enforcement (orion_vgpu.server.throttle); None = run freely.
        self.throttle: Any = None
        self._batch: tuple[Any, float, int] | None = None  # (throttle, busy_s, n_ops) at its start
        # Bumped by every op that may change a tensor's sizes, strides or storage in place.
        self.meta_epoch = 0
        # Bumped whenever a handle is bound to another tensor or freed (graph replays).
        self.tensors_version = 0
        # Handles named but not held since the last op ran: only then does ``run`` scan
        # its arguments for them (the decoder sees every handle as the command arrives).
        self.missing = 0
        self._cpu = device.type == "cpu"
        # Threads an op may use (see PARALLEL_MIN), and how many it has now.
        self.threads = torch.get_num_threads() if self._cpu else 1
        self._threads_now = self.threads
        self._parallel_scale = _parallel_scale()
        # A client on this host that is issuing ops (not waiting for a reply) holds one of
        # the cores an emulated GPU runs on: its large ops then take one thread fewer, so a
        # parallel region does not wait for that core (Session sets it with shared memory).
        self.client_running: Callable[[], bool] | None = None

    # handles -----------------------------------------------------------------
    def resolve(self, handle: int) -> Any:
        t = self.tensors.get(handle)
        if t is None:
            self.missing += 1
            return Missing(handle)
        return t

    def resolve_view(self, handle: int, size: tuple, stride: tuple, offset: int) -> Any:
        """A view the client made on its own (codec.EXT_VIEW) of tensor ``handle``'s storage."""
        t = self.tensors.get(handle)
        if t is None:
            self.missing += 1
            return Missing(handle)
        try:
            return t.as_strided(size, stride, offset)
        except RuntimeError as exc:  # outside the storage: the op that uses it fails
            self.missing += 1
            return Missing(handle, f"a view of tensor handle {handle} does not fit its "
                           f"storage ({exc})")

    def tensor(self, handle: Any) -> torch.Tensor:
        """The session's tensor named ``handle``, or the error the client gets."""
        t = self.tensors.get(handle) if isinstance(handle, int) else None
        if t is None:
            raise SessionError("RuntimeError", f"tensor handle {handle!r} is not held by this "
                               "session (freed, or never created because of an earlier error)")
        return t

    def store(self, handle: int, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise SessionError("RuntimeError", "operator returned a non-tensor where the client "
                               "expected a tensor")
        if type(handle) is not int:
            raise SessionError("ProtocolError", f"tensor handle {handle!r} is not an integer")
        if handle <= 0:
            return
        self._check_storable(t)
        self._hold(handle, t)

    def _hold(self, handle: int, t: torch.Tensor) -> None:
        old = self.tensors.get(handle)
        if old is None and len(self.tensors) >= MAX_TENSORS:
            raise SessionError("RuntimeError", f"a session may hold at most {MAX_TENSORS} "
                               "tensors at once")
        self.ledger.add(t)
        if old is not None:
            self.ledger.remove(old)
        self.tensors[handle] = t
        self.tensors_version += 1

    def _check_storable(self, t: torch.Tensor) -> None:
        # Quantized dtypes are not in STORABLE_DTYPES, mkldnn and sparse not strided.
        if t.layout is not torch.strided or t.is_nested:
            if t.is_nested:
                raise SessionError("RuntimeError", "nested tensors are not supported on a vGPU")
            raise SessionError("RuntimeError", f"tensors of layout {t.layout} are not supported "
                               "on a vGPU; use dense ones (nn.Embedding: sparse=False)")
        if t.dtype not in STORABLE_DTYPES:
            raise SessionError("TypeError", f"dtype {t.dtype} is not supported on a vGPU")
        if t.is_cpu:  # the host, and an emulated GPU's own device
            return
        dev = t.device
        if dev != self.device:
            raise SessionError("RuntimeError", f"tensor on {dev}: this vGPU is {self.device}")

    def free(self, handles: list[int]) -> None:
        if not isinstance(handles, list):
            raise SessionError("ProtocolError", "free expects a list of handles")
        for h in handles:
            t = self.tensors.pop(h, None) if isinstance(h, int) else None
            if t is not None:
                self.ledger.remove(t)
                self.tensors_version += 1
            elif self.generators:
                self.generators.pop(h, None)

    def generator(self, gid: int) -> torch.Generator:
        """The session's generator ``gid``; one the session has not seen yet starts as a new
        torch.Generator does (the client sends a seed or a state only when it sets one).
        Id 0 is the device's default generator (torch.cuda.default_generators)."""
        if gid == 0:
            if self.device.type == "cuda":
                return torch.cuda.default_generators[self.device.index or 0]
            return torch.default_generator
        g = self.generators.get(gid)
        if g is None:
            if gid < 0:
                raise SessionError("ProtocolError", f"generator id {gid} is negative")
            if len(self.generators) >= MAX_GENERATORS:
                raise SessionError("RuntimeError", f"a session may hold at most "
                                   f"{MAX_GENERATORS} torch.Generator objects at once")
            g = self.generators[gid] = torch.Generator(device=self.device)
        return g

    def copy(self, dst: Any, src: Any) -> None:
        """Server-side copy between two of this session's tensors (never resizes)."""
        self.tensor(dst).copy_(self.tensor(src))

    def fetchable(self, handle: Any) -> torch.Tensor:
        """A tensor a fetch may copy out. An expanded view can describe far more elements
        than its storage holds; its copy may not be larger than the vGPU."""
        t = self.tensor(handle)
        nbytes = t.numel() * t.element_size()
        if nbytes > max(self.ledger.limit, t.untyped_storage().nbytes()):
            raise SessionError("OutOfMemoryError", f"cannot fetch {nbytes / 2**20:.2f} MiB: "
                               f"more than the vGPU's {self.ledger.limit / 2**20:.2f} MiB")
        return t.detach()

    def host_copy(self, handle: Any) -> torch.Tensor:
        """A dense host copy of a tensor for a fetch (the tensor itself if it is one)."""
        return self.fetchable(handle).to("cpu").contiguous()

    # ops ---------------------------------------------------------------------
    def define(self, op_id: int, name: str) -> None:
        if type(op_id) is not int:
            raise SessionError("ProtocolError", f"operator id {op_id!r} is not an integer")
        if op_id not in self.ops and len(self.ops) >= MAX_OP_IDS:
            raise SessionError("RuntimeError", f"a session may define at most {MAX_OP_IDS} "
                               "operators")
        self.ops[op_id] = describe_op(resolve_op(name))

    def run(self, op_id: int, args: list, kwargs: dict, outs: list) -> Any:
        # msgpack makes exactly these types (type() is: a bool is not an id)
        info = self.ops.get(op_id) if type(op_id) is int else None
        if info is None:
            raise SessionError("RuntimeError", f"operator id {op_id!r} was never defined")
        if type(args) is not list or type(kwargs) is not dict or type(outs) is not list:
            raise SessionError("ProtocolError", "an op needs args (array), kwargs (map) and "
                               "out handles (array)")
        for h in outs:
            if type(h) is not int:
                raise SessionError("ProtocolError", f"out handles {outs!r:.80} are not all "
                                   "integers")
        if self.missing:  # some handle decoded since the last op is not held: which one?
            self.missing = 0
            _check_args(args, kwargs)
        if info.guarded:
            self._guard(info, _Args(info.names, args, kwargs))
        snapshot = self._snapshot(info, args, kwargs) if info.grows else None
        if info.restrides:
            self.meta_epoch += 1
        if self.threads > 1:
            self.use_threads(self.threads_for(info, self.is_large(info, args)))
        throttle = self.throttle
        if throttle is not None:
            throttle.before_op()
        t0 = time.perf_counter()
        try:
            result = info.call(*args, **kwargs)
        except Exception as exc:
            if snapshot is not None:  # an out= op may resize its output, then fail
                self._rollback(snapshot)
            oom = out_of_memory(exc, self.ledger)
            if oom is not None:
                raise oom from None
            raise
        finally:
            spent = time.perf_counter() - t0
            self.busy_s += spent
            self.n_ops += 1
            if throttle is not None:
                throttle.after_op(spent)
        self._bind_outputs(info, args, kwargs, result, outs, snapshot)
        return result

    def begin_batch(self) -> None:
        """The ops until ``end_batch`` (a frame's run of them) take one turn of the compute
        share: one device lock and share-table update for them all, not one per op (with
        16 sessions on a GPU the per-op turn cost more than the tiny ops themselves)."""
        throttle = self.throttle
        if throttle is None or self._batch is not None:
            return
        throttle.before_op()
        self._batch = (throttle, self.busy_s, self.n_ops)
        self.throttle = None

    def end_batch(self) -> None:
        batch = self._batch
        if batch is None:
            return
        throttle, busy0, ops0 = batch
        self._batch = None
        self.throttle = throttle
        throttle.after_op(self.busy_s - busy0, self.n_ops - ops0)

    def batch_full(self) -> bool:
        """A batch is cut after BATCH_MAX_S of busy time, so that turns stay short."""
        batch = self._batch
        return batch is not None and self.busy_s - batch[1] >= BATCH_MAX_S

    def threads_for(self, info: OpInfo, large: bool) -> int:
        """All threads for a large op (one fewer while the client runs: all_threads); for
        a small one, one thread, or exactly the local count if its bits depend on the
        count (_PER_THREAD_WORDS)."""
        if large:
            return self.all_threads()
        return self.threads if info.exact_threads else 1

    def is_large(self, info: OpInfo, args: list) -> bool:
        scale = self._parallel_scale
        if scale == 0:
            return True
        limit = info.parallel_min * scale
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.numel() >= limit:
                    return True
            elif type(a) is list and sum(t.numel() for t in a
                                         if isinstance(t, torch.Tensor)) >= limit:
                # A for-each op (an optimizer's step) runs its tensors one after another,
                # each large one on all threads: what counts is the list's total.
                return True
        return False

    def all_threads(self) -> int:
        """The threads a large op gets: one fewer while a co-located client is running."""
        running = self.client_running
        if running is not None and running():
            return max(self.threads - 1, 1)
        return self.threads

    def use_threads(self, n: int) -> None:
        if n != self._threads_now:
            torch.set_num_threads(n)
            self._threads_now = n

    def call(self, fn: Callable[..., Any], args: Any, kwargs: dict) -> Any:
        """Run a kernel (or a graph of them) for the session: its time and count go to the
        session's stats, a kernel out of memory is the client's OutOfMemoryError."""
        t0 = time.perf_counter()
        try:
            return self.kernel(fn, args, kwargs)
        finally:
            self.busy_s += time.perf_counter() - t0

    def kernel(self, fn: Callable[..., Any], args: Any, kwargs: dict) -> Any:
        """``call`` for a caller that charges the time itself (a graph replay, once)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            oom = out_of_memory(exc, self.ledger)
            if oom is not None:
                raise oom from None
            raise
        finally:
            self.n_ops += 1

    def _guard(self, info: OpInfo, a: _Args) -> None:
        """Refuse what the op must not be asked before it runs."""
        for name in info.device_args:
            dev = a.get(name)
            # The codec only produces the session's device and the host; a string or int
            # here could name another GPU of this machine (or "meta").
            if dev is not None and not isinstance(dev, torch.device):
                raise SessionError("RuntimeError", f"device argument {dev!r} is not allowed: "
                                   "a vGPU op runs on its own device")
        if info.unsafe_flag and a.get("unsafe"):
            raise SessionError("RuntimeError", f"{info.name} with unsafe=True is not allowed "
                               "on a vGPU")
        if info.sizer is not None:
            try:
                need = info.sizer(a)
            except (TypeError, ValueError, OverflowError, RuntimeError):
                need = None  # not the argument types we expect; the op will say why
            if need is not None and need > self.ledger.limit - self.ledger.used:
                raise SessionError("OutOfMemoryError", oom_message(need, self.ledger))

    def _snapshot(self, info: OpInfo, args: list, kwargs: dict) -> _Snapshot:
        written = []
        a = _Args(info.names, args, kwargs)
        for name in info.written:
            for t in _tensors(a.get(name)):
                written.append((t, t.untyped_storage(), t.storage_offset(), tuple(t.shape),
                                tuple(t.stride())))
        storages = {}
        for t in _tensors([args, list(kwargs.values())]):
            st = t.untyped_storage()
            storages[st._cdata] = (st, st.nbytes())
        return _Snapshot(written, storages)

    def _rollback(self, snap: _Snapshot) -> None:
        """Undo the storage growth of an op that took the session past its quota: put the
        written tensors back on their old storage and shape, then shrink every storage to
        its old size (no tensor of the table describes more than that any more)."""
        for t, st, offset, shape, stride in snap.written:
            t.set_(st, offset, shape, stride)
        for st, nbytes in snap.storages.values():
            if st.nbytes() > nbytes:
                with contextlib.suppress(RuntimeError):  # a storage that cannot shrink stays counted
                    st.resize_(nbytes)
        for t in _tensors([[w[0] for w in snap.written]]):
            self.ledger.refresh(t)
        for t in self.tensors.values():
            if t.untyped_storage()._cdata in snap.storages:
                self.ledger.refresh(t)

    def _bind_outputs(self, info: OpInfo, args: list, kwargs: dict, result: Any, outs: list,
                      snapshot: _Snapshot | None) -> None:
        ledger = self.ledger
        before = ledger.used
        # In-place and out= ops may resize (or, for set_, swap) what they write.
        if info.recount:
            n_args = len(args)
            for i, name in info.written_at:
                v = args[i] if i < n_args else kwargs.get(name)
                if isinstance(v, torch.Tensor):
                    ledger.refresh(v)
                elif v is not None:
                    for t in _tensors(v):
                        ledger.refresh(t)
        if snapshot is not None:  # set_ may grow the storage of a tensor it only reads
            for t in _tensors([args, list(kwargs.values())]):
                ledger.refresh(t)
        stored: list[int] = []
        try:
            if len(outs) == 1 and isinstance(result, torch.Tensor) and not info.recount \
                    and snapshot is None:
                h = outs[0]  # most ops: one new tensor, nothing resized (the loop, unrolled)
                if h > 0:
                    self._check_storable(result)
                    self._hold(h, result)
                    stored.append(h)
            elif outs:
                # Out handles are ints (checked in run); the flattened result only tensors.
                flat = [result] if isinstance(result, torch.Tensor) else _flatten(result)
                if len(flat) != len(outs):
                    raise SessionError("RuntimeError", f"operator returned {len(flat)} tensors, "
                                       f"client expected {len(outs)}")
                recount = info.recount or snapshot is not None
                for h, t in zip(outs, flat, strict=True):
                    if h > 0:
                        self._check_storable(t)
                        self._hold(h, t)
                        stored.append(h)
                    elif recount:  # an input returned: only these ops change its storage
                        ledger.refresh(t)
        except SessionError:
            self._undo(stored, snapshot)
            raise
        if ledger.used > ledger.limit:
            grew = ledger.used - before
            self._undo(stored, snapshot)
            raise SessionError("OutOfMemoryError", oom_message(grew, ledger))

    def _undo(self, stored: list[int], snapshot: _Snapshot | None) -> None:
        """A failed op leaves nothing behind: no new handles, no grown storage."""
        self.free(stored)
        if snapshot is not None:
            self._rollback(snapshot)

    def keep(self, outs: list, tensors: list[torch.Tensor]) -> None:
        """Store the outputs of a CMD_CALL op (their sizes depend on the data), within quota."""
        if not isinstance(outs, list):
            raise SessionError("ProtocolError", "out handles must be an array")
        self.store_within_quota(zip(outs, tensors, strict=False))

    def store_within_quota(self, pairs: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Store (handle, tensor) pairs all or none: none if they take the session past
        its quota (OutOfMemoryError) or one cannot be stored."""
        before = self.ledger.used
        stored: list[int] = []
        try:
            for h, t in pairs:
                self.store(h, t)
                stored.append(h)
        except SessionError:
            self.free(stored)
            raise
        if self.ledger.over():
            grew = self.ledger.used - before
            self.free(stored)
            raise SessionError("OutOfMemoryError", oom_message(grew, self.ledger))

    def check_alloc(self, nbytes: int) -> None:
        if self.ledger.used + nbytes > self.ledger.limit:
            raise SessionError("OutOfMemoryError", oom_message(nbytes, self.ledger))


def _parallel_scale() -> float:
    """ORION_EMULATED_PARALLEL_MIN as a factor of PARALLEL_MIN (0: never narrow)."""
    raw = os.environ.get(PARALLEL_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = int(raw)
    except ValueError:
        log.warning("%s=%r is not a number of elements; using %d", PARALLEL_ENV, raw,
                    PARALLEL_MIN)
        return 1.0
    return max(value, 0) / PARALLEL_MIN


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in an argument (a tensor, or lists of them, nested; no recursion, so a
    deeply nested argument cannot exhaust the stack)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))


def _flatten(result: Any) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        flat: list = []
        for r in result:
            if isinstance(r, (tuple, list)):
                flat.extend(r)
            elif isinstance(r, torch.Tensor) or r is None:
                flat.append(r)
        return [t for t in flat if isinstance(t, torch.Tensor)]
    return []


def _check_args(args: list, kwargs: dict) -> None:
    """Every handle the op names must be held (runs for every op: no generators)."""
    for a in args:
        if type(a) is Missing or (type(a) is list and _missing_in(a)):
            _raise_missing(a)
    if kwargs:
        for v in kwargs.values():
            if type(v) is Missing or (type(v) is list and _missing_in(v)):
                _raise_missing(v)


def _missing_in(items: list) -> bool:
    stack = [items]  # no recursion: a deeply nested argument cannot exhaust the stack
    while stack:
        for v in stack.pop():
            if type(v) is Missing:
                return True
            if type(v) is list:
                stack.append(v)
    return False


def _raise_missing(value: Any) -> None:
    stack = [value]
    while stack:  # the first missing handle, in argument order, is the one reported
        v = stack.pop()
        if type(v) is Missing:
            raise SessionError("RuntimeError", v.why or f"tensor handle {v.handle} is not held "
                               "by this session (freed, or never created because of an "
                               "earlier error)")
        if type(v) is list:
            stack.extend(reversed(v))
