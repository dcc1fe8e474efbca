"""Arms the client runtime when ORION_VGPU is set: torch is switched over right after import.

The ``orion_vgpu_autoload.pth`` file in site-packages imports this module in every Python
process; it costs an environment lookup when ORION_VGPU is unset.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any


class _TorchHook(importlib.abc.MetaPathFinder):
    """Waits for ``import torch`` to finish, then activates the runtime once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch" or getattr(self, "_busy", False):
            return None
        self._busy = True
        try:
            import importlib.util
            spec = importlib.util.find_spec("torch")
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module  # type: ignore[attr-defined]

        def exec_module(module: Any) -> None:
            original_exec(module)
            _remove_hook()
            from orion_vgpu.client.cuda_api import activate
            activate()

        loader.exec_module = exec_module  # type: ignore[attr-defined]
        return spec


_hook: _TorchHook | None = None


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def arm() -> None:
    global _hook
    if "torch" in sys.modules:
        from orion_vgpu.client.cuda_api import activate
        activate()
        return
    if _hook is None:
        _hook = _TorchHook()
        sys.meta_path.insert(0, _hook)


def maybe_arm() -> None:
    if os.environ.get("ORION_VGPU", "").strip() not in ("", "0"):
        arm()
