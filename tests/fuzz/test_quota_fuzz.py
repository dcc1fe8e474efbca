"""No sequence of ops takes a session past its quota, and the ledger never loses a byte.

Random programs of factories (any size, negative too), views, in-place resizes, set_,
out= ops, concatenations, data-dependent outputs, frees and copies run on the executor
with a 1 MiB quota. After every step:
- the ledger's count is at most the quota;
- it equals the bytes of the distinct storages the table holds, recounted from scratch
  (views count once; nothing escapes the count; nothing freed stays counted);
- every tensor of the table lies inside its storage (a rollback never leaves a view past
  the end of a shrunk storage).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_vgpu.server.executor import Executor, SessionError

LIMIT = 1 << 20
big = st.integers(-2, 2**42)
small = st.integers(0, 300)
sizes = st.lists(st.one_of(big, small), min_size=0, max_size=3)
small_sizes = st.lists(small, min_size=1, max_size=2)
ref = st.integers(0, 50)  # an index into the live handles, or a handle never created

FACTORIES = ["aten::empty.memory_format", "aten::zeros.default", "aten::ones.default",
             "aten::rand.default", "aten::randn.default"]

steps = st.one_of(
    st.tuples(st.just("factory"), st.sampled_from(FACTORIES), sizes),
    st.tuples(st.just("full"), sizes, st.sampled_from([1, 1.5, True, 2j])),
    st.tuples(st.just("strided"), sizes, st.lists(st.integers(0, 2**40), max_size=3)),
    st.tuples(st.just("arange"), st.integers(-2**45, 2**45)),
    st.tuples(st.just("resize_"), ref, sizes),
    st.tuples(st.just("view"), ref, st.sampled_from(["expand", "as_strided", "slice", "t",
                                                      "detach", "unsqueeze"]), small_sizes),
    st.tuples(st.just("set_"), ref, ref, st.integers(-1, 2**20), sizes),
    st.tuples(st.just("out"), st.sampled_from(["add", "mul", "cat", "empty", "ones"]), ref, ref,
              sizes),
    st.tuples(st.just("fresh"), st.sampled_from(["clone", "contiguous", "cat", "mul", "repeat",
                                                 "nonzero"]), ref, ref, st.integers(1, 64)),
    st.tuples(st.just("inplace"), st.sampled_from(["add_", "zero_", "squeeze_"]), ref, ref),
    st.tuples(st.just("free"), ref),
    st.tuples(st.just("copy"), ref, ref),
)


class Program:
    def __init__(self) -> None:
        self.ex = Executor(torch.device("cpu"), LIMIT)
        self.ids: dict[str, int] = {}
        self.next_handle = 1

    def op(self, name: str, args: list, kwargs: dict | None = None, n_out: int = 1,
           call: bool = False) -> None:
        if name not in self.ids:
            self.ids[name] = len(self.ids) + 1
            self.ex.define(self.ids[name], name)
        outs = list(range(self.next_handle, self.next_handle + n_out))
        self.next_handle += n_out
        if call:  # CMD_CALL: outputs stored afterwards, their size known only then
            result = self.ex.run(self.ids[name], args, kwargs or {}, [])
            self.ex.keep(outs, [result])
        else:
            self.ex.run(self.ids[name], args, kwargs or {}, outs)

    def t(self, i: int) -> Any:
        live = sorted(self.ex.tensors)
        return self.ex.resolve(live[i % len(live)] if live and i < 40 else 10_000 + i)

    def handle(self, i: int) -> int:
        live = sorted(self.ex.tensors)
        return live[i % len(live)] if live and i < 40 else 10_000 + i

    def step(self, s: tuple) -> None:  # noqa: C901 - one branch per kind of step
        kind = s[0]
        if kind == "factory":
            self.op(s[1], [s[2]])
        elif kind == "full":
            self.op("aten::full.default", [s[1], s[2]])
        elif kind == "strided":
            self.op("aten::empty_strided.default", [s[1], s[2]])
        elif kind == "arange":
            self.op("aten::arange.default", [s[1]])
        elif kind == "resize_":
            self.op("aten::resize_.default", [self.t(s[1]), s[2]], n_out=0)
        elif kind == "view":
            self._view(s[1], s[2], s[3])
        elif kind == "set_":
            self.op("aten::set_.source_Tensor_storage_offset",
                    [self.t(s[1]), self.t(s[2]), s[3], s[4]], n_out=0)
        elif kind == "out":
            self._out(s[1], s[2], s[3], s[4])
        elif kind == "fresh":
            self._fresh(s[1], s[2], s[3], s[4])
        elif kind == "inplace":
            args = [self.t(s[2])] + ([self.t(s[3])] if s[1] == "add_" else [])
            name = {"add_": "aten::add_.Tensor", "zero_": "aten::zero_.default",
                    "squeeze_": "aten::squeeze_.default"}[s[1]]
            self.op(name, args, n_out=0)
        elif kind == "free":
            self.ex.free([self.handle(s[1])])
        elif kind == "copy":
            self.ex.copy(self.handle(s[1]), self.handle(s[2]))

    def _view(self, i: int, how: str, size: list[int]) -> None:
        x = self.t(i)
        if how == "expand":
            self.op("aten::expand.default", [x, size])
        elif how == "as_strided":
            self.op("aten::as_strided.default", [x, size, [1] * len(size), 0])
        elif how == "slice":
            self.op("aten::slice.Tensor", [x, 0, 0, size[0], 1])
        elif how == "t":
            self.op("aten::t.default", [x])
        elif how == "detach":
            self.op("aten::detach.default", [x])
        else:
            self.op("aten::unsqueeze.default", [x, 0])

    def _out(self, how: str, i: int, j: int, size: list[int]) -> None:
        a, out = self.t(i), self.t(j)
        if how == "add":
            self.op("aten::add.out", [a, a], {"out": out}, n_out=0)
        elif how == "mul":
            self.op("aten::mul.out", [a, a], {"out": out}, n_out=0)
        elif how == "cat":
            self.op("aten::cat.out", [[a, a, a]], {"out": out}, n_out=0)
        else:
            self.op(f"aten::{how}.out", [size], {"out": out}, n_out=0)

    def _fresh(self, how: str, i: int, j: int, k: int) -> None:
        a, b = self.t(i), self.t(j)
        if how in ("clone", "contiguous"):
            self.op(f"aten::{how}.default", [a])
        elif how == "cat":
            self.op("aten::cat.default", [[a] * k])
        elif how == "mul":
            self.op("aten::mul.Tensor", [a, b])
        elif how == "repeat":
            self.op("aten::repeat.default", [a, [k, k]])
        else:
            self.op("aten::nonzero.default", [a], call=True)

    def check(self) -> None:
        led = self.ex.ledger
        assert led.used <= LIMIT, led.used
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                    for t in self.ex.tensors.values()}
        assert led.used == sum(storages.values()) == led.recount()
        for t in self.ex.tensors.values():
            if t.numel():
                extent = t.storage_offset() + 1 + sum(
                    (n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
                assert extent * t.element_size() <= t.untyped_storage().nbytes()


@settings(max_examples=400, deadline=None, stateful_step_count=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=st.lists(steps, min_size=1, max_size=40))
def test_no_program_exceeds_the_quota(program: list[tuple]) -> None:
    p = Program()
    for s in program:
        try:
            p.step(s)
        except SessionError:
            pass  # OutOfMemoryError and friends: reported to the client, session goes on
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError):
            pass  # the op's own error (bad shape...), reported the same way by the worker
        p.check()
