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

    A program (or tool) may import one of our own modules first, and that module imports
    torch: activating then would import the runtime's modules while that one is only half
    made (a circular import). Activation then waits until the outermost of our modules
    being imported is done; the hook watches our modules' imports until then.
    """

    deferred = False

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if getattr(self, "_busy", False):
            return None
        if name == "torch":
            after = self._torch_loaded
        elif name.startswith(_OURS) and not self.deferred and "torch" in sys.modules:
            return None
        elif name.startswith(_OURS):
            after = self._ours_loaded
        else:
            return None
        self._busy = True
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: object) -> None:
            t0 = time.perf_counter()
            original_exec(module)
            after(module, t0)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def _torch_loaded(self, module: object, t0: float) -> None:
        t1 = time.perf_counter()
        timings.update(torch=t1 - t0)
        if _ours_initializing():
            self.deferred = True
            return
        _activate(t1)

    def _ours_loaded(self, module: object, t0: float) -> None:
        if self.deferred and not _ours_initializing(skip=getattr(module, "__name__", "")):
            self.deferred = False
            _activate(time.perf_counter())


_OURS = "orion_vgpu."


def _ours_initializing(skip: str = "") -> bool:
    """Whether one of our modules (other than ``skip``) is being imported right now."""
    for name, mod in list(sys.modules.items()):
        if name.startswith(_OURS) and name != skip:
            spec = getattr(mod, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _activate(t0: float) -> None:
    _remove_hook()
    from orion_vgpu.client.cuda_api import activate
    activate()
    timings.update(activate=time.perf_counter() - t0)


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
