"""Collectives of ``torch.distributed`` programs, run between the workers that hold the tensors.

A client's Orion process group (``orion_vgpu.client.distributed``) names a group by an id
of its own session. ``CMD_PG_INIT`` sets the group up (the rank-0 worker opens a store that
the other workers dial; each worker then joins a gloo group, or NCCL on CUDA devices), and
every ``CMD_COLLECTIVE`` runs one collective on this session's tensors, in place, in the
session's command order: later ops see the result without the client waiting.

A collective never runs forever: every group has the program's timeout, and a peer whose
worker ended (its client died, its server stopped) closes its connections, so the others
fail at once. A failed group is dropped, which closes this worker's connections in turn:
one failure ends the group on every rank, each with its own error, instead of leaving
peers waiting for the timeout.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from orion_vgpu.server.executor import Executor, Missing, SessionError, oom_message

log = logging.getLogger("orion.session")

MAX_GROUPS = 64              # process groups one session may hold at once
MAX_WORLD = 1 << 16
MAX_TIMEOUT_S = 7 * 24 * 3600.0
DEFAULT_BUCKET_BYTES = 25 << 20
_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "band": dist.ReduceOp.BAND,
    "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR,
}


@dataclass
class _Group:
    pg: Any
    name: str
    rank: int
    size: int
    backend: str
    where: str
    store: Any
    count: int = 0
    nbytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class Collectives:
    """The process groups of one session, keyed by the client's group ids."""

    def __init__(self, ex: Executor, device: torch.device, session: str) -> None:
        self.ex = ex
        self.device = device
        self.session = session
        self.groups: dict[int, _Group] = {}
        self.listening: dict[int, Any] = {}  # pg id -> store this worker hosts (rank 0)
        self.failed: dict[int, str] = {}     # pg id -> why it ended

    # set-up ----------------------------------------------------------------------------
    def init(self, cmd: list) -> dict:
        """``[CMD_PG_INIT, pg_id, spec]``: answered with what the client needs next."""
        if len(cmd) != 3 or not isinstance(cmd[2], dict):
            raise SessionError("ProtocolError", "process group set-up needs [kind, id, spec]")
        pg_id, spec = _pg_id(cmd[1]), cmd[2]
        step = spec.get("step")
        if step == "listen":
            return self._listen(pg_id, _timeout(spec))
        if step == "join":
            self._join(pg_id, spec)
            return {}
        raise SessionError("ProtocolError", f"unknown process group step {step!r}")

    def _listen(self, pg_id: int, timeout: timedelta) -> dict:
        """Rank 0's worker hosts the store the group's workers meet at."""
        if pg_id in self.listening or pg_id in self.groups:
            raise SessionError("RuntimeError", f"process group {pg_id} is already set up")
        self._check_room()
        store = dist.TCPStore("0.0.0.0", 0, None, True, timeout=timeout, wait_for_workers=False)
        self.listening[pg_id] = store
        return {"port": int(store.port)}

    def _join(self, pg_id: int, spec: dict) -> None:
        if pg_id in self.groups:
            raise SessionError("RuntimeError", f"process group {pg_id} is already set up")
        self._check_room()
        host, port, prefix = spec.get("host"), spec.get("port"), spec.get("prefix")
        rank, size, name = spec.get("rank"), spec.get("size"), str(spec.get("name", pg_id))[:64]
        if not (isinstance(host, str) and 0 < len(host) <= 255 and type(port) is int
                and 0 < port < 65536 and isinstance(prefix, str) and 0 < len(prefix) <= 128
                and type(rank) is int and type(size) is int and 0 <= rank < size <= MAX_WORLD):
            raise SessionError("ProtocolError", "malformed process group spec")
        timeout = _timeout(spec)
        store = self.listening.pop(pg_id, None)
        try:
            if store is None:
                store = dist.TCPStore(host, port, None, False, timeout=timeout,
                                      wait_for_workers=False)
            local = _route_source(host, port)
            pg, backend = _new_backend(dist.PrefixStore(f"orion/{prefix}/", store), rank, size,
                                       timeout, self.device, local)
        except (RuntimeError, OSError, ValueError) as exc:
            raise SessionError("DistBackendError", f"process group {name} (rank {rank} of "
                               f"{size}) could not connect its vGPU servers through "
                               f"{host}:{port}: {_first_line(exc)}") from None
        where = f"{host}:{port}, local address {local}"
        self.groups[pg_id] = _Group(pg, name, rank, size, backend, where, store)
        log.info("session %s joined process group %s as rank %d of %d (%s; store %s)",
                 self.session, name, rank, size, backend, where)

    def _check_room(self) -> None:
        if len(self.groups) + len(self.listening) >= MAX_GROUPS:
            raise SessionError("RuntimeError", f"a session may hold at most {MAX_GROUPS} "
                               "process groups at once")

    # collectives -----------------------------------------------------------------------
    def run(self, cmd: list) -> None:
        """``[CMD_COLLECTIVE, pg_id, kind, args]``: one collective, in command order."""
        if len(cmd) != 4 or not isinstance(cmd[2], str) or not isinstance(cmd[3], dict):
            raise SessionError("ProtocolError", "a collective needs [kind, id, name, args]")
        pg_id, kind, args = _pg_id(cmd[1]), cmd[2], cmd[3]
        if kind == "destroy":
            self._drop(pg_id, None)
            return
        group = self.groups.get(pg_id)
        if group is None:
            why = self.failed.get(pg_id)
            raise SessionError("DistBackendError", f"process group {pg_id} is not usable: "
                               f"{why or 'it was never set up on this vGPU'}")
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise SessionError("ProtocolError", f"unknown collective {kind!r}")
        try:
            moved = handler(self, group, args)
        except SessionError as exc:
            failure = (exc.kind, str(exc))
        except Exception as exc:  # gloo/NCCL: a peer went away, a timeout, a size mismatch
            failure = ("DistBackendError", _explain(exc))
        else:
            group.count += 1
            group.nbytes += moved
            group.kinds[kind] = group.kinds.get(kind, 0) + 1
            return
        # Out of the except block: no traceback keeps the group's backend alive, so
        # dropping it closes its connections now.
        text = (f"collective {kind} of process group {group.name} (rank {group.rank} of "
                f"{group.size}) failed: {failure[1]}")
        log.info("session %s %s", self.session, text)
        del group
        self._drop(pg_id, text)
        raise SessionError(failure[0], text)

    def _drop(self, pg_id: int, why: str | None) -> None:
        """Forget a group; dropping the backend closes its connections, so peers still
        waiting in a collective of it fail at once instead of at the timeout."""
        group = self.groups.pop(pg_id, None)
        self.listening.pop(pg_id, None)
        if why is not None:
            self.failed[pg_id] = why
            while len(self.failed) > MAX_GROUPS:  # a client cycling groups cannot grow it
                self.failed.pop(next(iter(self.failed)))
        if group is not None:
            log.info("session %s left process group %s: %s", self.session, group.name,
                     _summary(group))
            del group
            gc.collect()  # a reference cycle must not keep the connections open

    def close(self) -> None:
        for pg_id in list(self.groups):
            self._drop(pg_id, None)
        self.listening.clear()

    # helpers used by the handlers ------------------------------------------------------
    @contextlib.contextmanager
    def scratch(self, nbytes: int) -> Iterator[None]:
        """Temporary device memory of a collective counts against the vGPU quota."""
        led = self.ex.ledger
        if nbytes and led.used + nbytes > led.limit:
            raise SessionError("OutOfMemoryError", oom_message(nbytes, led))
        led.used += nbytes
        led.peak = max(led.peak, led.used)
        try:
            yield
        finally:
            led.used -= nbytes


