"""A captured stream's replay plan: the stream decoded once, each op's operator,
constants and output handles resolved once, so that a replay only binds handles and calls.

Handles are bound to the session's tensors as each op is reached (an op's output is a
later op's input). As a CUDA graph replays into the memory its capture allocated, an op
whose outputs are still the tensors its last run stored writes into them again (its
``out=`` overload): no allocation, nothing new for the ledger, and views made of them stay
valid; a view op whose input and output tensors are the same objects as last time is not
run again, unless an op that may change a tensor's sizes, strides or storage in place ran
since (``Executor.meta_epoch``: t_, squeeze_, resize_, set_, out= ops ...). Anything
else runs as in eager mode: outputs stored with the same memory ledger and quota, and ops
that need a check before they run (device arguments, sizes of new tensors, storages that
may grow) go through ``Executor.run`` with their arguments bound. The compute share is
charged once per replay, as for one CUDA graph launch. A replay that follows the last one
with no handle bound anew or freed and no tensor restrided in between (``Plan.state``)
skips those checks: each step that reads only tensors no step makes anew keeps the
arguments of its last run, its views are not looked at, its out= call is made at once
(an MLP step's replay of 67 steps: 302 -> 238-245 us in the worker). A stream holding
anything but ops and copies (a collective, a nested graph, a seed), or a view the client made without the
server (codec.EXT_VIEW, made before the capture), has no plan and runs command by command.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from orion_vgpu.protocol import codec
from orion_vgpu.protocol import messages as m
from orion_vgpu.server.executor import (
    Executor,
    OpInfo,
    SessionError,
    _flatten,
    oom_message,
)

PLANNED_KINDS = frozenset({m.CMD_OP, m.CMD_COPY})


class _Ref:
    """A handle in a decoded stream, bound to the session's tensor when its op runs."""

    __slots__ = ("h",)

    def __init__(self, h: int) -> None:
        self.h = h


def _missing(h: int) -> SessionError:
    return SessionError("RuntimeError", f"tensor handle {h} is not held by this session "
                        "(freed, or never created because of an earlier error)")


def _ref_handles(v: Any) -> list[int]:
    """The handles named anywhere in ``v`` (lists and dicts of them)."""
    out: list[int] = []
    stack = [v]
    while stack:
        x = stack.pop()
        if type(x) is _Ref:
            out.append(x.h)
        elif type(x) is list:
            stack.extend(x)
        elif type(x) is dict:
            stack.extend(x.values())
    return out


def _has_ref(v: Any) -> bool:
    return bool(_ref_handles(v))


def _bind_deep(v: Any, tensors: dict[int, torch.Tensor]) -> Any:
    if type(v) is _Ref:
        t = tensors.get(v.h)
        if t is None:
            raise _missing(v.h)
        return t
    if type(v) is list:
        return [_bind_deep(x, tensors) for x in v]
    return v


class _Template:
    """Arguments with handles: the constant parts kept, the handle slots listed."""

    __slots__ = ("args", "refs", "nested", "kwargs", "kw_refs")

    def __init__(self, args: list, kwargs: dict) -> None:
        self.args = list(args)
        self.refs = [(i, a.h) for i, a in enumerate(args) if type(a) is _Ref]
        self.nested = [(i, a) for i, a in enumerate(args) if type(a) is list and _has_ref(a)]
        self.kwargs = dict(kwargs)
        self.kw_refs = [(k, v) for k, v in kwargs.items() if _has_ref(v)]

    def handles(self) -> set[int]:
        """Every handle the arguments name."""
        return {h for _, h in self.refs} | set(
            _ref_handles([v for _, v in self.nested] + [v for _, v in self.kw_refs]))

    def bind(self, tensors: dict[int, torch.Tensor]) -> tuple[list, dict]:
        args = self.args.copy()
        for i, h in self.refs:
            t = tensors.get(h)
            if t is None:
                raise _missing(h)
            args[i] = t
        for i, v in self.nested:
            args[i] = _bind_deep(v, tensors)
        if not self.kw_refs:
            return args, self.kwargs
        kwargs = self.kwargs.copy()
        for k, v in self.kw_refs:
            kwargs[k] = _bind_deep(v, tensors)
        return args, kwargs


