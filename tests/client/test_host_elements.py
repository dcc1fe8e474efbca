"""The scan that finds vGPU tensors in the Python data given to torch.tensor: it must find
one wherever it is nested, and leave data without one untouched (the same object)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from orion_vgpu.client import hooks


class _OnDevice(torch.Tensor):
    """Stands in for a vGPU tensor: the scan asks only ``is_cuda``."""

    @property  # type: ignore[override]
    def is_cuda(self) -> bool:
        return True


_leaves = st.one_of(st.floats(allow_nan=False), st.integers(), st.booleans(),
                    st.builds(lambda v: torch.tensor(v), st.floats(-5, 5)))
_data = st.recursive(st.lists(_leaves, max_size=4),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.tuples(inner, inner)), max_leaves=30)


def _insert(data: list | tuple, path: list[int], leaf: object) -> list | tuple:
    items = list(data)
    if not path or not items:
        items.append(leaf)
    else:
        i = path[0] % len(items)
        if type(items[i]) in (list, tuple):
            items[i] = _insert(items[i], path[1:], leaf)
        else:
            items.insert(i, leaf)
    return type(data)(items)


@given(_data)
def test_data_without_vgpu_tensors_is_left_as_it_is(data: list) -> None:
    assert hooks.host_elements(data) is data


@given(_data, st.lists(st.integers(0, 10), max_size=6))
def test_a_vgpu_tensor_is_found_at_any_depth(data: list, path: list[int]) -> None:
    leaf = torch.tensor(2.5).as_subclass(_OnDevice)
    assert hooks._holds_vgpu(_insert(data, path, leaf))