# -- handlers: each returns the bytes it moved ----------------------------------------------

def _allreduce(c: Collectives, g: _Group, a: dict) -> int:
    tensors, op = _tensors(a.get("tensors")), _op(a.get("op"))
    if op == "avg":
        _need_float(tensors)
    bucket = _bucket_bytes(a)
    for chunk in _buckets(tensors, bucket):
        _reduce_chunk(c, g, chunk, op)
    return sum(_nbytes(t) for t in tensors)


def _reduce_chunk(c: Collectives, g: _Group, chunk: list[torch.Tensor], op: str) -> None:
    opts = dist.AllreduceOptions()
    opts.reduceOp = _REDUCE_OPS[op]
    if len(chunk) == 1 and chunk[0].is_contiguous():
        t = chunk[0]
        if op == "avg":  # as DDP does: divide first, then sum
            t.div_(g.size)
        g.pg.allreduce([t], opts).wait()
        return
    with c.scratch(sum(_nbytes(t) for t in chunk)):
        flat = torch.cat([t.reshape(-1) for t in chunk])
        if op == "avg":
            flat.div_(g.size)
        g.pg.allreduce([flat], opts).wait()
        _unflatten(flat, chunk)


def _broadcast(c: Collectives, g: _Group, a: dict) -> int:
    tensors, src = _tensors(a.get("tensors")), _rank(a.get("src"), g)
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    for chunk in _buckets(tensors, _bucket_bytes(a)):
        if len(chunk) == 1 and chunk[0].is_contiguous():
            g.pg.broadcast([chunk[0]], opts).wait()
            continue
        with c.scratch(sum(_nbytes(t) for t in chunk)):
            flat = torch.cat([t.reshape(-1) for t in chunk])
            g.pg.broadcast([flat], opts).wait()
            _unflatten(flat, chunk)
    return sum(_nbytes(t) for t in tensors)


