"""The client's one-loop argument encoder (frontend._enc_fast) against the full walk
(frontend._Walk): for any arguments it accepts it must give the same wire encoding, the
same meta-cache key and the same input tensors, in order; mixed devices it leaves to the
walk (which raises). No pool: vGPU tensors here are bare wrappers that never reach one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.client import frontend as fe


def _remote(dev: int, handle: int, shape: tuple[int, ...]) -> fe.RemoteTensor:
    stride = torch.empty(shape).stride()
    return fe.wrap(shape, stride, 0, torch.float32, dev, handle)


_TENSORS = [_remote(0, 900_001 + i, s) for i, s in enumerate([(4,), (2, 3), (8, 8), ()])]
_OTHER_DEV = _remote(1, 900_100, (4,))

_tensor = st.sampled_from(_TENSORS)
_scalar = st.one_of(st.integers(-5, 5), st.booleans(), st.none(),
                    st.floats(-2, 2, allow_nan=False), st.sampled_from([torch.float16, "mean"]))
_arg = st.one_of(
    _tensor, _scalar,
    st.lists(st.integers(-3, 64), max_size=4),
    st.lists(_tensor, min_size=1, max_size=5),
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=5),
    st.lists(st.one_of(_tensor, st.integers(0, 3)), min_size=1, max_size=3),  # mixed
)


def _walk(args: tuple, kwargs: dict, value_keyed: bool) -> tuple:
    w = fe._Walk(None, value_keyed)
    encs, akey = w.enc_seq(args)
    enc_kw, kkey = w.enc_kwargs(kwargs)
    return encs, akey, enc_kw, kkey, w.dev, w.inputs


@settings(max_examples=300, deadline=None)
@given(args=st.lists(_arg, max_size=5), kwargs=st.dictionaries(
    st.sampled_from(["alpha", "dim", "out_dtype"]), st.one_of(_tensor, _scalar), max_size=2),
    value_keyed=st.booleans())
def test_fast_encoder_agrees_with_the_walk(args: list, kwargs: dict, value_keyed: bool) -> None:
    fast = fe._enc_fast(tuple(args), kwargs, value_keyed)
    if fast is None:
        return  # the walk handles it; nothing to compare
    encs, akey, enc_kw, kkey, dev, inputs = fast
    w_encs, w_akey, w_kw, w_kkey, w_dev, w_inputs = _walk(tuple(args), kwargs, value_keyed)
    assert (encs, akey, enc_kw, kkey, dev) == (w_encs, w_akey, w_kw, w_kkey, w_dev)
    assert [id(t) for t in inputs] == [id(t) for t in w_inputs]


@pytest.mark.parametrize("args", [
    (_TENSORS[:2], [_OTHER_DEV]),
    ([_TENSORS[0], _OTHER_DEV],),
    (_TENSORS[0], [_OTHER_DEV]),
])
def test_tensor_lists_on_two_vgpus_go_to_the_walk(args: tuple[Any, ...]) -> None:
    assert fe._enc_fast(args, {}, False) is None
    with pytest.raises(RuntimeError, match="same device"):
        _walk(args, {}, False)


def test_foreach_arguments_take_the_fast_path() -> None:
    ts = _TENSORS[:3]
    fast = fe._enc_fast((ts, ts, [0.5, 0.25, 0.125]), {"alpha": 2.0}, False)
    assert fast is not None
    assert fast[1] == (tuple(t._key for t in ts),) * 2 + ((float,) * 3,)
    assert [id(t) for t in fast[5]] == [id(t) for t in ts + ts]
