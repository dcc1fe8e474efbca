"""Host tensors the program pins: copies marked pinned, as CUDA's pin_memory makes them."""

from __future__ import annotations

import gc

import pytest
import torch

from orion_vgpu.client import pinned


def test_pin_memory_returns_a_pinned_copy_with_the_same_layout() -> None:
    src = torch.arange(6.0).reshape(2, 3).t()
    pin = pinned.pin(src)
    assert pinned.is_pinned(pin) and not pinned.is_pinned(src)
    assert pin.stride() == src.stride() and torch.equal(pin, src)
    pin.zero_()
    assert src.sum().item() == 15.0  # a copy: the source keeps its values


def test_views_share_the_mark_and_pinning_twice_is_the_same_tensor() -> None:
    pin = pinned.pin(torch.ones(8))
    assert pinned.is_pinned(pin[2:]) and pinned.is_pinned(pin.view(2, 4))
    assert pinned.pin(pin) is pin


def test_the_mark_goes_with_the_storage() -> None:
    before = len(pinned._PINNED)
    pin = pinned.pin(torch.ones(8))
    view = pin[1:]
    del pin
    gc.collect()
    assert pinned.is_pinned(view)  # the storage lives on in the view
    del view
    gc.collect()
    assert len(pinned._PINNED) == before


def test_only_host_tensors_pin() -> None:
    with pytest.raises(RuntimeError, match="only dense CPU tensors can be pinned"):
        pinned.pin(torch.ones(2, device="meta"))
    assert not pinned.is_pinned(torch.ones(2, device="meta"))
