"""``torch.distributed`` over vGPUs: backend "nccl" runs its collectives on the servers.

A CPU-only PyTorch has no NCCL, and a vGPU tensor's data is not in this process anyway.
When the runtime is active, a process group asked for with backend "nccl" (or none, or a
"cuda:nccl" pair) is an ``OrionProcessGroup``: ``dist.get_backend()`` still says what
the program asked for, and each collective is one ``CMD_COLLECTIVE`` command on the
session stream of the vGPU holding the tensors. The workers of the ranks form their own
group at the first collective (``CMD_PG_INIT``; the rank-0 worker hosts the store they
meet at, its address travels through the program's own rendezvous store) and run the
collective between themselves (``orion_vgpu.server.collectives``). Nothing waits: the
stream order on the worker makes later ops, fetches included, see the result, as CUDA
stream order does for NCCL. ``barrier()`` waits for its peers, as on a GPU.

Under torchrun with ORION_VGPU=n, ``cuda:LOCAL_RANK*n + j`` names this process's vGPU j
(``local_index``), so ``torch.cuda.set_device(local_rank)`` works as on a machine
with one GPU per rank.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from orion_vgpu.client import errors, frontend
from orion_vgpu.client.errors import OrionError
from orion_vgpu.client.frontend import RemoteTensor
from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import messages as m

BACKEND = "orion"
_SERVED = ("nccl", "undefined")  # backend names an Orion process group stands in for


class CollectiveError(OrionError, dist.DistBackendError):
    """A collective failed on the servers (a peer rank's session ended, a timeout):
    one line at top level, and still a ``DistBackendError`` for programs that catch it."""


def local_index(idx: int, count: Callable[[], int]) -> int:
    """The vGPU a program's CUDA index names. Under torchrun a rank's ``cuda:LOCAL_RANK``
    is its own GPU on a machine with one GPU per rank; here each rank has its own
    allocation of ``count()`` vGPUs, so that index (otherwise out of range) names vGPU 0.
    Outside torchrun, and for indices in range, nothing changes (``count`` is not even
    asked: reading the settings can fail, and that error belongs to the first use)."""
    local = os.environ.get("LOCAL_RANK", "")
    if idx == 0 or not local.isdigit():
        return idx
    n = count()
    if idx < n:
        return idx
    j = idx - int(local) * n
    return j if 0 <= j < n else idx


# --------------------------------------------------------------------------- work
class OrionWork(dist.Work):
    """A collective queued on the session stream: complete as far as the program can
    tell (later ops run after it on the server). ``wait()`` blocks only for a barrier."""

    def __init__(self, result: list, conn: Any = None) -> None:
        super().__init__()
        self._result = result
        self._conn = conn

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.request([m.CMD_SYNC])
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> Any:
        return None

    def result(self) -> list:
        return self._result

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        self.wait()
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(self._result)
        return fut


# --------------------------------------------------------------------------- group
_generation: dict[str, int] = {}


def _op(opts: Any) -> str:
    op = getattr(opts, "reduceOp", opts)
    op = getattr(op, "op", op)  # ReduceOp -> RedOpType
    name = getattr(op, "name", str(op)).lower()
    if name == "premul_sum":
        raise ValueError("ReduceOp.PREMUL_SUM is not supported on vGPUs")
    return name


def _pairwise(one: Callable[..., OrionWork], outputs: list, inputs: list,
              opts: Any) -> OrionWork:
    """A coalesced collective: the single-tensor one for each (output, input) pair, in
    order on the session stream (one work covers them all)."""
    for o, i in zip(outputs, inputs, strict=True):
        one(o, i, opts)
    return OrionWork(list(outputs))


class OrionProcessGroup(dist.ProcessGroup):
    """A process group whose collectives run between the servers holding the tensors."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta, name: str,
                 backend_name: str) -> None:
        super().__init__(rank, size)
        self._store = store
        self._timeout_s = max(1.0, timeout.total_seconds())
        self._name = name
        self._backend_name = backend_name
        self._id = _next_id()
        self._dev: int | None = None
        _generation[name] = _generation.get(name, 0) + 1
        self._key = (f"orion-workers/{_generation[name]}/"
                     f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")

    def getBackendName(self) -> str:  # noqa: N802 (the C++ name)
        return self._backend_name

    def __repr__(self) -> str:
        return (f"OrionProcessGroup(name={self._name!r}, rank={self.rank()}, size={self.size()}, "
                f"vgpu={self._dev})")

    # set-up on first use ---------------------------------------------------------------
    def _bind(self, dev: int) -> Any:
        """The session of vGPU ``dev``, its worker a member of this group's worker group."""
        try:
            conn = get_runtime().conn(dev)
        except OrionError as exc:  # no vGPU (the pool refused): the peers need not wait
            if self._dev is None and self.rank() == 0:
                self._store.set(self._key, json.dumps({"error": str(exc)}))
            raise
        if self._dev == dev:
            return conn
        if self._dev is not None:
            raise RuntimeError(f"process group {self._name} runs on cuda:{self._dev} in this "
                               f"rank; a tensor on cuda:{dev} cannot join its collectives "
                               "(use one vGPU per rank, or a group per vGPU)")
        meet = self._rendezvous(conn, dev)
        spec = {"step": "join", "host": meet["host"], "port": meet["port"],
                "prefix": meet["prefix"], "rank": self.rank(), "size": self.size(),
                "timeout_s": self._timeout_s, "name": self._name}
        try:
            conn.request([m.CMD_PG_INIT, self._id, spec])
        except CollectiveError:
            raise
        except RuntimeError as exc:
            raise CollectiveError(f"process group {self._name}: {exc}") from None
        self._dev = dev
        return conn

    def _rendezvous(self, conn: Any, dev: int) -> dict:
        """Rank 0's worker opens the store; its address reaches the other ranks through
        the program's own store (every rank can reach it: it rendezvoused there)."""
        if self.rank() == 0:
            try:
                port = conn.request([m.CMD_PG_INIT, self._id, {
                    "step": "listen", "timeout_s": self._timeout_s}])[1]["port"]
            except RuntimeError as exc:
                self._store.set(self._key, json.dumps({"error": str(exc)}))
                raise CollectiveError(f"process group {self._name}: the vGPU server could not "
                                      f"host the group's store: {exc}") from None
            host = str(get_runtime().alloc["vgpus"][dev]["node_addr"]).rpartition(":")[0]
            meet = {"host": host.strip("[]"), "port": port, "prefix": secrets.token_hex(16)}
            self._store.set(self._key, json.dumps(meet))
            return meet
        meet = json.loads(self._store.get(self._key))
        if "error" in meet:
            raise CollectiveError(f"process group {self._name}: rank 0 could not set up the "
                                  f"group: {meet['error']}")
        return meet

    # plumbing --------------------------------------------------------------------------
    def _device(self, tensors: list[torch.Tensor]) -> int:
        devs = {t._dev for t in tensors if isinstance(t, RemoteTensor)}
        if len(devs) > 1:
            raise RuntimeError(f"tensors of one collective are on different vGPUs: {sorted(devs)}")
        if devs:
            return devs.pop()
        if self._dev is not None:
            return self._dev
        from orion_vgpu.client.cuda_api import current_device
        return current_device()

    def _run(self, kind: str, build: Any, tensors: list[torch.Tensor], written: list[torch.Tensor],
             result: list, *, sync: bool = False) -> OrionWork:
        """Queue one collective. ``build(enc)`` makes its arguments, ``enc`` naming a
        tensor by handle; host tensors are staged through the vGPU (object collectives
        and CPU tensors work as with a CPU backend, a copy each way)."""
        dev = self._device(tensors)
        conn = self._bind(dev)
        staged: dict[int, RemoteTensor] = {}
        for t in tensors:
            if not isinstance(t, RemoteTensor) and id(t) not in staged:
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    raise RuntimeError(f"a collective of backend {self._backend_name} takes "
                                       f"vGPU or host tensors, got {type(t).__name__}")
                staged[id(t)] = frontend.upload(t, dev)

        def enc(t: torch.Tensor) -> Any:
            return frontend.server_ext(staged[id(t)] if id(t) in staged else t)

        args = build(enc)
        with conn.lock:
            conn.push([m.CMD_COLLECTIVE, self._id, kind, args])
            conn.flush()  # peers may be waiting for this rank already: send it now
        for t in written:
            if id(t) in staged:
                t.copy_(staged[id(t)])  # a fetch: it also waits for the collective
        return OrionWork(result, conn if sync else None)

    # collectives -----------------------------------------------------------------------
    def allreduce(self, tensors: Any, opts: Any = None, *,
                  bucket_bytes: int | None = None) -> OrionWork:
        """One command for all ``tensors``: the workers reduce them in buckets of
        ``bucket_bytes`` (DDP's ``bucket_cap_mb``; 25 MiB by default)."""
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        op = _op(opts if opts is not None else dist.ReduceOp.SUM)

        def build(e: Any) -> dict:
            args = {"tensors": [e(t) for t in tensors], "op": op}
            if bucket_bytes:
                args["bucket_bytes"] = int(bucket_bytes)
            return args
        return self._run("allreduce", build, tensors, tensors, tensors)

    def allreduce_coalesced(self, tensors: list, opts: Any = None) -> OrionWork:
        return self.allreduce(list(tensors), opts)

    def broadcast(self, tensors: Any, opts: Any = None) -> OrionWork:
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        src = getattr(opts, "rootRank", 0) if opts is not None else 0
        return self._run("broadcast", lambda e: {"tensors": [e(t) for t in tensors], "src": src},
                         tensors, tensors, tensors)

    def allgather(self, output_tensors: list, input_tensors: Any, opts: Any = None) -> OrionWork:
        if isinstance(input_tensors, torch.Tensor):  # the pg.allgather(list, tensor) form
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        outs = [list(o) for o in output_tensors]
        flat = [t for o in outs for t in o]
        return self._run("allgather", lambda e: {
            "outputs": [[e(t) for t in o] for o in outs],
            "inputs": [e(t) for t in input_tensors]}, list(input_tensors) + flat, flat, outs)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor,
                        opts: Any = None) -> OrionWork:
        return self._run("allgather_base", lambda e: {"output": e(output), "input": e(input)},
                         [output, input], [output], [output])

    all_gather_single = _allgather_base

    def allgather_into_tensor_coalesced(self, outputs: list, inputs: list,
                                        opts: Any = None) -> OrionWork:
        return _pairwise(self._allgather_base, outputs, inputs, opts)

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    def reduce_scatter(self, output_tensors: Any, input_tensors: list,
                       opts: Any = None) -> OrionWork:
        if isinstance(output_tensors, torch.Tensor):
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        outs, ins = list(output_tensors), [list(i) for i in input_tensors]
        flat = [t for i in ins for t in i]
        op = _op(opts if opts is not None else dist.ReduceOp.SUM)
        return self._run("reduce_scatter", lambda e: {
            "outputs": [e(t) for t in outs], "inputs": [[e(t) for t in i] for i in ins],
            "op": op}, outs + flat, outs, outs)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor,
                             opts: Any = None) -> OrionWork:
        op = _op(opts if opts is not None else dist.ReduceOp.SUM)
        return self._run("reduce_scatter_base", lambda e: {
            "output": e(output), "input": e(input), "op": op}, [output, input], [output],
            [output])

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(self, outputs: list, inputs: list,
                                        opts: Any = None) -> OrionWork:
        return _pairwise(self._reduce_scatter_base, outputs, inputs, opts)

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    def reduce(self, tensors: Any, opts: Any = None) -> OrionWork:
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        dst = getattr(opts, "rootRank", 0) if opts is not None else 0
        op = _op(opts if opts is not None else dist.ReduceOp.SUM)
        t = tensors[0]
        return self._run("reduce", lambda e: {"tensor": e(t), "dst": dst, "op": op},
                         [t], [t], tensors)

    def gather(self, output_tensors: list, input_tensors: Any, opts: Any = None) -> OrionWork:
        if isinstance(input_tensors, torch.Tensor):
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        dst = getattr(opts, "rootRank", 0) if opts is not None else 0
        outs = list(output_tensors[0]) if output_tensors else []
        inp = input_tensors[0]
        return self._run("gather", lambda e: {"outputs": [e(t) for t in outs], "input": e(inp),
                                              "dst": dst}, [inp] + outs, outs, [outs])

    def scatter(self, output_tensors: Any, input_tensors: list, opts: Any = None) -> OrionWork:
        if isinstance(output_tensors, torch.Tensor):
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        src = getattr(opts, "rootRank", 0) if opts is not None else 0
        out = output_tensors[0]
        ins = list(input_tensors[0]) if input_tensors else []
        return self._run("scatter", lambda e: {"output": e(out), "inputs": [e(t) for t in ins],
                                               "src": src}, [out] + ins, [out], [out])

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list,
                      input_split_sizes: list, opts: Any = None) -> OrionWork:
        outs, ins = [int(s) for s in output_split_sizes], [int(s) for s in input_split_sizes]
        return self._run("alltoall_base", lambda e: {
            "output": e(output), "input": e(input), "out_splits": outs, "in_splits": ins},
            [output, input], [output], [output])

    all_to_all_single = alltoall_base

    def alltoall(self, output_tensors: list, input_tensors: list, opts: Any = None) -> OrionWork:
        raise NotImplementedError("all_to_all with tensor lists is not supported on vGPUs; use "
                                  "all_to_all_single")

    def barrier(self, opts: Any = None) -> OrionWork:
        ids = list(getattr(opts, "device_ids", None) or [])
        dev = local_index(int(ids[0]), _device_count) if ids else None
        if dev is not None and self._dev is None:
            self._bind(dev)
        return self._run("barrier", lambda e: {}, [], [], [], sync=True)

    def send(self, tensors: list, dst: int, tag: int = 0) -> OrionWork:
        raise NotImplementedError("point-to-point send/recv is not supported on vGPUs yet; use "
                                  "broadcast or all_to_all_single")

    def recv(self, tensors: list, src: int, tag: int = 0) -> OrionWork:
        raise NotImplementedError("point-to-point send/recv is not supported on vGPUs yet; use "
                                  "broadcast or all_to_all_single")

    def shutdown(self) -> None:
        """``destroy_process_group``: the workers leave their group."""
        if self._dev is not None:
            dev, self._dev = self._dev, None
            with contextlib.suppress(Exception):  # the session may be gone already
                conn = get_runtime().conn(dev)
                with conn.lock:
                    conn.push([m.CMD_COLLECTIVE, self._id, "destroy", {}])

    abort = shutdown


