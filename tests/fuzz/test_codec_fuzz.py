"""The argument codec: arbitrary argument trees round-trip; malformed ext values and
values the protocol cannot carry are CodecError, never anything that runs code."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol import codec

REMOTE = torch.device("cpu")  # an emulated GPU session's device


class Handle:
    """Stands for a RemoteTensor in the generated trees: encodes as a handle ext value."""

    def __init__(self, h: int) -> None:
        self.h = h


class Gen(Handle):
    """Stands for a vGPU's torch.Generator: encodes as a generator ext value."""


def _client_default(obj: Any) -> Any:
    if isinstance(obj, Gen):
        return codec.generator_ext(obj.h)
    if isinstance(obj, Handle):
        return codec.handle_ext(obj.h)
    return codec.encode_default(obj)


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.text(max_size=20),
    st.sampled_from(codec.DTYPES), st.sampled_from(codec.MEMFMTS),
    st.sampled_from(codec.LAYOUTS),
    st.sampled_from([torch.device("cuda:0"), torch.device("cpu")]),
    st.complex_numbers(allow_nan=False), st.integers(-(2**63), 2**63 - 1).map(Handle),
    st.integers(-(2**63), 2**63 - 1).map(Gen),
    st.lists(st.integers(0, 1 << 20), max_size=4).map(torch.Size),
)
trees = st.recursive(leaves, lambda kids: st.lists(kids, max_size=5), max_leaves=30)


def _expected(v: Any) -> Any:
    """What the server must see for what the client sent."""
    if isinstance(v, Gen):
        return ("generator", v.h)
    if isinstance(v, Handle):
        return ("tensor", v.h)
    if isinstance(v, torch.device):
        return REMOTE if v.type == "cuda" else torch.device("cpu")
    if isinstance(v, torch.Size):
        return list(v)
    if isinstance(v, list):
        return [_expected(x) for x in v]
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(args=st.lists(trees, max_size=6), kwargs=st.dictionaries(st.text(max_size=8), trees,
                                                                   max_size=4))
def test_argument_trees_round_trip(args: list, kwargs: dict) -> None:
    body = msgpack.packb([1, 7, args, kwargs, []], default=_client_default)
    hook = codec.make_ext_hook(lambda h: ("tensor", h), REMOTE, lambda g: ("generator", g))
    got = msgpack.unpackb(body, ext_hook=hook, raw=False, strict_map_key=False)
    assert _same(got[2], _expected(args))
    assert got[3].keys() == kwargs.keys()
    assert all(_same(got[3][k], _expected(v)) for k, v in kwargs.items())


@settings(max_examples=500, deadline=None)
@given(code=st.integers(0, 127), data=st.binary(max_size=24))
def test_malformed_ext_values_are_codec_errors(code: int, data: bytes) -> None:
    hook = codec.make_ext_hook(lambda h: ("tensor", h), REMOTE)
    packed = msgpack.packb(msgpack.ExtType(code, data))
    try:
        value = msgpack.unpackb(packed, ext_hook=hook)
    except codec.CodecError:
        return
    # Only the well-formed shapes decode, and only to protocol values.
    assert (code, len(data)) in {(codec.EXT_HANDLE, 8), (codec.EXT_COMPLEX, 16)} or len(data) == 1
    assert isinstance(value, (tuple, torch.dtype, torch.memory_format, torch.layout,
                              torch.device, complex))


def _view_hook() -> Any:
    return codec.make_ext_hook(lambda h: ("tensor", h), REMOTE,
                               resolve_view=lambda h, size, stride, off: ("view", h, size,
                                                                          stride, off))


dims = st.integers(0, codec.MAX_VIEW_DIMS)
i64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(h=i64, shape=dims.flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 2**40), min_size=n, max_size=n),
    st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n))),
    offset=st.integers(0, 2**40))
def test_client_made_views_round_trip(h: int, shape: tuple, offset: int) -> None:
    size, stride = shape
    packed = msgpack.packb([codec.view_ext(h, size, stride, offset)])
    got = msgpack.unpackb(packed, ext_hook=_view_hook())
    assert got == [("view", h, tuple(size), tuple(stride), offset)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=16 * (codec.MAX_VIEW_DIMS + 3)))
def test_malformed_views_are_codec_errors(data: bytes) -> None:
    packed = msgpack.packb(msgpack.ExtType(codec.EXT_VIEW, data))
    well_formed = len(data) >= 16 and len(data) % 16 == 0 \
        and (len(data) - 16) // 16 <= codec.MAX_VIEW_DIMS
    if well_formed:
        assert msgpack.unpackb(packed, ext_hook=_view_hook())[0] == "view"
    else:
        with pytest.raises(codec.CodecError):
            msgpack.unpackb(packed, ext_hook=_view_hook())
    with pytest.raises(codec.CodecError):  # where views are not taken (graph bodies)
        msgpack.unpackb(packed, ext_hook=codec.make_ext_hook(lambda h: h, REMOTE))


@pytest.mark.parametrize("value", [
    lambda: 0, print, object(), type, torch.nn.Linear(1, 1), torch.zeros(1),
    torch.float8_e4m3fn, torch.sparse_csr, slice(1, 2), Ellipsis, {1, 2}, __import__("os"),
])
def test_nothing_but_protocol_values_can_be_sent(value: Any) -> None:
    with pytest.raises(codec.CodecError):
        msgpack.packb([value], default=codec.encode_default)


def test_unpacker_limits_are_protocol_errors() -> None:
    """Deep nesting and oversized buffers fail as msgpack errors the worker answers."""
    with pytest.raises(msgpack.UnpackException):
        msgpack.unpackb(b"\x91" * 5000 + b"\xc0")
    unpacker = msgpack.Unpacker(max_buffer_size=1024)
    with pytest.raises(msgpack.UnpackException):
        unpacker.feed(b"\x00" * 2048)
