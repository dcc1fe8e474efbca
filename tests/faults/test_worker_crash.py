"""A session worker that crashes (an op that aborts, a segfault) ends that session only:
its program gets one clear error, the allocation ends with the crash as its reason, the
program beside it on the same GPU keeps working, and oriond keeps serving."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import pytest

from faults.procs import (
    TESTS,
    Cluster,
    Controller,
    Oriond,
    Program,
    alive,
    assert_one_clear_error,
    check_pool,
    client_env,
    wait_for,
)


@pytest.fixture(scope="module")
def pool(module_cluster: Cluster) -> tuple[Controller, Oriond]:
    ctl = module_cluster.controller()
    # Every worker of this oriond is faults/abort_worker.py: the real one, except that
    # aten::sinh aborts it.
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {"ORION_WORKER_MODULE": "faults.abort_worker", "PYTHONPATH": path}
    return ctl, module_cluster.server(ctl, env=env)


@pytest.fixture(scope="module")
def neighbour(module_cluster: Cluster, pool: tuple[Controller, Oriond]) -> Iterator[Program]:
    """On the same GPU as the victims all along; ends without an error at the end."""
    ctl, _ = pool
    prog = module_cluster.program("ticker.py", client_env(ctl, module_cluster.root / "n"))
    prog.expect("TICK 2")
    yield prog
    prog.signal(signal.SIGUSR1)
    assert prog.wait(30) == 0, prog.describe()
    assert prog.out[-1].startswith("RESULT ok") and not prog.errors(), prog.describe()
    assert wait_for(lambda: check_pool(ctl)["vgpu_free"] == 8, 5)
    check_pool(ctl, active=0)


@pytest.fixture
def victims(module_cluster: Cluster, pool: tuple[Controller, Oriond],
            neighbour: Program) -> Iterator[None]:
    ctl, _ = pool
    assert wait_for(lambda: check_pool(ctl)["vgpu_free"] == 7, 10)
    started = len(module_cluster.programs)
    yield
    module_cluster.kill_programs(since=started)


def _alloc(ctl: Controller, prog: Program) -> dict:
    found = [a for a in ctl.all_allocations() if a["pid"] == prog.pid]
    assert len(found) == 1, found
    return found[0]


def _session(srv: Oriond, alloc_id: str) -> str:
    found = re.search(rf"session started \(alloc {alloc_id} vgpu 0\): session (\w+)",
                      srv.server_log())
    assert found, srv.server_log()
    return found.group(1)


def _only_victim_ended(ctl: Controller, srv: Oriond, victim: Program, neighbour: Program,
                       alloc: dict, signum: int) -> None:
    victim.wait(30)
    assert_one_clear_error(victim, "lost the session with Orion Server")
    worker = srv.worker_of(alloc["id"])
    assert wait_for(lambda: not alive(worker), 5)
    assert wait_for(lambda: ctl.allocation(alloc["id"])["state"] not in ("pending", "active"), 5)
    # Whichever comes first ends it: oriond's report of the crash, or the program's
    # release as it exits on the error. The server log names the crash either way.
    ended = ctl.allocation(alloc["id"])
    assert ended["end_reason"] in (f"killed by signal {signum}", "released by client"), ended
    assert wait_for(lambda: f"vgpu 0): session {_session(srv, alloc['id'])}: killed by signal "
                    f"{signum}" in srv.server_log(), 5), srv.server_log()
    # The neighbour on the same GPU never noticed; oriond still serves it and others.
    assert _alloc(ctl, neighbour)["vgpus"][0]["gpu_index"] == alloc["vgpus"][0]["gpu_index"]
    ticks = neighbour.ticks()
    assert wait_for(lambda: neighbour.ticks() >= ticks + 10, 20), neighbour.describe()
    assert srv.alive()
    assert wait_for(lambda: check_pool(ctl)["vgpu_free"] == 7, 5)
    check_pool(ctl, active=1)


def test_op_that_aborts_the_worker(module_cluster: Cluster, pool: tuple[Controller, Oriond],
                                   neighbour: Program, victims: None) -> None:
    ctl, srv = pool
    victim = module_cluster.program("abort_op.py", client_env(ctl, module_cluster.root / "a"))
    victim.expect("READY")
    alloc = _alloc(ctl, victim)
    _only_victim_ended(ctl, srv, victim, neighbour, alloc, signal.SIGABRT)
    assert not any(ln.startswith("AFTER") for ln in victim.out)


def test_worker_segfault(module_cluster: Cluster, pool: tuple[Controller, Oriond],
                         neighbour: Program, victims: None) -> None:
    ctl, srv = pool
    victim = module_cluster.program("ticker.py", client_env(ctl, module_cluster.root / "s"))
    victim.expect("TICK 2")
    alloc = _alloc(ctl, victim)
    os.kill(srv.worker_of(alloc["id"]), signal.SIGSEGV)  # what a crashing kernel does
    _only_victim_ended(ctl, srv, victim, neighbour, alloc, signal.SIGSEGV)
