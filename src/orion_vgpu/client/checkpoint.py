"""torch.save / torch.load of vGPU tensors, compatible with files from real GPUs.

Saved storages are tagged ``cuda:N`` exactly as on a GPU machine, so a checkpoint written
here loads there (and the reverse, or anywhere with ``map_location``).
"""

from __future__ import annotations

import collections
import functools
import threading
import types
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
    seen[id(obj)] = obj  # the containers below may refer back to themselves
    if isinstance(obj, torch.nn.Module):
        # Each parameter and buffer where it was saved (a model may span devices).
        for m in obj.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is not None:
                        table[name] = _move(t, seen)
        return obj
    if isinstance(obj, collections.deque):
        moved = [_move(v, seen) for v in obj]
        obj.clear()
        obj.extend(moved)
        return obj
    if _is_plain_object(obj):  # a SimpleNamespace, a dataclass, a user's class
        for name, v in vars(obj).items():
            setattr(obj, name, _move(v, seen))
    return obj


def _is_plain_object(obj: Any) -> bool:
    return hasattr(obj, "__dict__") and not isinstance(
        obj, (type, types.ModuleType, types.FunctionType, types.MethodType, torch.Tensor))


class _Loading(threading.local):
    n = 0  # torch.load calls under way in this thread


_loading = _Loading()


def _wrap_storage_cuda() -> None:
    """``map_location=lambda s, loc: s.cuda(1)``: during torch.load a host storage bound for
    a vGPU stays on the host and is moved with its tensor, as _restore does."""
    for cls in (torch.UntypedStorage, torch.storage.TypedStorage):
        original = cls.cuda

        def cuda(self: Any, device: Any = None, non_blocking: bool = False,
                 _original: Any = original, **kwargs: Any) -> Any:
            if not _loading.n or self.device.type != "cpu":
                return _original(self, device, non_blocking, **kwargs)
            untyped = self.untyped_storage() if hasattr(self, "untyped_storage") else self
            _to_move.add(untyped._cdata)
            _dev_of[untyped._cdata] = torch.device("cuda", device).index \
                if isinstance(device, int) else (torch.device(device or "cuda").index or 0)
            return self

        cls.cuda = cuda  # type: ignore[method-assign]


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
        # map_location "cuda:1", a device or a dict reach _restore with the mapped
        # location; a callable's storage.cuda(i) reaches _storage_cuda.
        _loading.n += 1
        try:
            result = original_load(f, map_location, *args, **kwargs)
        finally:
            _loading.n -= 1
        if _to_move and not _loading.n:
            try:
                result = _move(result, {})
            finally:
                _to_move.clear()
                _dev_of.clear()
        return result

    @functools.wraps(original_save)
    def save(obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_save(obj, *args, **kwargs)
        finally:
            frontend._saved_cuda.clear()

    _wrap_storage_cuda()
    torch.load = load
    torch.save = save
    ser.load = load
    ser.save = save
