"""Executes one session's commands on its device: handle table, allowlist, memory quota.

The client names tensors by handle only; this table is the session's whole world, so a
session can neither read nor free another session's tensors.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger("orion.session")

ALLOWED_NAMESPACES = frozenset({"aten", "prims"})
# Allowlisted namespaces still hold a few ops that reach outside the device.
DENIED_OPS = frozenset({
    "aten::from_file", "aten::_pin_memory", "aten::pin_memory", "aten::record_stream",
    "aten::set_.source_Storage", "aten::set_.source_Storage_storage_offset",
    "aten::_copy_from_and_resize", "aten::_efficientzerotensor",
})
MAX_NUMEL = 1 << 40


class SessionError(Exception):
    """An error to report to the client at its next sync point."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Missing:
    """A handle the client named that this session does not hold."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle


def resolve_op(name: str) -> Any:
    """Resolve ``ns::op.overload`` against the allowlist, never anything else."""
    if not isinstance(name, str) or "::" not in name or name in DENIED_OPS:
        raise SessionError("RuntimeError", f"operator {name!r} is not allowed on a vGPU")
    ns, rest = name.split("::", 1)
    if ns not in ALLOWED_NAMESPACES:
        raise SessionError("RuntimeError", f"operator {name!r} is not allowed on a vGPU "
                           f"(only {', '.join(sorted(ALLOWED_NAMESPACES))} operators run remotely)")
    op_name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, ns), op_name)
        op = getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise SessionError("RuntimeError", f"unknown operator {name!r}") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise SessionError("RuntimeError", f"unknown operator {name!r}")
    return op


class MemoryLedger:
    """Bytes held per storage, so views and in-place ops are counted once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage key -> [nbytes, refs]

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[int, int]:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()

    def add(self, t: torch.Tensor) -> None:
        ptr, nbytes = self._key(t)
        entry = self._storages.get(ptr)
        if entry is None:
            self._storages[ptr] = [nbytes, 1]
            self.used += nbytes
        else:
            entry[1] += 1
            if nbytes != entry[0]:  # resized in place
                self.used += nbytes - entry[0]
                entry[0] = nbytes
        if self.used > self.peak:
            self.peak = self.used

    def refresh(self, t: torch.Tensor) -> None:
        ptr, nbytes = self._key(t)
        entry = self._storages.get(ptr)
        if entry is not None and entry[0] != nbytes:
            self.used += nbytes - entry[0]
            entry[0] = nbytes
            self.peak = max(self.peak, self.used)

    def remove(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._storages[ptr]
            self.used -= entry[0]

    def over(self) -> bool:
        return self.used > self.limit


def oom_message(requested: int, ledger: MemoryLedger) -> str:
    mib = 1 << 20
    return (f"CUDA out of memory. Tried to allocate {requested / mib:.2f} MiB. vGPU has a total "
            f"capacity of {ledger.limit / mib:.2f} MiB of which {(ledger.limit - ledger.used) / mib:.2f}"
            f" MiB is free (ORION_GMEM quota). Ask for a larger ORION_GMEM or use less memory.")


class Executor:
    def __init__(self, device: torch.device, gmem_bytes: int) -> None:
        self.device = device
        self.tensors: dict[int, torch.Tensor] = {}
        self.ops: dict[int, Any] = {}
        self.ledger = MemoryLedger(gmem_bytes)
        self.busy_s = 0.0
        self.n_ops = 0
        # Compute-share enforcement (orion_vgpu.server.throttle); None = run freely.
        self.throttle: Any = None

    # handles -----------------------------------------------------------------
    def resolve(self, handle: int) -> Any:
        t = self.tensors.get(handle)
        return Missing(handle) if t is None else t

    def store(self, handle: int, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise SessionError("RuntimeError", "operator returned a non-tensor where the client "
                               "expected a tensor")
        if handle <= 0:
            return
        old = self.tensors.get(handle)
        if old is not None:
            self.ledger.remove(old)
        self.tensors[handle] = t
        self.ledger.add(t)

    def free(self, handles: list[int]) -> None:
        for h in handles:
            t = self.tensors.pop(h, None)
            if t is not None:
                self.ledger.remove(t)

    # ops ---------------------------------------------------------------------
    def define(self, op_id: int, name: str) -> None:
        self.ops[op_id] = resolve_op(name)

    def run(self, op_id: int, args: list, kwargs: dict, outs: list) -> Any:
        op = self.ops.get(op_id)
        if op is None:
            raise SessionError("RuntimeError", f"operator id {op_id} was never defined")
        _check_args(args, kwargs)
        throttle = self.throttle
        if throttle is not None:
            throttle.before_op()
        t0 = time.perf_counter()
        try:
            result = op(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            raise SessionError("OutOfMemoryError", str(exc)) from None
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
                raise SessionError("OutOfMemoryError", oom_message(0, self.ledger)) from None
            raise
        finally:
            spent = time.perf_counter() - t0
            self.busy_s += spent
            self.n_ops += 1
            if throttle is not None:
                throttle.after_op(spent)
        self._bind_outputs(result, outs, args)
        return result

    def _bind_outputs(self, result: Any, outs: list, args: list) -> None:
        if not outs:
            for a in args[:1]:  # in-place ops may resize their target
                if isinstance(a, torch.Tensor):
                    self.ledger.refresh(a)
            return
        flat = _flatten(result)
        if len(flat) != len(outs):
            raise SessionError("RuntimeError", f"operator returned {len(flat)} tensors, client "
                               f"expected {len(outs)}")
        before = self.ledger.used
        for h, t in zip(outs, flat, strict=True):
            if h > 0:
                self.store(h, t)
            elif isinstance(t, torch.Tensor):
                self.ledger.refresh(t)
        if self.ledger.over():
            grew = self.ledger.used - before
            self.free([h for h in outs if h > 0])
            raise SessionError("OutOfMemoryError", oom_message(grew, self.ledger))

    def check_alloc(self, nbytes: int) -> None:
        if self.ledger.used + nbytes > self.ledger.limit:
            raise SessionError("OutOfMemoryError", oom_message(nbytes, self.ledger))


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
    for a in args:
        if isinstance(a, Missing):
            raise SessionError("RuntimeError", f"tensor handle {a.handle} is not held by this "
                               "session (freed, or never created because of an earlier error)")
        if isinstance(a, list):
            _check_args(a, {})
    for v in kwargs.values():
        if isinstance(v, Missing):
            raise SessionError("RuntimeError", f"tensor handle {v.handle} is not held by this "
                               "session")
