"""The process-wide torch settings ``CMD_SETTINGS`` carries (see messages.py): each name,
how to read it in a process, and the value a new process has. The client reads them to
send what changed (client/settings.py); the worker reads them to set only what differs
(server/settings.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.deterministic


def _deterministic() -> list[bool]:
    return [torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()]


READERS: dict[str, Callable[[], Any]] = {
    "default_dtype": torch.get_default_dtype,
    "deterministic": _deterministic,
    "fill_uninitialized_memory": lambda: torch.utils.deterministic.fill_uninitialized_memory,
    "float32_matmul_precision": torch.get_float32_matmul_precision,
    "cudnn.enabled": torch._C._get_cudnn_enabled,
    "cudnn.benchmark": torch._C._get_cudnn_benchmark,
    "cudnn.deterministic": torch._C._get_cudnn_deterministic,
    "cudnn.allow_tf32": torch._C._get_cudnn_allow_tf32,
    "matmul.allow_tf32": torch._C._get_cublas_allow_tf32,
}

# What a new session has (PyTorch's defaults): only the settings that differ are sent.
DEFAULTS: dict[str, Any] = {
    "default_dtype": torch.float32, "deterministic": [False, False],
    "fill_uninitialized_memory": True, "float32_matmul_precision": "highest",
    "cudnn.enabled": True, "cudnn.benchmark": False, "cudnn.deterministic": False,
    "cudnn.allow_tf32": True, "matmul.allow_tf32": False,
}


def snapshot() -> dict[str, Any]:
    return {name: read() for name, read in READERS.items()}
