"""The memory diagnostics of ``torch.cuda`` a training script calls, for vGPUs:
``memory_stats`` with every key ``memory_summary`` prints, ``set_per_process_memory_fraction``,
the allocator's history/snapshot hooks, and ``torch.cuda.nvtx`` ranges (no profiler here:
they keep their depth and do nothing else). A CPU build of PyTorch raises on all of them.

Byte figures come from what the program holds (client/frontend.py ``used_bytes``); the
allocator's counts and cumulative totals, which a caching allocator on a GPU keeps, are not
tracked and read 0; ``num_ooms`` counts the program's OutOfMemoryErrors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from orion_vgpu.client import frontend
from orion_vgpu.client.runtime import get_runtime

_METRICS = ("allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes",
            "inactive_split_bytes", "allocation", "active", "segment", "inactive_split")
_POOLS = ("all", "large_pool", "small_pool")


def memory_stats(idx: int) -> dict[str, int]:
    cur, peak = frontend.used_bytes.get(idx, 0), frontend.peak_bytes.get(idx, 0)
    stats = {f"{metric}.{pool}.{kind}": 0 for metric in _METRICS for pool in _POOLS
             for kind in ("current", "peak", "allocated", "freed")}
    for metric in ("allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes"):
        for pool in ("all", "large_pool"):  # a vGPU tensor is one block of the server's
            stats[f"{metric}.{pool}.current"] = cur
            stats[f"{metric}.{pool}.peak"] = peak
    for name in ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc",
                 "num_device_free", "max_split_size"):
        stats[name] = 0
    conns = get_runtime().conns
    stats["num_ooms"] = frontend.ooms.get(idx, 0) + (conns[idx].ooms if idx < len(conns) else 0)
    for name in ("oversize_allocations", "oversize_segments"):
        for kind in ("current", "peak", "allocated", "freed"):
            stats[f"{name}.{kind}"] = 0
    return stats


def memory_stats_as_nested_dict(idx: int) -> dict[str, Any]:
    """What PyTorch's memory_stats flattens ("allocated_bytes.all.current" is
    ``["allocated_bytes"]["all"]["current"]``)."""
    nested: dict[str, Any] = {}
    for key, value in memory_stats(idx).items():
        *path, last = key.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def set_per_process_memory_fraction(fraction: float, idx: int) -> None:
    """As on a GPU: an allocation beyond ``fraction`` of the vGPU's memory (its grant) is an
    OutOfMemoryError in this process."""
    if not isinstance(fraction, float | int) or not 0 <= fraction <= 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    quota = get_runtime().quota(idx)
    frontend._limits[idx] = max(int(quota * fraction), 1) if quota else 0
    frontend._fractions[idx] = float(fraction)


def get_per_process_memory_fraction(idx: int) -> float:
    return frontend._fractions.get(idx, 1.0)


def no_op(*args: Any, **kwargs: Any) -> None:
    return None


def memory_snapshot(*args: Any, **kwargs: Any) -> list:
    return []


# torch.cuda.nvtx -----------------------------------------------------------------------
class _Depth(threading.local):
    n = 0


_depth = _Depth()
_next_range = iter(range(1, 1 << 62)).__next__


def range_push(msg: str) -> int:
    _depth.n += 1
    return _depth.n - 1


def range_pop() -> int:
    if _depth.n == 0:
        return -1
    _depth.n -= 1
    return _depth.n


def range_start(msg: str) -> int:
    return _next_range()


@contextlib.contextmanager
def nvtx_range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
    range_push(msg.format(*args, **kwargs))
    try:
        yield
    finally:
        range_pop()


NVTX: dict[str, Callable[..., Any]] = {
    "range_push": range_push, "range_pop": range_pop, "range_start": range_start,
    "range_end": no_op, "mark": no_op, "range": nvtx_range,
}


def install_nvtx() -> None:
    import torch.cuda.nvtx as nvtx
    for name, fn in NVTX.items():
        setattr(nvtx, name, fn)