def _allgather(c: Collectives, g: _Group, a: dict) -> int:
    inputs = _tensors(a.get("inputs"))
    outputs = [_tensors(o) for o in _list(a.get("outputs"))]
    if len(outputs) != len(inputs) or any(len(o) != g.size for o in outputs):
        raise SessionError("ValueError", f"all_gather needs {g.size} output tensors per input")
    with _dense(c, inputs, False) as ins, _dense(c, [t for o in outputs for t in o], True) as flat:
        outs = [flat[i * g.size:(i + 1) * g.size] for i in range(len(inputs))]
        g.pg.allgather(outs, ins).wait()
    return sum(_nbytes(t) for o in outputs for t in o)


def _allgather_base(c: Collectives, g: _Group, a: dict) -> int:
    out, inp = _tensor(a.get("output")), _tensor(a.get("input"))
    if out.numel() != inp.numel() * g.size:
        raise SessionError("ValueError", "all_gather_into_tensor: the output must hold "
                           f"world size ({g.size}) times the input's elements")
    with _dense(c, [inp], False) as ins, _dense(c, [out], True) as outs:
        g.pg._allgather_base(outs[0], ins[0]).wait()
    return _nbytes(out)


def _reduce_scatter(c: Collectives, g: _Group, a: dict) -> int:
    op = _op(a.get("op"))
    outputs = _tensors(a.get("outputs"))
    inputs = [_tensors(i) for i in _list(a.get("inputs"))]
    if len(inputs) != len(outputs) or any(len(i) != g.size for i in inputs):
        raise SessionError("ValueError", f"reduce_scatter needs {g.size} input tensors per "
                           "output")
    if op == "avg":
        _need_float(outputs)
    opts = dist.ReduceScatterOptions()
    opts.reduceOp = _REDUCE_OPS[op]
    with _dense(c, [t for i in inputs for t in i], False) as flat, _dense(c, outputs, True) as outs:
        ins = [flat[i * g.size:(i + 1) * g.size] for i in range(len(outputs))]
        g.pg.reduce_scatter(outs, ins, opts).wait()
        if op == "avg":
            for t in outs:
                t.div_(g.size)
    return sum(_nbytes(t) for i in inputs for t in i)


