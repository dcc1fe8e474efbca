"""PyTorch's tools around a program, on a vGPU client: the profiler and torch.export.

A CPU build of PyTorch has no CUDA to profile: ``ProfilerActivity.CUDA`` printed a C++
stack trace per op ("Failed to record CUDA event") and could abort the process, so it is
dropped (a vGPU op is recorded as the client's CPU-side call). ``torch.export`` of vGPU
tensors traces fake CUDA tensors, which a CPU build cannot make (the process aborted in
C++): it gets a clear error instead.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from orion_vgpu.client.errors import OrionError
from orion_vgpu.client.frontend import RemoteTensor

_installed = False
EXPORT_REFUSED = ("torch.export of a model or inputs on a vGPU is not supported: export it on "
                  "the host (model.cpu() and host inputs); the exported program runs anywhere")


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _patch_profiler()
    _patch_export()


def _patch_profiler() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler.profiler import _KinetoProfile

    init = _KinetoProfile.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, activities: Any = None, **kwargs: Any) -> None:
        if activities is not None:
            activities = [a for a in activities if a != ProfilerActivity.CUDA] \
                or [ProfilerActivity.CPU]
        init(self, *args, activities=activities, **kwargs)

    _KinetoProfile.__init__ = __init__  # type: ignore[method-assign]

    import torch.autograd.profiler as legacy

    legacy_init = legacy.profile.__init__

    @functools.wraps(legacy_init)
    def legacy_profile_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("use_cuda", None)  # PyTorch's own deprecated spelling of use_device="cuda"
        if str(kwargs.get("use_device") or "").startswith("cuda"):
            kwargs["use_device"] = None
        legacy_init(self, *args, **kwargs)

    legacy.profile.__init__ = legacy_profile_init  # type: ignore[method-assign]


def _patch_export() -> None:
    import torch.export

    export = torch.export.export

    @functools.wraps(export)
    def guarded(mod: Any, args: Any = (), kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        if _on_vgpu(mod, args, kwargs):
            raise OrionError(EXPORT_REFUSED)
        return export(mod, args, kwargs, *rest, **options)

    torch.export.export = guarded


def _on_vgpu(mod: Any, args: Any, kwargs: Any) -> bool:
    values = list(torch.utils._pytree.tree_leaves((args, kwargs or {})))
    if isinstance(mod, torch.nn.Module):
        values += list(mod.parameters()) + list(mod.buffers())
    return any(isinstance(v, RemoteTensor) for v in values)
