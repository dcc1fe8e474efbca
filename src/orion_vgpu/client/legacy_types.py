"""The legacy CUDA tensor types on a vGPU: ``torch.cuda.FloatTensor(2, 3)``,
``torch.cuda.LongTensor([1, 2])``, ``isinstance(t, torch.cuda.FloatTensor)``,
``t.type(torch.cuda.HalfTensor)``, ``torch.set_default_tensor_type(torch.cuda.FloatTensor)``.

A CPU build of PyTorch refuses all of them ("type torch.cuda.FloatTensor not available");
code written before PyTorch 0.4 still uses them. Each becomes a class whose call makes the
tensor on the current vGPU, as the CUDA build's constructor does on the current GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from orion_vgpu.client.frontend import _LEGACY_TYPES, RemoteTensor

_original_set_default_tensor_type: Any = None
_default_set_by_us = False


class LegacyCudaType(type):
    dtype: torch.dtype

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, RemoteTensor) and obj.dtype == cls.dtype

    def __call__(cls, *args: Any, device: Any = None) -> Any:
        dev = torch.device("cuda") if device is None else torch.device(device)
        if dev.type != "cuda":
            raise RuntimeError(f"legacy constructor expects device type: cuda but device "
                               f"type: {dev.type} was passed")
        if not args:
            return torch.empty(0, dtype=cls.dtype, device=dev)
        if all(type(a) is int for a in args) or (len(args) == 1
                                                 and isinstance(args[0], torch.Size)):
            return torch.empty(*args, dtype=cls.dtype, device=dev)
        if len(args) == 1 and isinstance(args[0], torch.Tensor):
            t = args[0]
            if t.dtype != cls.dtype:
                raise TypeError(f"expected {cls.__name__[:-6]} (got {_name(t.dtype)})")
            if not isinstance(t, RemoteTensor):
                raise RuntimeError(f"legacy constructor expects device type: cuda but device "
                                   f"type: {t.device.type} was passed")
            return torch.ops.aten.alias(t)  # as PyTorch's: a new tensor on the same memory
        if len(args) == 1:
            return torch.tensor(args[0], dtype=cls.dtype, device=dev)
        raise TypeError(f"torch.cuda.{cls.__name__}(): arguments must be sizes, a sequence "
                        "of numbers or a tensor")

    def __repr__(cls) -> str:
        return f"<class 'torch.cuda.{cls.__name__}'>"


def _name(dtype: torch.dtype) -> str:
    for name, d in _LEGACY_TYPES.items():
        if d == dtype:
            return name[:-6]
    return str(dtype)


def cuda_type_dtype(spec: Any) -> torch.dtype | None:
    """The dtype a CUDA tensor type names (a legacy class or "torch.cuda.FloatTensor")."""
    if isinstance(spec, LegacyCudaType):
        return spec.dtype
    if isinstance(spec, str) and spec.startswith("torch.cuda."):
        return _LEGACY_TYPES.get(spec[len("torch.cuda."):])
    return None


def _set_default_tensor_type(t: Any) -> None:
    global _default_set_by_us
    dtype = cuda_type_dtype(t)
    if dtype is None:
        _original_set_default_tensor_type(t)
        if _default_set_by_us:
            torch.set_default_device(None)
            _default_set_by_us = False
        return
    if not dtype.is_floating_point:
        raise TypeError("only floating-point types are supported as the default type")
    torch.set_default_dtype(dtype)
    torch.set_default_device("cuda")
    _default_set_by_us = True


def install() -> None:
    global _original_set_default_tensor_type
    for name, dtype in _LEGACY_TYPES.items():
        cls = LegacyCudaType(name, (), {"dtype": dtype, "is_cuda": True, "is_sparse": False,
                                        "__module__": "torch.cuda"})
        setattr(torch.cuda, name, cls)
    if _original_set_default_tensor_type is None:
        _original_set_default_tensor_type = torch.set_default_tensor_type
        torch.set_default_tensor_type = _set_default_tensor_type
