"""The Meta kernels a client process registers over PyTorch's (frontend.install_meta_factories):
for a meta device without an index they must give what PyTorch's own kernels give (every
meta tensor of a client process is made through them: shape inference, compile's fake
tensors). Called directly here, not registered: this process keeps PyTorch's kernels to
compare with. The meta:N side (a vGPU tensor) is covered end to end by
tests/e2e/test_training.py (masking.py, indexing.py)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.client import frontend as fe

aten = torch.ops.aten
META = torch.device("meta")
_sizes = st.lists(st.integers(0, 5), max_size=4)
_dtypes = st.sampled_from([None, torch.float32, torch.float16, torch.int64, torch.bool])


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.device == theirs.device == META
    assert (ours.shape, ours.stride(), ours.dtype) == (theirs.shape, theirs.stride(),
                                                       theirs.dtype)


@settings(max_examples=100, deadline=None)
@given(size=_sizes, dtype=_dtypes)
def test_zeros_ones_empty_as_pytorch_makes_them(size: list[int], dtype: Any) -> None:
    for op, ref in ((aten.zeros.default, torch.zeros), (aten.ones.default, torch.ones),
                    (aten.empty.memory_format, torch.empty)):
        _same(fe._meta_factory(op)(size, dtype=dtype, device=META),
              ref(size, dtype=dtype, device=META))


@settings(max_examples=100, deadline=None)
@given(size=_sizes, dtype=_dtypes,
       value=st.one_of(st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False),
                       st.complex_numbers(max_magnitude=2, allow_nan=False)))
def test_full_and_scalar_tensor_infer_the_dtype_as_pytorch(size: list[int], dtype: Any,
                                                           value: Any) -> None:
    if dtype is not None and isinstance(value, complex):
        return  # PyTorch refuses a complex fill of a real dtype; not our case to mirror
    _same(fe._meta_factory(aten.full.default)(size, value, dtype=dtype, device=META),
          torch.full(size, value, dtype=dtype, device=META))
    _same(fe._meta_factory(aten.scalar_tensor.default)(value, dtype=dtype, device=META),
          torch.scalar_tensor(value, dtype=dtype, device=META))


def test_channels_last_empty_keeps_its_strides() -> None:
    for fmt in (torch.channels_last, torch.contiguous_format):
        _same(fe._meta_factory(aten.empty.memory_format)([2, 3, 4, 5], device=META,
                                                          memory_format=fmt),
              torch.empty([2, 3, 4, 5], device=META, memory_format=fmt))
