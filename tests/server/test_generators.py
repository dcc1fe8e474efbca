"""A session's torch.Generator table: a program's generator objects live on the server by
id, draw as torch.Generator objects of the device do, and go with the handles freed."""

from __future__ import annotations

import msgpack
import pytest
import torch

from orion_vgpu.protocol import codec
from orion_vgpu.server import executor as executor_mod
from orion_vgpu.server.executor import Executor, SessionError


def _decode(ex: Executor, value: object) -> object:
    hook = codec.make_ext_hook(ex.resolve, ex.device, ex.generator)
    return msgpack.unpackb(msgpack.packb(value), ext_hook=hook)


def test_an_op_draws_from_the_named_generator_like_a_local_one() -> None:
    ex = Executor(torch.device("cpu"), 1 << 24)
    ex.define(1, "aten::randn.generator")
    ex.generator(7).manual_seed(3)
    args = _decode(ex, [[4]])
    kwargs = _decode(ex, {"generator": codec.generator_ext(7)})
    ex.run(1, args, kwargs, [100])
    ex.run(1, args, kwargs, [101])
    local = torch.Generator().manual_seed(3)
    assert torch.equal(ex.tensor(100), torch.randn(4, generator=local))
    assert torch.equal(ex.tensor(101), torch.randn(4, generator=local))  # the stream goes on


def test_a_new_id_starts_as_a_new_generator_and_id_zero_is_the_default() -> None:
    ex = Executor(torch.device("cpu"), 1 << 24)
    g = ex.generator(5)
    assert g is ex.generator(5) and g.initial_seed() == torch.Generator().initial_seed()
    assert ex.generator(0) is torch.default_generator


def test_freeing_the_id_drops_the_generator() -> None:
    ex = Executor(torch.device("cpu"), 1 << 24)
    ex.generator(9).manual_seed(1)
    ex.store(3, torch.ones(2))
    ex.free([9, 3])
    assert not ex.generators and not ex.tensors
    assert ex.generator(9).initial_seed() != 1  # a later use of the id starts afresh


def test_the_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_mod, "MAX_GENERATORS", 3)
    ex = Executor(torch.device("cpu"), 1 << 24)
    for gid in (1, 2, 3):
        ex.generator(gid)
    with pytest.raises(SessionError, match="at most 3 torch.Generator"):
        ex.generator(4)
    with pytest.raises(SessionError, match="negative"):
        Executor(torch.device("cpu"), 1 << 24).generator(-1)
