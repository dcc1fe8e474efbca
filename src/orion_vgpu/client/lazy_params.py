"""Lazy modules (``nn.LazyLinear`` & co.) on a vGPU.

An uninitialized parameter is a Python subclass of a tensor with no size; a vGPU tensor is
the Python object of its own C++ tensor, so no tensor can be both. An uninitialized
parameter or buffer bound for vGPU N (``LazyLinear(3, device="cuda")``, ``.to("cuda")``,
``.cuda()``) therefore stays an empty host tensor that remembers N (``_orion_dev``), and
its ``materialize`` swaps the object (``torch.utils.swap_tensors``) with a vGPU tensor of
the inferred shape: the module keeps the same object, now a vGPU parameter, as on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parameter import (
    Parameter,
    UninitializedBuffer,
    UninitializedParameter,
    UninitializedTensorMixin,
)

from orion_vgpu.client import hooks

_installed = False


def install(cuda_index: Callable[[Any], int | None]) -> None:
    global _installed
    if _installed:
        return
    _installed = True
    mixin_tf = UninitializedTensorMixin.__torch_function__.__func__  # type: ignore[attr-defined]
    mixin_materialize = UninitializedTensorMixin.materialize
    to_cuda = tuple(hooks.ORIGINALS.get(f, f) for f in (torch.Tensor.to, torch.Tensor.cuda))
    keeps_binding = (torch.Tensor.detach, torch.Tensor.requires_grad_)
    dtype_casts = {torch.Tensor.half: torch.float16, torch.Tensor.float: torch.float32,
                   torch.Tensor.double: torch.float64, torch.Tensor.char: torch.int8,
                   torch.Tensor.short: torch.int16, torch.Tensor.int: torch.int32,
                   torch.Tensor.long: torch.int64}

    def torch_function(cls: type, func: Any, types: Any, args: tuple = (),
                       kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        func = hooks.ORIGINALS.get(func, func)  # PyTorch's checks compare by identity
        self = args[0] if args else None
        if isinstance(self, UninitializedTensorMixin):
            if func in to_cuda:
                idx = _target(func, args, kwargs, cuda_index)
                if idx is not None:
                    return _bound(self, idx, _dtype(func, args, kwargs))
            elif func in dtype_casts and "_orion_dev" in self.__dict__:
                return _bound(self, self.__dict__["_orion_dev"], dtype_casts[func])
            elif func is torch.Tensor.view_as:
                # torch.utils.swap_tensors (Module._apply) finds a leaf's grad accumulator so
                with torch._C.DisableTorchFunctionSubclass():
                    return torch.Tensor.view_as(*args, **kwargs)
            elif func in keeps_binding and "_orion_dev" in self.__dict__:
                # nn.Parameter(bound) (Module._apply swaps parameters) detaches it
                if func is torch.Tensor.requires_grad_:
                    with torch._C.DisableTorchFunctionSubclass():
                        torch.Tensor.requires_grad_(self, *args[1:], **kwargs)
                    return self
                return _bound(self, self.__dict__["_orion_dev"], None)
        return mixin_tf(cls, func, types, args, kwargs)

    def materialize(self: Any, shape: Any, device: Any = None, dtype: Any = None) -> None:
        idx = cuda_index(device) if device is not None else self.__dict__.get("_orion_dev")
        if idx is None:
            return mixin_materialize(self, shape, device, dtype)
        with torch._C.DisableTorchFunctionSubclass():
            dtype = self.data.dtype if dtype is None else dtype
            requires_grad = self.requires_grad
        new = torch.empty(shape, device=torch.device("cuda", idx), dtype=dtype)
        if self.cls_to_become is Parameter:
            new = Parameter(new, requires_grad)
        else:
            new.requires_grad_(requires_grad)
            for name in ("persistent", "_is_buffer"):
                if name in self.__dict__:
                    setattr(new, name, self.__dict__[name])
        torch.utils.swap_tensors(self, new)

    param_deepcopy = UninitializedParameter.__deepcopy__

    def deepcopy(self: Any, memo: dict) -> Any:
        out = param_deepcopy(self, memo)
        if "_orion_dev" in self.__dict__:
            out._orion_dev = self.__dict__["_orion_dev"]
        return out

    UninitializedParameter.__deepcopy__ = deepcopy  # type: ignore[method-assign]
    UninitializedTensorMixin.__torch_function__ = classmethod(torch_function)  # type: ignore
    UninitializedTensorMixin.materialize = materialize  # type: ignore[method-assign]
    for cls in (UninitializedParameter, UninitializedBuffer):
        cls.__new__ = _bound_new(cls.__new__, cuda_index)  # type: ignore[method-assign]


def _bound_new(new: Any, cuda_index: Callable[[Any], int | None]) -> Any:
    def __new__(cls: type, requires_grad: bool | None = None, device: Any = None,
                dtype: Any = None, *rest: Any, **kwargs: Any) -> Any:
        idx = cuda_index(device) if device is not None else None
        if requires_grad is None:
            requires_grad = cls is UninitializedParameter
        obj = new(cls, requires_grad, None if idx is not None else device, dtype, *rest,
                  **kwargs)
        if idx is not None:
            obj._orion_dev = idx
        return obj
    return staticmethod(__new__)


def _target(func: Any, args: tuple, kwargs: dict,
            cuda_index: Callable[[Any], int | None]) -> int | None:
    if func is hooks.ORIGINALS.get(torch.Tensor.cuda, torch.Tensor.cuda):
        device = args[1] if len(args) > 1 else kwargs.get("device")
        return cuda_index(torch.device("cuda") if device is None else device)
    device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
    return cuda_index(device) if device is not None else None


def _dtype(func: Any, args: tuple, kwargs: dict) -> torch.dtype | None:
    if func is hooks.ORIGINALS.get(torch.Tensor.cuda, torch.Tensor.cuda):
        return None
    return torch._C._nn._parse_to(*args[1:], **kwargs)[1]


def _bound(self: Any, idx: int, dtype: torch.dtype | None) -> Any:
    """A new uninitialized tensor like ``self``, bound for vGPU ``idx``."""
    with torch._C.DisableTorchFunctionSubclass():
        requires_grad = self.requires_grad
        dtype = self.data.dtype if dtype is None else dtype
    if isinstance(self, UninitializedParameter):
        out = UninitializedParameter(requires_grad, None, dtype)
    else:
        out = UninitializedBuffer(requires_grad, None, dtype,
                                  self.__dict__.get("persistent", True))
    for name, value in self.__dict__.items():
        setattr(out, name, value)
    out._orion_dev = idx
    return out
