"""A client program SIGKILLed at any moment: its grants, sessions and server memory are freed
within 5 s and the other programs on the same server and GPU see nothing.

``tests/e2e/test_faults.py`` covers a program holding one vGPU; these add several vGPUs
and bulk transfers in flight. One pool and one neighbour program serve the whole module:
the neighbour works through every kill and must end without a single error, and each
test leaves the pool (and oriond's fds, and /dev/shm) as it found it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from faults.procs import (
    Cluster,
    Controller,
    Oriond,
    Program,
    alive,
    check_pool,
    client_env,
    fd_count,
    measured,
    shm_files,
    timed,
    used_bytes,
    wait_for,
)

FREED_WITHIN_S = 5.0  # the requirement
NEIGHBOUR_BYTES = 8 << 20  # what ticker.py holds per vGPU


@pytest.fixture(scope="module")
def pool(module_cluster: Cluster) -> tuple[Controller, Oriond]:
    ctl = module_cluster.controller()
    return ctl, module_cluster.server(ctl)


@pytest.fixture(scope="module")
def neighbour(module_cluster: Cluster, pool: tuple[Controller, Oriond]) -> Iterator[Program]:
    """Works on the same GPU as the victims (binpack) all along; ends cleanly at the end."""
    ctl, _ = pool
    prog = module_cluster.program("ticker.py", client_env(ctl, module_cluster.root / "n"))
    prog.expect("TICK 2")
    yield prog
    prog.signal(signal.SIGUSR1)
    assert prog.wait(60) == 0, prog.describe()
    assert prog.out[-1].startswith("RESULT ok") and not prog.errors(), prog.describe()


@pytest.fixture
def clean_pool(module_cluster: Cluster, pool: tuple[Controller, Oriond],
               neighbour: Program) -> Iterator[tuple[Controller, Oriond]]:
    """Only the neighbour holds a vGPU before and after; oriond's fds and /dev/shm are as
    they were."""
    ctl, srv = pool
    assert wait_for(lambda: len(_active(ctl)) == 1, 10)
    busy = [srv.worker_of(_alloc_of(ctl, neighbour)["id"])]
    srv.wait_settled(busy=busy)
    fds = fd_count(srv.pid)
    shm = shm_files()
    started = len(module_cluster.programs)
    yield ctl, srv
    module_cluster.kill_programs(since=started)  # a failed test's victim must not linger
    assert wait_for(lambda: len(_active(ctl)) == 1, 10), "allocations left"
    check_pool(ctl, active=1)
    srv.wait_settled(busy=busy)
    assert fd_count(srv.pid) == fds, "oriond leaked file descriptors"
    assert shm_files() <= shm, "a killed program left its shared memory arena"


def _near(used: int, expected: int) -> bool:
    # Scalars of .item() live until the client's next batch of frees: a few KiB.
    return expected <= used <= expected + (64 << 10)


def _active(ctl: Controller) -> list[dict]:
    return [a for a in ctl.all_allocations() if a["state"] in ("pending", "active")]


def _alloc_of(ctl: Controller, prog: Program) -> dict:
    found = [a for a in _active(ctl) if a["pid"] == prog.pid]
    assert len(found) == 1, (prog.pid, _active(ctl))
    return found[0]


def _kill_and_check_freed(ctl: Controller, srv: Oriond, victim: Program,
                          neighbour: Program, what: str) -> None:
    """SIGKILL ``victim``; grant, sessions, workers and memory go within 5 s; the
    neighbour keeps its session and keeps working."""
    alloc = _alloc_of(ctl, victim)
    workers = [srv.worker_of(alloc["id"], v["index"]) for v in alloc["vgpus"]]
    assert all(alive(w) for w in workers)
    victim.signal(signal.SIGKILL)
    t0 = time.monotonic()
    gone = timed(lambda: ctl.allocation(alloc["id"])["state"] not in ("pending", "active"),
                 FREED_WITHIN_S)
    assert gone is not None, f"grant not freed within {FREED_WITHIN_S} s"
    measured(f"program killed {what}: grant freed", gone)
    assert wait_for(lambda: not any(alive(w) for w in workers), FREED_WITHIN_S - gone)
    # Heartbeats report what the sessions hold: only the neighbour's memory is left.
    left = FREED_WITHIN_S - (time.monotonic() - t0)
    assert wait_for(lambda: _near(used_bytes(ctl), NEIGHBOUR_BYTES), left), used_bytes(ctl)
    ended = ctl.allocation(alloc["id"])
    assert ended["state"] == "released", ended
    # A killed program is a disconnect, not a failure of the server's worker.
    assert ended["end_reason"] == "client disconnected", ended
    ticks = neighbour.ticks()
    assert wait_for(lambda: neighbour.ticks() >= ticks + 5, 20), neighbour.describe()
    assert _alloc_of(ctl, neighbour)["vgpus"][0]["gpu_index"] == alloc["vgpus"][0]["gpu_index"]


def test_sigkill_holding_several_vgpus(module_cluster: Cluster,
                                       clean_pool: tuple[Controller, Oriond],
                                       neighbour: Program) -> None:
    ctl, srv = clean_pool
    victim = module_cluster.program(
        "ticker.py", client_env(ctl, module_cluster.root / "v-several", ORION_VGPU="3"))
    assert victim.expect("READY") == "READY 3"
    victim.expect("TICK 3")
    assert len(_alloc_of(ctl, victim)["vgpus"]) == 3
    check_pool(ctl, active=2)
    assert wait_for(lambda: _near(used_bytes(ctl), 4 * NEIGHBOUR_BYTES), 5), used_bytes(ctl)
    _kill_and_check_freed(ctl, srv, victim, neighbour, "holding 3 vGPUs")


@pytest.mark.parametrize(("direction", "path"), [
    ("down", "tcp"),   # the worker is sending a 32 MiB reply
    ("up", "shm"),     # the client is copying into the shared-memory ring
])
def test_sigkill_during_bulk_transfer(module_cluster: Cluster,
                                      clean_pool: tuple[Controller, Oriond],
                                      neighbour: Program, direction: str, path: str) -> None:
    ctl, srv = clean_pool
    extra = {"ORION_ENABLE_NET": "1", "ORION_SHM": "0"} if path == "tcp" else {}
    victim = module_cluster.program(
        "bulk.py", client_env(ctl, module_cluster.root / f"v-{direction}-{path}", **extra),
        direction)
    victim.expect("READY")
    victim.expect("XFER 3")
    _kill_and_check_freed(ctl, srv, victim, neighbour, f"during {direction}load ({path})")


def test_sigkill_in_the_middle_of_an_upload(module_cluster: Cluster,
                                           clean_pool: tuple[Controller, Oriond],
                                           neighbour: Program) -> None:
    """Half of a 32 MiB payload sent over TCP: the worker is inside recv_into."""
    ctl, srv = clean_pool
    victim = module_cluster.program(
        "half_upload.py", client_env(ctl, module_cluster.root / "v-half", ORION_ENABLE_NET="1",
                                     ORION_SHM="0"))
    victim.expect("HALF")
    _kill_and_check_freed(ctl, srv, victim, neighbour, "in the middle of an upload (tcp)")
