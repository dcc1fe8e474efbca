"""Arms the client runtime when ORION_VGPU is set: torch is switched over right after import.

The ``orion_vgpu_autoload.pth`` file in site-packages imports this module in every Python
process; it costs an environment lookup when ORION_VGPU is unset.
"""

from __future__ import annotations

import os
import sys
import time

# Seconds spent by torch's own import and by switching it over (activate) in this process;
# benchmarks/bench_startup.py reads them.
timings: dict[str, float] = {}


class _TorchHook:
    """Waits for ``import torch`` to finish, then activates the runtime once.

    A meta path finder by duck typing: importing importlib.abc would cost every Python
    process with ORION_VGPU set (pip, shells' helpers) ~20 ms at start.
    """

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
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

        def exec_module(module: object) -> None:
            t0 = time.perf_counter()
            original_exec(module)
            t1 = time.perf_counter()
            _remove_hook()
            from orion_vgpu.client.cuda_api import activate
            activate()
            timings.update(torch=t1 - t0, activate=time.perf_counter() - t1)

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
