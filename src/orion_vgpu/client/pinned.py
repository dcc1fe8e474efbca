"""Host tensors the program pinned.

No CUDA runs in this process to pin memory with, and a vGPU reads pageable memory as fast,
so nothing is page-locked; but a program sees what it would on a GPU machine:
``pin_memory()`` returns a copy (writes to it leave the original alone) that ``is_pinned()``,
as do ``pin_memory=True`` factories, views of either, and a second ``pin_memory()`` of a
pinned tensor returns the tensor itself. What is pinned is a storage, kept here weakly:
the mark goes with the storage's last tensor.
"""

from __future__ import annotations

import weakref

import torch

_PINNED: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()


def mark(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a host tensor just made for the program) is pinned from now on."""
    _PINNED.add(t.untyped_storage())
    return t


def is_pinned(t: torch.Tensor) -> bool:
    if t.device.type != "cpu" or t.layout is not torch.strided:
        return False
    return t.untyped_storage() in _PINNED


def pin(t: torch.Tensor) -> torch.Tensor:
    """``Tensor.pin_memory``: a pinned copy (same sizes and strides), or ``t`` if pinned."""
    if t.device.type != "cpu":
        raise RuntimeError(f"cannot pin '{t.type()}' only dense CPU tensors can be pinned")
    if is_pinned(t):
        return t
    return mark(t.clone())
