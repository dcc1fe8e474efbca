"""Collectives of a process group Orion does not serve (gloo, or any other) on vGPU
tensors: they run on host copies, as gloo's own CUDA support does.

Only "nccl" groups are Orion's (client/distributed.py): their collectives run between the
servers. Any other group reaches the dispatcher's ``c10d::`` ops (``allreduce_``,
``broadcast_``, ``allgather_``, ``send``, ``recv_`` ...) with vGPU tensors in them, and
no server can run those: the group lives in this process. So the op runs here on host
copies of the vGPU tensors, is waited for, and what it wrote goes back to the vGPU (one
download and one upload per tensor); the Work it returns is already complete."""

from __future__ import annotations

from typing import Any

import torch

from orion_vgpu.client import frontend
from orion_vgpu.client.frontend import RemoteTensor

_READ_ONLY = frozenset({"input", "inputs", "input_tensor", "input_tensors", "input_list",
                        "sparse_indices"})
_WRITE_NOTHING = frozenset({"send", "barrier", "monitored_barrier_", "check_for_nan"})


def run(func: Any, args: tuple, kwargs: dict) -> Any:
    schema = func._schema
    names = [a.name for a in schema.arguments]
    # c10d's schemas mark nothing as written: its ops read their inputs and sparse
    # indices and write every other tensor (send and the barriers write none).
    writes = schema.name.partition("::")[2] not in _WRITE_NOTHING
    written = {n for n in names if writes and n not in _READ_ONLY}
    copies: dict[int, tuple[RemoteTensor, torch.Tensor]] = {}
    back: list[tuple[RemoteTensor, torch.Tensor]] = []
    written_ids: set[int] = set()

    def to_host(v: Any, writes: bool) -> Any:
        if isinstance(v, RemoteTensor):
            pair = copies.get(id(v))
            if pair is None:
                pair = copies[id(v)] = (v, frontend.fetch(v))
            if writes and id(v) not in written_ids:
                written_ids.add(id(v))
                back.append(pair)
            return pair[1]
        if isinstance(v, (list, tuple)):
            return type(v)(to_host(x, writes) for x in v)
        return v

    host_args = [to_host(a, i < len(names) and names[i] in written) for i, a in enumerate(args)]
    host_kwargs = {k: to_host(v, k in written) for k, v in kwargs.items()}
    out = func(*host_args, **host_kwargs)
    for w in _works(out):
        w.wait()
    with torch.no_grad():
        for remote, host in back:
            remote.copy_(host)
    originals = {id(host): remote for remote, host in copies.values()}
    return _restore(out, originals)


def _works(out: Any) -> list[Any]:
    items = out if isinstance(out, (list, tuple)) else [out]
    return [w for w in items if isinstance(w, torch.ScriptObject) and hasattr(w, "wait")]


def _restore(v: Any, originals: dict[int, RemoteTensor]) -> Any:
    """The op's result with each host copy given back as the vGPU tensor it stands for."""
    if isinstance(v, torch.Tensor):
        return originals.get(id(v), v)
    if isinstance(v, (list, tuple)):
        return type(v)(_restore(x, originals) for x in v)
    return v