def _reduce_scatter_base(c: Collectives, g: _Group, a: dict) -> int:
    op = _op(a.get("op"))
    out, inp = _tensor(a.get("output")), _tensor(a.get("input"))
    if inp.numel() != out.numel() * g.size:
        raise SessionError("ValueError", "reduce_scatter_tensor: the input must hold world "
                           f"size ({g.size}) times the output's elements")
    if op == "avg":
        _need_float([out])
    opts = dist.ReduceScatterOptions()
    opts.reduceOp = _REDUCE_OPS[op]
    with _dense(c, [inp], False) as ins, _dense(c, [out], True) as outs:
        g.pg._reduce_scatter_base(outs[0], ins[0], opts).wait()
        if op == "avg":
            outs[0].div_(g.size)
    return _nbytes(inp)


def _reduce(c: Collectives, g: _Group, a: dict) -> int:
    t, dst, op = _tensor(a.get("tensor")), _rank(a.get("dst"), g), _op(a.get("op"))
    if op == "avg":
        _need_float([t])
    opts = dist.ReduceOptions()
    opts.rootRank, opts.reduceOp = dst, _REDUCE_OPS[op]
    with _dense(c, [t], True) as ts:
        g.pg.reduce(ts, opts).wait()
        if op == "avg" and g.rank == dst:
            ts[0].div_(g.size)
    return _nbytes(t)


def _gather(c: Collectives, g: _Group, a: dict) -> int:
    inp, dst = _tensor(a.get("input")), _rank(a.get("dst"), g)
    outputs = _tensors(a.get("outputs")) if g.rank == dst else []
    if g.rank == dst and len(outputs) != g.size:
        raise SessionError("ValueError", f"gather needs {g.size} output tensors on rank {dst}")
    opts = dist.GatherOptions()
    opts.rootRank = dst
    with _dense(c, [inp], False) as ins, _dense(c, outputs, True) as outs:
        g.pg.gather([outs] if outs else [], ins, opts).wait()
    return _nbytes(inp)


def _scatter(c: Collectives, g: _Group, a: dict) -> int:
    out, src = _tensor(a.get("output")), _rank(a.get("src"), g)
    inputs = _tensors(a.get("inputs")) if g.rank == src else []
    if g.rank == src and len(inputs) != g.size:
        raise SessionError("ValueError", f"scatter needs {g.size} input tensors on rank {src}")
    opts = dist.ScatterOptions()
    opts.rootRank = src
    with _dense(c, inputs, False) as ins, _dense(c, [out], True) as outs:
        g.pg.scatter(outs, [ins] if ins else [], opts).wait()
    return _nbytes(out)


def _alltoall_base(c: Collectives, g: _Group, a: dict) -> int:
    out, inp = _tensor(a.get("output")), _tensor(a.get("input"))
    splits = [_int_list(a.get("out_splits")), _int_list(a.get("in_splits"))]
    with _dense(c, [inp], False) as ins, _dense(c, [out], True) as outs:
        g.pg.alltoall_base(outs[0], ins[0], splits[0], splits[1], dist.AllToAllOptions()).wait()
    return _nbytes(inp)


def _barrier(c: Collectives, g: _Group, a: dict) -> int:
    g.pg.barrier().wait()
    return 0


_HANDLERS: dict[str, Callable[[Collectives, _Group, dict], int]] = {
    "allreduce": _allreduce, "broadcast": _broadcast, "allgather": _allgather,
    "allgather_base": _allgather_base, "reduce_scatter": _reduce_scatter,
    "reduce_scatter_base": _reduce_scatter_base, "reduce": _reduce, "gather": _gather,
    "scatter": _scatter, "alltoall_base": _alltoall_base, "barrier": _barrier,
}


# -- argument checks (clients are untrusted) -------------------------------------------

def _pg_id(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 31:
        raise SessionError("ProtocolError", f"process group id {value!r} is not a small integer")
    return value


def _timeout(spec: dict) -> timedelta:
    t = spec.get("timeout_s")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= MAX_TIMEOUT_S:
        raise SessionError("ProtocolError", "process group timeout must be a positive number "
                           "of seconds")
    return timedelta(seconds=float(t))


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Missing):
        raise SessionError("RuntimeError", f"tensor handle {value.handle} is not held by this "
                           "session (freed, or never created because of an earlier error)")
    raise SessionError("ProtocolError", "a collective argument is not a tensor")


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise SessionError("ProtocolError", "a collective argument is not a list")
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    return [_tensor(v) for v in _list(value)]