class Plan:
    """The steps of one captured stream (see the module's docstring)."""

    def __init__(self, ex: Executor, steps: list[Any]) -> None:
        self.ex = ex
        self.steps = steps
        # (Executor.tensors_version, Executor.meta_epoch) after the last replay, when the
        # steps' FAST kinds describe it; None: the next replay takes every step's checks.
        self.state: tuple[int, int] | None = None
        # A step that may restride a tensor changes what later views see: no fast replays.
        self.can_fast = not any(isinstance(st, _OpStep) and st.info.restrides for st in steps)

    @classmethod
    def build(cls, data: bytes, ex: Executor, device: torch.device) -> Plan | None:
        """The plan of a stream, or None when it holds commands that are not planned."""
        unpacker = msgpack.Unpacker(ext_hook=codec.make_ext_hook(_Ref, device, ex.generator),
                                    raw=False,
                                    strict_map_key=False, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        try:
            cmds = list(unpacker)
        except codec.CodecError:  # a client-made view (codec.EXT_VIEW): not planned
            return None
        steps: list[Any] = []
        for cmd in cmds:
            if not isinstance(cmd, list) or not cmd or cmd[0] not in PLANNED_KINDS:
                return None
            if cmd[0] == m.CMD_COPY:
                if len(cmd) != 3 or type(cmd[1]) is not _Ref or type(cmd[2]) is not _Ref:
                    return None
                steps.append(_CopyStep(cmd[1].h, cmd[2].h))
                continue
            if len(cmd) != 5:
                return None
            _, op_id, args, kwargs, outs = cmd
            info = ex.ops.get(op_id) if type(op_id) is int else None
            if info is None or not isinstance(args, list) or not isinstance(kwargs, dict) \
                    or not isinstance(outs, list) or any(type(h) is not int for h in outs):
                return None  # the command path reports it, in order
            steps.append(_OpStep(info, op_id, _Template(args, kwargs), outs))
        return cls(ex, steps)

    def run(self, fail: Callable[[SessionError], None]) -> None:
        """One replay; each failing step is reported through ``fail`` and the next runs,
        as the command path does (the first failure is what the program sees)."""
        ex = self.ex
        throttle, ex.throttle = ex.throttle, None  # one charge for the whole replay
        if throttle is not None:
            throttle.before_op()
        t0 = time.perf_counter()
        busy0 = ex.busy_s
        fast = self.state is not None and self.state == (ex.tensors_version, ex.meta_epoch)
        self.state = None
        failed = False
        try:
            all_fast = fast
            for step in self.steps:
                try:
                    if fast:
                        version = ex.tensors_version
                        step.run_fast(ex)
                        if ex.tensors_version != version and step.keeps:
                            # It bound a handle anew after all: later steps may read it,
                            # so the rest of this replay takes every check.
                            fast = all_fast = False
                    else:
                        step.run(ex)
                except SessionError as exc:
                    failed = True
                    fail(exc)
                except Exception as exc:  # an op's own error is the client's error
                    failed = True
                    fail(SessionError(type(exc).__name__, str(exc)))
            if not failed and self.can_fast:
                if not all_fast:
                    _prepare_fast(self.steps, ex)
                self.state = (ex.tensors_version, ex.meta_epoch)
        finally:
            spent = time.perf_counter() - t0
            # The replay is the session's time on the device, as one graph launch is (ops
            # written into their last outputs are not timed one by one).
            ex.busy_s = busy0 + spent
            ex.throttle = throttle
            if throttle is not None:
                throttle.after_op(spent)


class _CopyStep:
    __slots__ = ("dst", "src")
    keeps = True  # copies values into a tensor: binds no handle

    def __init__(self, dst: int, src: int) -> None:
        self.dst, self.src = dst, src

    def run(self, ex: Executor) -> None:
        ex.copy(self.dst, self.src)

    run_fast = run


class _OpStep:
    """One op of the plan, and what its last run left (see the module's docstring)."""

    __slots__ = ("info", "op_id", "tmpl", "outs", "checked", "view", "out_call", "out_spec",
                 "large", "last_out", "last_ids", "out_kw", "last_in", "epoch", "fast",
                 "args", "kwargs", "inputs", "keeps")

    def __init__(self, info: OpInfo, op_id: int, tmpl: _Template, outs: list) -> None:
        self.info, self.op_id, self.tmpl, self.outs = info, op_id, tmpl, outs
        self.checked = info.guarded or info.grows
        # Outputs the client named (an alias it did not ask for has handle 0): reusable.
        named = bool(outs) and all(h > 0 for h in outs)
        self.view = not self.checked and named and _is_view(info)
        self.out_call: Any = None
        self.out_spec: list[tuple[str, bool]] = []  # (out argument, takes a list)
        if not self.checked and not self.view and named:
            self.out_call, self.out_spec = _out_overload(info)
        self.large: bool | None = None  # shapes do not change between replays: known once
        self.last_out: tuple | None = None  # the tensors its last run stored
        self.last_ids: frozenset[int] = frozenset()  # their ids (_aliased)
        self.out_kw: dict[str, Any] = {}
        self.last_in: tuple = ()            # (view ops) the inputs of its last run
        self.epoch = -1                     # (view ops) Executor.meta_epoch after it
        self.fast = SLOW                    # what a fast replay does (_prepare_fast)
        self.args: list | None = None       # the arguments its last run was bound to
        self.kwargs: dict = {}
        self.inputs = tmpl.handles()
        self.keeps = False                  # binds no handle anew in a replay

    def run(self, ex: Executor) -> None:
        tensors = ex.tensors
        last = self.last_out
        bound = last is not None and _still_bound(tensors, self.outs, last)
        if bound and self.view and self._unchanged(ex, tensors):
            return
        args, kwargs = self.tmpl.bind(tensors)
        self.args, self.kwargs = args, kwargs
        if self.checked:
            ex.run(self.op_id, args, kwargs, self.outs)
            return
        if bound and self.out_call is not None and not _aliased(args, self.last_ids) \
                and self._into_last(ex, args, kwargs, last):
            return
        if ex.threads > 1:
            ex.use_threads(self._threads(ex, args))
        if self.info.restrides:
            ex.meta_epoch += 1
        _call(ex, self.info, args, kwargs, self.outs)
        self._remember(ex, args)

    def run_fast(self, ex: Executor) -> None:
        """``run`` in a replay that follows the last one with no handle bound or freed and
        no tensor restrided in between (``Plan.state``): a step whose inputs no step binds
        anew (``_prepare_fast``) sees the tensors of its last run, so it keeps its bound
        arguments, and a view of them is still right."""
        kind = self.fast
        if kind is SKIP:
            return
        if kind is SLOW:
            self.run(ex)
            return
        args, kwargs = self.args, self.kwargs
        if kind is IN_PLACE:
            if ex.threads > 1:
                ex.use_threads(self._threads(ex, args))
            ex.kernel(self.info.call, args, kwargs)
        elif not self._into_last(ex, args, kwargs, self.last_out):
            self.fast = SLOW  # its out= overload refused: the eager way reports why
            self.run(ex)

    def _threads(self, ex: Executor, args: list) -> int:
        large = self.large
        if large is None:
            large = self.large = ex.is_large(self.info, args)
        return ex.threads_for(self.info, large)

    def _remember(self, ex: Executor, args: list) -> None:
        if not self.outs or (self.out_call is None and not self.view):
            return
        last = tuple(ex.tensors.get(h) for h in self.outs)
        if any(t is None for t in last):
            return
        self.last_out = last
        self.last_ids = frozenset(id(t) for t in last)
        if self.view:
            self.last_in = tuple(a for a in args if isinstance(a, torch.Tensor))
            self.epoch = ex.meta_epoch
            return
        if len(self.out_spec) == 1 and self.out_spec[0][1]:
            self.out_kw = {self.out_spec[0][0]: list(last)}
        elif len(self.out_spec) == len(last):
            self.out_kw = {name: t for (name, _), t in zip(self.out_spec, last, strict=True)}
        else:
            self.out_call = None  # outputs and out= arguments do not pair up

    def _unchanged(self, ex: Executor, tensors: dict[int, torch.Tensor]) -> bool:
        """A view op's inputs (and outputs, checked by the caller) are the tensors of its
        last run, and no op since then may have changed a tensor's sizes, strides or
        storage in place (``Executor.meta_epoch``): the view it made is still right."""
        if ex.meta_epoch != self.epoch:
            return False
        tmpl = self.tmpl
        if tmpl.nested or tmpl.kw_refs or len(tmpl.refs) != len(self.last_in):
            return False
        for (_, h), t in zip(tmpl.refs, self.last_in, strict=True):
            if tensors.get(h) is not t:
                return False
        return True

    def _into_last(self, ex: Executor, args: list, kwargs: dict, last: tuple) -> bool:
        """Run the op into the tensors its last run stored; False if that cannot be done."""
        shapes = last[0].shape if len(last) == 1 else [t.shape for t in last]
        if ex.threads > 1:
            ex.use_threads(self._threads(ex, args))
        try:
            self.out_call(*args, **kwargs, **self.out_kw)
        except Exception:
            # Not as the overload expects (e.g. a dtype changed): run it the eager way,
            # which reports the op's own error if there is one.
            self.out_call = None
            return False
        ex.n_ops += 1
        if (last[0].shape != shapes if len(last) == 1
                else any(t.shape != s for t, s in zip(last, shapes, strict=True))):
            ex.meta_epoch += 1  # views of these outputs are stale now
            _recount(ex, last, self.outs)  # out= resized an output: the ledger follows
        return True


# What a step does in a fast replay (_OpStep.run_fast).
SLOW = "slow"          # its checks, as in any replay
SKIP = "skip"          # a view still right: nothing
INTO_LAST = "into"     # its out= overload into the tensors of its last run
IN_PLACE = "in place"  # an op that returns no tensor the client named: the kernel


def _prepare_fast(steps: list[Any], ex: Executor) -> None:
    """After a replay that ran every step's checks: the FAST kind of each step for the
    next replays. A step whose outputs are new tensors at each replay (a factory, an op
    with no out= overload, a view of such a tensor) binds its handles anew; every step
    that reads one of them keeps its checks. Loops until no step changes: a handle bound
    late in one replay is read early in the next."""
    tensors = ex.tensors
    fresh: set[int] = set()
    while True:
        grew = False
        for step in steps:
            if type(step) is not _OpStep:
                continue
            step.fast = _fast_kind(step, ex, tensors, fresh)
            step.keeps = step.fast is not SLOW or _writes_into_last(step, tensors)
            if not step.keeps:
                named = {h for h in step.outs if h > 0}
                if not named <= fresh:
                    fresh |= named
                    grew = True
        if not grew:
            return


def _writes_into_last(step: _OpStep, tensors: dict[int, torch.Tensor]) -> bool:
    """A step its checks will run into the tensors of its last run (``_OpStep.run``)
    whatever its inputs are; ``Plan._run`` stops a fast replay if it binds others."""
    last = step.last_out
    return not step.checked and step.out_call is not None and last is not None \
        and _still_bound(tensors, step.outs, last)


def _fast_kind(step: _OpStep, ex: Executor, tensors: dict[int, torch.Tensor],
               fresh: set[int]) -> str:
    if step.checked or step.args is None or step.inputs & fresh:
        return SLOW
    last = step.last_out
    if step.view:
        ok = last is not None and _still_bound(tensors, step.outs, last) \
            and step._unchanged(ex, tensors)
        return SKIP if ok else SLOW
    if step.large is None:
        step.large = ex.is_large(step.info, step.args)
    if not any(h > 0 for h in step.outs):
        return IN_PLACE
    if step.out_call is None or last is None or not _still_bound(tensors, step.outs, last) \
            or _aliased(step.args, step.last_ids):
        return SLOW
    return INTO_LAST


def _still_bound(tensors: dict[int, torch.Tensor], outs: list, last: tuple) -> bool:
    if len(outs) == 1:
        return tensors.get(outs[0]) is last[0]
    return all(tensors.get(h) is t for h, t in zip(outs, last, strict=True))


def _aliased(args: list, output_ids: frozenset[int]) -> bool:
    """An output tensor is also an argument (out= would read what it writes)."""
    for a in args:
        if type(a) is list:
            if any(id(x) in output_ids for x in a):
                return True
        elif id(a) in output_ids:
            return True
    return False


def _recount(ex: Executor, outputs: tuple, handles: list) -> None:
    ledger = ex.ledger
    for t in outputs:
        ledger.refresh(t)
    if ledger.used > ledger.limit:
        ex.free(handles)
        raise SessionError("OutOfMemoryError", oom_message(0, ledger))


def _is_view(info: OpInfo) -> bool:
    """Every output aliases an input and nothing is written: a view (t, detach, view...)."""
    returns = info.op._schema.returns
    return bool(returns) and not info.written and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _out_overload(info: OpInfo) -> tuple[Any, list[tuple[str, bool]]]:
    """The ``out=`` overload taking the same arguments as ``info``'s op, and its out
    arguments (name, is a list); (None, []) if there is none."""
    schema = info.op._schema
    if any(r.alias_info is not None for r in schema.returns):
        return None, []
    packet = getattr(torch.ops.aten, schema.name.partition("::")[2], None) \
        if schema.name.startswith("aten::") else None
    if packet is None:
        return None, []
    same = [(a.name, str(a.type)) for a in schema.arguments]
    for name in packet.overloads():
        overload = getattr(packet, name)
        args = overload._schema.arguments
        outs = [a for a in args if a.is_out]
        if outs and [(a.name, str(a.type)) for a in args if not a.is_out] == same:
            return overload._op, [(a.name, str(a.type).startswith("List")) for a in outs]
    return None, []


def _call(ex: Executor, info: OpInfo, args: list, kwargs: dict, outs: list) -> None:
    """``Executor.run`` for an op that neither needs a check first nor grows a storage."""
    result = ex.kernel(info.call, args, kwargs)  # Plan.run charges the replay's time
    if not outs:
        return
    flat = [result] if isinstance(result, torch.Tensor) else _flatten(result)
    if len(flat) != len(outs):
        raise SessionError("RuntimeError", f"operator returned {len(flat)} tensors, client "
                           f"expected {len(outs)}")
    ex.store_within_quota((h, t) for h, t in zip(outs, flat, strict=True) if h > 0)
