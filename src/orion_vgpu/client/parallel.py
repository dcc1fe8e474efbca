"""``nn.DataParallel`` over vGPUs: the device-to-device collectives it uses.

PyTorch implements ``torch.nn.parallel.comm`` with CUDA/NCCL kernels a CPU build lacks;
these versions copy between vGPUs with the frontend's cross-device copies.
"""

from __future__ import annotations

from typing import Any

import torch

from orion_vgpu.client.frontend import RemoteTensor


def _index(d: Any) -> int:
    if isinstance(d, torch.device):
        return -1 if d.type == "cpu" else (d.index or 0)
    if isinstance(d, str):
        return _index(torch.device(d))
    return int(d)


def _to(t: torch.Tensor, dev: int) -> torch.Tensor:
    if dev == -1:
        return t.cpu()
    if isinstance(t, RemoteTensor) and t._dev == dev:
        return t
    return t.to(torch.device("cuda", dev))


def broadcast(tensor: torch.Tensor, devices: Any = None, *, out: Any = None) -> Any:
    if out is not None:
        for o in out:
            o.copy_(tensor)
        return tuple(out)
    return tuple(_to(tensor, _index(d)) for d in devices)


def broadcast_coalesced(tensors: Any, devices: Any, buffer_size: int = 10485760) -> Any:
    return tuple(tuple(_to(t, _index(d)) for t in tensors) for d in devices)


def scatter(tensor: torch.Tensor, devices: Any = None, chunk_sizes: Any = None, dim: int = 0,
            streams: Any = None, *, out: Any = None) -> Any:
    if out is not None:
        sizes = [o.size(dim) for o in out]
        for o, part in zip(out, tensor.split(sizes, dim), strict=True):
            o.copy_(part)
        return tuple(out)
    devs = [_index(d) for d in devices]
    if chunk_sizes is None:
        parts = tensor.chunk(len(devs), dim)
    else:
        parts = tensor.split(list(chunk_sizes), dim)
    return tuple(_to(p.contiguous(), d) for p, d in zip(parts, devs, strict=False))


def gather(tensors: Any, dim: int = 0, destination: Any = None, *, out: Any = None) -> Any:
    dest = 0 if destination is None else _index(destination)
    if out is not None:
        dest = _index(out.device)
    moved = [_to(t, dest) for t in tensors]
    result = torch.cat(moved, dim)
    if out is not None:
        out.copy_(result)
        return out
    return result


def install() -> None:
    import torch.cuda.comm as cuda_comm
    import torch.cuda.nccl as nccl
    import torch.nn.parallel.comm as comm

    nccl.is_available = lambda tensors: False  # no NCCL between vGPUs; skip its warning
    for mod in (comm, cuda_comm):
        for name, fn in (("broadcast", broadcast), ("broadcast_coalesced", broadcast_coalesced),
                         ("scatter", scatter), ("gather", gather)):
            setattr(mod, name, fn)
