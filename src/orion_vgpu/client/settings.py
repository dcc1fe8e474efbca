"""The program's process-wide torch settings that decide how its ops run, kept the same in
its sessions: the default dtype, deterministic algorithms, the float32 matmul precision and
the cuDNN and cuBLAS flags. Each worker serves one session, so it takes them as its own.

Sent as ``CMD_SETTINGS`` (a map of the ones that differ from what the session has) when a
session starts and right after a program changes one through PyTorch's Python API, so the
ops queued before the change run with the old value and those after with the new, as on a
GPU. The torch functions and properties that set them are wrapped (``install``); a
setting changed through ``torch._C`` directly reaches the sessions with the next change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.backends
import torch.backends.cuda
import torch.backends.cudnn
import torch.utils.deterministic

_on_change: Callable[[], None] | None = None
_installed = False


def changed() -> None:
    if _on_change is not None:
        _on_change()


def _after(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        changed()
        return out
    wrapper._orion_vgpu = True  # type: ignore[attr-defined]
    return wrapper


class _Prop(torch.backends.ContextProp):
    """A cuDNN flag property that tells the sessions after it is set."""

    def __set__(self, obj: Any, val: Any) -> None:
        super().__set__(obj, val)
        changed()


def install(on_change: Callable[[], None]) -> None:
    """Wrap the setters; ``on_change()`` runs after each (idempotent)."""
    global _on_change, _installed
    _on_change = on_change
    if _installed:
        return
    _installed = True
    for name in ("set_default_dtype", "use_deterministic_algorithms",
                 "set_float32_matmul_precision", "set_default_tensor_type"):
        setattr(torch, name, _after(getattr(torch, name)))
    cudnn = torch.backends.cudnn
    # What cudnn.flags() calls, by its global name in the module PropModule wraps.
    module = getattr(cudnn, "m", cudnn)
    module.set_flags = _after(module.set_flags)
    cls = type(cudnn)
    for name in ("enabled", "benchmark", "deterministic", "allow_tf32"):
        prop = vars(cls).get(name)
        if isinstance(prop, torch.backends.ContextProp):
            setattr(cls, name, _Prop(prop.getter, prop.setter))
    blas = type(torch.backends.cuda.matmul)
    blas.__setattr__ = _after(blas.__setattr__)
    det = type(torch.utils.deterministic)
    prop = vars(det).get("fill_uninitialized_memory")
    if isinstance(prop, property) and prop.fset is not None:
        det.fill_uninitialized_memory = property(  # type: ignore[attr-defined]
            prop.fget, _after(prop.fset), doc=prop.__doc__)
