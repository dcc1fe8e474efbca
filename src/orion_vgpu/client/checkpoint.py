"""torch.save / torch.load of vGPU tensors, compatible with files from real GPUs.

Saved storages are tagged ``cuda:N`` exactly as on a GPU machine, so a checkpoint written
here loads there (and the reverse, or anywhere with ``map_location``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.serialization as ser

from orion_vgpu.client import frontend

_installed = False


def _tag(obj: Any) -> str | None:
    if isinstance(obj, torch.storage.UntypedStorage):
        dev = frontend._saved_cuda.get(obj._cdata)
        if dev is not None:
            return f"cuda:{dev}"
    return None


def _restore(obj: Any, location: str) -> Any:
    if location.startswith("cuda"):
        # keep the host copy; load() moves it to the vGPU once the tensor is rebuilt
        _to_move.add(obj._cdata if hasattr(obj, "_cdata") else id(obj))
        _dev_of[obj._cdata] = torch.device(location).index or 0
        return obj
    return None


_to_move: set[int] = set()
_dev_of: dict[int, int] = {}


def _move(obj: Any, seen: dict[int, Any]) -> Any:
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, torch.Tensor) and not isinstance(obj, frontend.RemoteTensor):
        key = obj.untyped_storage()._cdata
        if key in _to_move:
            is_param = isinstance(obj, torch.nn.Parameter)
            moved = frontend.upload(obj.detach(), _dev_of.get(key, 0))
            if is_param:
                moved = torch.nn.Parameter(moved, requires_grad=obj.requires_grad)
            elif obj.requires_grad:
                moved.requires_grad_(True)
            seen[id(obj)] = moved
            return moved
        return obj
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _move(obj[k], seen)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _move(v, seen)
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_move(v, seen) for v in obj)
    if isinstance(obj, torch.nn.Module):
        obj.to("cuda")
    return obj


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    ser.register_package(1, _tag, _restore)
    original_load = torch.load
    original_save = torch.save

    @functools.wraps(original_load)
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = original_load(f, map_location, *args, **kwargs)
        if map_location is None and _to_move:
            result = _move(result, {})
            _to_move.clear()
            _dev_of.clear()
        return result

    @functools.wraps(original_save)
    def save(obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_save(obj, *args, **kwargs)
        finally:
            frontend._saved_cuda.clear()

    torch.load = load
    torch.save = save
    ser.load = load
    ser.save = save
