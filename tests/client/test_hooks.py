"""client/hooks.py in this process (no pool): what it wraps, and that remove() undoes it."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from orion_vgpu.client import cuda_api, hooks


def _schema_factories() -> set[str]:
    """torch-namespace functions whose aten schema takes a ``device``: what hooks must wrap."""
    names = {s.name[len("aten::"):] for s in torch._C._jit_get_all_schemas()
             if s.name.startswith("aten::") and any(a.name == "device" for a in s.arguments)}
    return {n for n in names if not n.startswith("_")
            and isinstance(getattr(torch, n, None), types.BuiltinFunctionType)}


def test_factory_list_covers_this_torch() -> None:
    missing = _schema_factories() - set(hooks.FACTORIES)
    assert not missing, f"add to hooks.FACTORIES: {sorted(missing)}"
    assert all(hasattr(torch, n) for n in hooks.FACTORIES)
    assert all(hasattr(torch.fft, n) for n in hooks.FFT_FACTORIES)
    assert all(hasattr(torch.Tensor, n) for n in hooks.NEW_METHODS)


@pytest.fixture
def installed() -> Any:
    made: list[tuple] = []
    seen: list[str] = []

    def create(func: Any, args: tuple, kwargs: dict, idx: int) -> str:
        made.append((func, idx, kwargs["device"]))
        return "vgpu"

    def index(d: Any) -> int | None:
        d = torch.device(d)
        return (d.index or 0) if d.type == "cuda" else None

    def item(func: Any, args: tuple, kwargs: dict) -> Any:
        seen.append("item")
        return func(*args, **kwargs)

    from torch.utils._device import DeviceContext

    originals = {"zeros": torch.zeros, "item": torch.Tensor.item,
                 "enter": torch.amp.autocast_mode.autocast.__enter__,
                 "device": DeviceContext.__torch_function__}
    hooks.wrap_device_context(create, index)  # for the process, as the client does
    hooks.install(create, index, {torch.Tensor.item: item}, cuda_api.VGPUMode)
    try:
        yield made, seen, originals
    finally:
        hooks.remove()
        DeviceContext.__torch_function__ = originals["device"]


def test_wrapped_functions_route_only_cuda_devices(installed: Any) -> None:
    made, seen, originals = installed
    assert torch.zeros(2, device="cuda:1") == "vgpu"
    assert made == [(originals["zeros"], 1, "cuda:1")]
    assert torch.zeros(2).tolist() == [0.0, 0.0] and torch.ones(1, device="cpu").item() == 1.0
    assert seen == ["item"] and len(made) == 1
    with torch.device("cuda"):
        assert torch.ones(3) == "vgpu"
    assert made[-1][1:] == (0, torch.device("cuda"))
    hooks.depth.n += 1  # a VGPUMode is on: the wrappers leave every call to it
    try:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")
    finally:
        hooks.depth.n -= 1


def test_autocast_regions_get_a_mode(installed: Any) -> None:
    def depth() -> int:
        return torch._C._len_torch_function_stack()

    assert depth() == 0
    with torch.autocast("cuda", enabled=False):
        assert depth() == 1 and hooks.depth.n == 1
        with torch.autocast("cpu"):
            assert depth() == 1
    assert depth() == 0 and hooks.depth.n == 0


def _plus_zeros(x: torch.Tensor) -> torch.Tensor:
    return x + torch.zeros(2)


def test_remove_restores_what_torch_had() -> None:
    before = {"zeros": torch.zeros, "fft": torch.fft.fftfreq, "to": torch.Tensor.to,
              "new": torch.Tensor.new_zeros, "sdpa": torch.nn.functional.scaled_dot_product_attention,
              "enter": torch.amp.autocast_mode.autocast.__enter__}
    own = set(vars(torch.Tensor))
    hooks.install(lambda *a: None, lambda d: None,
                  {torch.Tensor.to: lambda f, a, k: f(*a, **k),
                   torch.nn.functional.scaled_dot_product_attention: lambda f, a, k: f(*a, **k)},
                  torch.overrides.TorchFunctionMode)
    assert hooks.installed() and torch.zeros is not before["zeros"]
    assert torch.Tensor.to is not before["to"]
    assert torch.ones(2).to(torch.float64).dtype == torch.float64
    # TorchScript finds operators by identity: the wrapper compiles as aten::zeros.
    from torch.jit._builtins import _find_builtin

    hook = torch.zeros
    assert _find_builtin(hook) == "aten::zeros"
    scripted = torch.jit.script(_plus_zeros)
    assert scripted(torch.ones(2)).tolist() == [1.0, 1.0]
    hooks.remove()
    assert _find_builtin(hook) is None
    after = {"zeros": torch.zeros, "fft": torch.fft.fftfreq, "to": torch.Tensor.to,
             "new": torch.Tensor.new_zeros, "sdpa": torch.nn.functional.scaled_dot_product_attention,
             "enter": torch.amp.autocast_mode.autocast.__enter__}
    assert after == before and set(vars(torch.Tensor)) == own and not hooks.installed()
