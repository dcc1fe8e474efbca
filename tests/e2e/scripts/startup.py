"""The start-up path, as a user program sees it.

    startup.py first-op   the first vGPU op; which heavy modules it pulled in
    startup.py subclass   the program's own tensor subclass (plus a torch.library rule for
                          it) dispatches as without Orion, next to vGPU tensors
    startup.py cpu-only   imports torch and computes on the CPU only
"""

from __future__ import annotations

import sys
from typing import Any

import torch

HEAVY = ("torch.distributed.tensor", "sympy", "torch._dynamo", "rich", "fastapi", "sqlalchemy",
         "httpx", "pydantic", "uvicorn")


class Wrapped(torch.Tensor):
    """A wrapper subclass of the program's own, on the CPU."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapped:  # type: ignore[misc]
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                device=inner.device)
        t.inner = inner
        return t

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        def unwrap(a: Any) -> Any:
            return a.inner if isinstance(a, Wrapped) else a
        out = func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        return Wrapped(out) if isinstance(out, torch.Tensor) else out


@torch.library.register_torch_dispatch("aten::mul.Tensor", Wrapped)
def _mul_rule(cls: Any, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
    return Wrapped(torch.full_like(args[0].inner, 42.0))


def main() -> None:
    mode = sys.argv[1]
    if mode == "first-op":
        x = torch.ones(4, device="cuda")
        x.add_(1)
        print("values:", x.cpu().tolist())
        print("heavy:", ",".join(m for m in HEAVY if m in sys.modules) or "none")
        from orion_vgpu.client import runtime
        print("timed:", ",".join(sorted(runtime.startup)))
    elif mode == "subclass":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        w = Wrapped(torch.arange(3.0))
        print("dispatch:", (w + 1).inner.tolist())            # its __torch_dispatch__
        print("rule:", torch.mul(w, torch.ones(3)).inner.tolist())  # its registered rule
        y = torch.arange(3.0, device=dev) * 2 + 1
        print("device:", y.cpu().tolist())
        print("again:", (w - 1).inner.tolist(), torch.mul(w, torch.ones(3)).inner.tolist())
    elif mode == "cpu-only":
        print("cpu:", torch.ones(2).add(1).tolist())


if __name__ == "__main__":
    main()
