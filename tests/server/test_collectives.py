"""orion_vgpu.server.collectives in process: two sessions' executors (real gloo between
them, one thread each) and what an untrusted client can send them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from orion_vgpu.protocol import messages as m
from orion_vgpu.server.collectives import Collectives
from orion_vgpu.server.executor import Executor, Missing, SessionError

CPU = torch.device("cpu")


def _pair(limit: int = 1 << 24, timeout_s: float = 60) -> list[Collectives]:
    """Two sessions joined in process group 1 (rank 0 hosts the store)."""
    cols = [Collectives(Executor(CPU, limit), CPU, f"s{r}") for r in range(2)]
    port = cols[0].init([m.CMD_PG_INIT, 1, {"step": "listen", "timeout_s": timeout_s}])["port"]
    spec = {"step": "join", "host": "127.0.0.1", "port": port, "prefix": "t" * 32,
            "size": 2, "timeout_s": timeout_s, "name": "g"}
    _both(lambda r: cols[r].init([m.CMD_PG_INIT, 1, dict(spec, rank=r)]))
    return cols


def _both(fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None, None]

    def run(r: int) -> None:
        try:
            out[r] = fn(r)
        except Exception as exc:  # returned, so the test can look at it
            out[r] = exc
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_coalesced_allreduce_avg_and_broadcast_in_place() -> None:
    cols = _pair()
    ts = [[torch.full((3,), float(r + 1)), torch.full((2, 2), 10.0 * (r + 1))] for r in (0, 1)]
    res = _both(lambda r: cols[r].run([m.CMD_COLLECTIVE, 1, "allreduce",
                                       {"tensors": ts[r], "op": "avg", "bucket_bytes": 8}]))
    assert res == [None, None]
    for r in (0, 1):
        assert ts[r][0].tolist() == [1.5] * 3 and ts[r][1].tolist() == [[15.0, 15.0]] * 2
    bs = [torch.arange(4.0) * (r + 1) for r in (0, 1)]
    _both(lambda r: cols[r].run([m.CMD_COLLECTIVE, 1, "broadcast", {"tensors": [bs[r]],
                                                                     "src": 1}]))
    assert bs[0].tolist() == bs[1].tolist() == [0.0, 2.0, 4.0, 6.0]
    for c in cols:
        c.close()


def test_a_failure_on_one_rank_ends_the_collective_on_the_other_at_once() -> None:
    """Rank 0 names a tensor it does not hold; rank 1, already inside the allreduce with a
    600 s timeout, fails when rank 0 drops the group, not at the timeout."""
    cols = _pair(timeout_s=600)
    x = torch.ones(4)

    def rank(r: int) -> Any:
        if r == 0:
            time.sleep(0.5)  # rank 1 is waiting in gloo by now
            return cols[0].run([m.CMD_COLLECTIVE, 1, "allreduce",
                                {"tensors": [Missing(7)], "op": "sum"}])
        return cols[1].run([m.CMD_COLLECTIVE, 1, "allreduce", {"tensors": [x], "op": "sum"}])
    t0 = time.monotonic()
    res = _both(rank)
    assert time.monotonic() - t0 < 60
    assert isinstance(res[0], SessionError) and "tensor handle 7" in str(res[0])
    assert isinstance(res[1], SessionError) and res[1].kind == "DistBackendError"
    assert "peer rank's vGPU session ended" in str(res[1])
    # the group is gone on both: later collectives fail at once with why
    for c in cols:
        with pytest.raises(SessionError, match="is not usable"):
            c.run([m.CMD_COLLECTIVE, 1, "barrier", {}])


def test_scratch_memory_counts_against_the_quota() -> None:
    cols = _pair(limit=4096)
    ts = [[torch.ones(300), torch.ones(300)] for _ in (0, 1)]  # 2.4 KB to coalesce
    for r in (0, 1):
        for t in ts[r]:
            cols[r].ex.store(10 + len(cols[r].ex.tensors), t)  # 2.4 KB held of 4 KB
    res = _both(lambda r: cols[r].run([m.CMD_COLLECTIVE, 1, "allreduce",
                                       {"tensors": ts[r], "op": "sum"}]))
    assert all(isinstance(e, SessionError) for e in res)
    assert any(e.kind == "OutOfMemoryError" for e in res)
    assert all(c.ex.ledger.used == 2400 for c in cols)  # the scratch was given back


@pytest.mark.parametrize("cmd, error", [
    ([m.CMD_PG_INIT, 1], "ProtocolError"),
    ([m.CMD_PG_INIT, -1, {"step": "listen", "timeout_s": 5}], "ProtocolError"),
    ([m.CMD_PG_INIT, 1, {"step": "listen", "timeout_s": 0}], "ProtocolError"),
    ([m.CMD_PG_INIT, 1, {"step": "listen", "timeout_s": 1e9}], "ProtocolError"),
    ([m.CMD_PG_INIT, 1, {"step": "shell"}], "ProtocolError"),
    ([m.CMD_PG_INIT, 1, {"step": "join", "host": "127.0.0.1", "port": 70000, "prefix": "p",
                         "rank": 0, "size": 1, "timeout_s": 5}], "ProtocolError"),
    ([m.CMD_PG_INIT, 1, {"step": "join", "host": "127.0.0.1", "port": 1, "prefix": "p",
                         "rank": 2, "size": 2, "timeout_s": 5}], "ProtocolError"),
    ([m.CMD_COLLECTIVE, 1, "allreduce", {"tensors": [], "op": "sum"}], "DistBackendError"),
    ([m.CMD_COLLECTIVE, 1, "allreduce"], "ProtocolError"),
])
def test_malformed_commands_are_refused(cmd: list, error: str) -> None:
    c = Collectives(Executor(CPU, 1 << 20), CPU, "s")
    with pytest.raises(SessionError) as info:
        (c.init if cmd[0] == m.CMD_PG_INIT else c.run)(cmd)
    assert info.value.kind == error


def test_bad_arguments_in_a_live_group() -> None:
    cols = _pair()
    for args, kind, text in [
        ({"tensors": [torch.ones(1)], "op": "premul"}, "allreduce", "not supported"),
        ({"tensors": [torch.ones(1, dtype=torch.int64)], "op": "avg"}, "allreduce", "AVG"),
        ({"tensors": "x", "op": "sum"}, "allreduce", "not a list"),
        ({"tensors": [torch.ones(1)], "src": 5}, "broadcast", "not in process group"),
        ({}, "nonsense", "unknown collective"),
    ]:
        with pytest.raises(SessionError, match=text):
            cols[0].run([m.CMD_COLLECTIVE, 1, kind, args])
        cols = _pair()  # a failed collective ends the group: set up a fresh pair
