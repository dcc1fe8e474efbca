"""A session's process-wide torch settings, as its program set them (client/settings.py):
``CMD_SETTINGS`` carries a map of names to values; each name has a check and a setter
here. A worker serves one session, so the settings are the worker's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.deterministic

from orion_vgpu.protocol.settings import READERS
from orion_vgpu.server.executor import SessionError

PRECISIONS = ("highest", "high", "medium")


def _bool(v: Any) -> bool:
    return type(v) is bool


def _set_deterministic(v: list) -> None:
    torch.use_deterministic_algorithms(v[0], warn_only=v[1])


def _set_fill(v: bool) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = v  # type: ignore[attr-defined]


# name -> (valid value?, setter)
SETTERS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any]]] = {
    "default_dtype": (lambda v: isinstance(v, torch.dtype) and v.is_floating_point,
                      torch.set_default_dtype),
    "deterministic": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_bool, v)),
                      _set_deterministic),
    "fill_uninitialized_memory": (_bool, _set_fill),
    "float32_matmul_precision": (lambda v: v in PRECISIONS,
                                 torch.set_float32_matmul_precision),
    "cudnn.enabled": (_bool, torch._C._set_cudnn_enabled),
    "cudnn.benchmark": (_bool, torch._C._set_cudnn_benchmark),
    "cudnn.deterministic": (_bool, torch._C._set_cudnn_deterministic),
    "cudnn.allow_tf32": (_bool, torch._C._set_cudnn_allow_tf32),
    "matmul.allow_tf32": (_bool, torch._C._set_cublas_allow_tf32),
}


def apply(values: Any) -> None:
    """Check every entry, then set them all (a bad map changes nothing)."""
    if not isinstance(values, dict):
        raise SessionError("ProtocolError", "settings must be a map of names to values")
    for name, value in values.items():
        entry = SETTERS.get(name) if isinstance(name, str) else None
        if entry is None:
            raise SessionError("ProtocolError", f"unknown setting {name!r:.40}")
        if not entry[0](value):
            raise SessionError("ProtocolError", f"setting {name} cannot be {value!r:.40}")
    for name, value in values.items():
        # Only a change: the first use_deterministic_algorithms call takes most of a second.
        if READERS[name]() != value:
            SETTERS[name][1](value)