def _device_count() -> int:
    return get_runtime().device_count


_ids = iter(range(1, 1 << 31))


def _next_id() -> int:
    return next(_ids)


# --------------------------------------------------------------------------- init
_request: dict[str, Any] = {}


def _create(opts: Any, backend_options: Any = None) -> OrionProcessGroup:
    """``register_backend`` creator (extended API: it knows the group's name)."""
    return OrionProcessGroup(opts.store, opts.group_rank, opts.group_size, opts.timeout,
                             str(opts.group_id), _request.get("name", "nccl"))


def _served(backend: Any) -> str | None:
    """The backend name to report if an Orion group should serve ``backend``."""
    name = str(backend).lower() if backend is not None else "undefined"
    if name in _SERVED:
        return "nccl"
    pairs = dict(p.split(":", 1) for p in name.split(",") if ":" in p)
    return name if pairs.get("cuda") == "nccl" else None


_orig_helper: Any = None
_orig_init: Any = None


def _init_process_group(*args: Any, **kwargs: Any) -> Any:
    """``init_process_group(device_id=cuda:LOCAL_RANK)`` names this rank's vGPU, as
    ``torch.cuda.set_device`` does (see ``local_index``)."""
    bound = inspect.signature(_orig_init).bind(*args, **kwargs)
    dev = bound.arguments.get("device_id")
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = torch.device("cuda", dev)
    if isinstance(dev, torch.device) and dev.type == "cuda" and dev.index is not None:
        bound.arguments["device_id"] = torch.device("cuda", local_index(dev.index, _device_count))
    return _orig_init(*bound.args, **bound.kwargs)


