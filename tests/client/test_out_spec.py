"""The op cache's output spec (frontend._OutSpec): the shortcuts _generic takes from it must
describe the same tensor as the general path. No pool: wrappers here never reach one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.client import frontend as fe

_size = st.lists(st.integers(0, 5), max_size=4).map(tuple)


def _new_item(size: tuple, stride: tuple, offset: int) -> tuple:
    meta = (size, stride, offset, torch.float32)
    return ("new", *meta, -1, 4096, meta, None)


@settings(max_examples=300, deadline=None)
@given(size=_size, data=st.data())
def test_a_dense_output_is_made_from_its_sizes_alone_with_the_same_layout(
        size: tuple, data: st.DataObject) -> None:
    contiguous = torch.empty(size).stride()
    stride = data.draw(st.one_of(st.just(contiguous),
                                 st.lists(st.integers(0, 40), min_size=len(size),
                                          max_size=len(size)).map(tuple)))
    offset = data.draw(st.sampled_from([0, 0, 3]))
    spec = fe._OutSpec("tensor", [_new_item(size, stride, offset)], 4096)
    full = fe.wrap(size, stride, offset, torch.float32, 0, 0)
    assert spec.one is not None and spec.alias == -1
    if spec.dense:
        short = fe.wrap(size, stride, offset, torch.float32, 0, 0, dense=True)
        assert (short.shape, short.stride(), short.storage_offset()) == \
            (full.shape, full.stride(), full.storage_offset())
    else:
        assert offset != 0 or tuple(stride) != contiguous


def test_an_in_place_op_returns_its_input_and_builds_nothing() -> None:
    spec = fe._OutSpec("tensor", [("alias", 1)], 0)
    assert (spec.alias, spec.one, spec.dense) == (1, None, False)
    assert fe._OutSpec("tuple", [("alias", 0), ("alias", 1)], 0).alias == -1