def _int_list(value: Any) -> list[int]:
    items = _list(value)
    if not all(type(v) is int and v >= 0 for v in items):
        raise SessionError("ProtocolError", "split sizes must be non-negative integers")
    return items


def _rank(value: Any, g: _Group) -> int:
    if type(value) is not int or not 0 <= value < g.size:
        raise SessionError("ValueError", f"rank {value!r} is not in process group {g.name} "
                           f"of size {g.size}")
    return value


def _op(value: Any) -> str:
    if value not in _REDUCE_OPS:
        raise SessionError("ValueError", f"reduce op {value!r} is not supported on vGPUs")
    return str(value)


def _need_float(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            raise SessionError("ValueError", f"ReduceOp.AVG needs floating-point tensors, got "
                               f"{t.dtype}")


def _bucket_bytes(a: dict) -> int:
    b = a.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
    return b if type(b) is int and b > 0 else DEFAULT_BUCKET_BYTES


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _buckets(tensors: list[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, up to ``cap`` bytes a bucket (a larger tensor is
    a bucket of its own). Every rank holds the same shapes, so the buckets match."""
    chunk: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        n = _nbytes(t)
        if chunk and (t.dtype != chunk[0].dtype or size + n > cap):
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += n
    if chunk:
        yield chunk


def _unflatten(flat: torch.Tensor, chunk: list[torch.Tensor]) -> None:
    off = 0
    for t in chunk:
        n = t.numel()
        t.copy_(flat[off:off + n].view(t.shape))
        off += n


@contextlib.contextmanager
def _dense(c: Collectives, tensors: list[torch.Tensor], written: bool
           ) -> Iterator[list[torch.Tensor]]:
    """Contiguous stand-ins for the collective (gloo reads a strided view as if it were
    dense: silently wrong), copied back to the originals when the collective writes them."""
    loose = [t for t in tensors if not t.is_contiguous()]
    with c.scratch(sum(_nbytes(t) for t in loose)):
        dense = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        yield dense
        if written:
            for t, d in zip(tensors, dense, strict=True):
                if d is not t:
                    t.copy_(d)


# -- backends ---------------------------------------------------------------------------

def _new_backend(store: Any, rank: int, size: int, timeout: timedelta, device: torch.device,
                 local_addr: str) -> tuple[Any, str]:
    """The collective library of the worker's device: NCCL between CUDA GPUs, gloo on the
    host (emulated GPUs)."""
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL
        torch.cuda.set_device(device)
        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, size, opts), "nccl"
    from torch.distributed import ProcessGroupGloo
    opts = ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [ProcessGroupGloo.create_device(hostname=local_addr)]
    return ProcessGroupGloo(store, rank, size, opts), "gloo"


def _route_source(host: str, port: int) -> str:
    """This machine's address on the route to the store's host: the address peers reach
    this worker at (no packet is sent; a UDP connect only picks the route)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return str(s.getsockname()[0])


def _explain(exc: BaseException) -> str:
    text = _first_line(exc)
    low = text.lower()
    if "closed by peer" in low or "connection reset" in low or "broken pipe" in low:
        return ("a peer rank's vGPU session ended (its program exited or was killed, or its "
                f"server stopped; see that rank's output): {text}")
    if "timed out" in low or "timeout" in low:
        return ("a peer rank did not join the collective within the timeout (the "
                f"init_process_group timeout; see what that rank is doing): {text}")
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # gloo prefixes its source location ("[.../pair.cc:553] Connection closed by peer
    # [addr]:port. This is typically caused by ..."): keep what happened, not the advice
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically", 1)[0]
    return text[:400]


def _summary(g: _Group) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(g.kinds.items())) or "none"
    mib = g.nbytes / 2**20
    return f"{g.count} collectives ({kinds}), {mib:.2f} MiB through {g.backend}"