def _new_process_group_helper(*args: Any, **kwargs: Any) -> Any:
    """``init_process_group`` / ``new_group`` with an Orion group for "nccl"."""
    bound = inspect.signature(_orig_helper).bind(*args, **kwargs)
    asked = bound.arguments.get("backend")
    name = _served(asked)
    if name is None:
        return _orig_helper(*args, **kwargs)
    bound.arguments["backend"] = dist.Backend(BACKEND)
    bound.arguments["device_id"] = None  # a vGPU has no communicator to bind eagerly
    _request["name"] = name
    try:
        pg, store = _orig_helper(*bound.args, **bound.kwargs)
    finally:
        _request.clear()
    if isinstance(pg, OrionProcessGroup):
        c10d._world.pg_map[pg] = (name, store)
        c10d._world.pg_backend_config[pg] = name if ":" in name else f"cuda:{name}"
    return pg, store


def install() -> None:
    """Serve "nccl" process groups and DDP with Orion (called by ``cuda_api.activate``)."""
    global _orig_helper, _orig_init
    if _orig_helper is not None or not dist.is_available():
        return
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cuda", "cpu"])
    _orig_helper = c10d._new_process_group_helper
    c10d._new_process_group_helper = _new_process_group_helper
    _orig_init = c10d.init_process_group
    dist.init_process_group = c10d.init_process_group = _init_process_group
    errors._REMOTE_TYPES["DistBackendError"] = CollectiveError
    from orion_vgpu.client import ddp
    ddp.install()
