"""The network between client hosts and oriond cut while their programs run.

Two client hosts, each in its own network namespace on a bridge (faults/netns.py), reach
oriond and the controller on the bridge's gateway address over TCP, without shared
memory, like containers on a Docker subnet. One link is cut at the bridge end (the
program hears nothing any more), the other at the client end (its route is gone); either
way oriond hears nothing, not even a FIN. Each program must fail with one clear error
within a bounded time (TCP keepalive and user timeout), and oriond must notice too, end
both sessions and free everything. The two cuts run at once to halve the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from faults.netns import Subnet, bridged_hosts
from faults.procs import (
    Cluster,
    Controller,
    Oriond,
    Program,
    alive,
    assert_one_clear_error,
    check_pool,
    client_env,
    fd_count,
    measured,
    wait_for,
)

KEEPALIVE_S = 2  # ORION_KEEPALIVE_S on both sides: silence is noticed after ~8 s
# Keepalive (2 s idle + 3 probes 2 s apart) or the 8 s user timeout, then the program's
# exit, whose release to the unreachable controller gives up after 5 s.
CLIENT_ERROR_WITHIN_S = 30.0
SERVER_NOTICES_WITHIN_S = 30.0
ENDS = ("bridge", "client")


@pytest.fixture(scope="module")
def subnet() -> Iterator[Subnet]:
    with bridged_hosts(len(ENDS)) as subnet:
        yield subnet


@pytest.fixture(scope="module")
def pool(module_cluster: Cluster, subnet: Subnet) -> tuple[Controller, Oriond]:
    ctl = module_cluster.controller(host=subnet.gateway)
    srv = module_cluster.server(ctl, bind_addr=subnet.gateway,
                                env={"ORION_KEEPALIVE_S": str(KEEPALIVE_S)})
    return ctl, srv


def _program(cluster: Cluster, ctl: Controller, prefix: tuple[str, ...], name: str,
             *args: str) -> Program:
    # TCP only: a namespace shares this host's filesystem, so without ORION_ENABLE_NET
    # the client would take oriond's Unix socket and /dev/shm, which a container can't.
    env = client_env(ctl, cluster.root / name, ORION_ENABLE_NET="1", ORION_SHM="0",
                     ORION_KEEPALIVE_S=str(KEEPALIVE_S))
    return cluster.program("ticker.py", env, *args, prefix=prefix)


def test_network_cut_at_either_end(module_cluster: Cluster, pool: tuple[Controller, Oriond],
                                   subnet: Subnet) -> None:
    ctl, srv = pool
    check_pool(ctl, active=0)
    srv.wait_settled()
    fds = fd_count(srv.pid)
    progs = [_program(module_cluster, ctl, h.prefix, f"cut-{end}")
             for h, end in zip(subnet.hosts, ENDS, strict=True)]
    for prog in progs:
        prog.expect("TICK 3")
    allocs = [[a for a in ctl.all_allocations() if a["pid"] == p.pid][0] for p in progs]
    for a in allocs:
        assert a["vgpus"][0]["node_addr"].startswith(subnet.gateway + ":"), a
    workers = [srv.worker_of(a["id"]) for a in allocs]
    check_pool(ctl, active=2)

    t0 = time.monotonic()
    try:
        for host, end in zip(subnet.hosts, ENDS, strict=True):
            host.cut(end)
        for prog, end in zip(progs, ENDS, strict=True):
            prog.wait(max(1.0, CLIENT_ERROR_WITHIN_S - (time.monotonic() - t0)))
            measured(f"cut at the {end} end: program exited with its error",
                     time.monotonic() - t0)
            assert_one_clear_error(prog, "lost the session with Orion Server")
        assert wait_for(lambda: not any(alive(w) for w in workers),
                        SERVER_NOTICES_WITHIN_S - (time.monotonic() - t0)), (
            "oriond's worker still waits for a cut-off client")
        measured("cut: both of oriond's workers ended", time.monotonic() - t0)
        for a in allocs:
            assert wait_for(lambda a=a: ctl.allocation(a["id"])["state"] not in (
                "pending", "active"), 5), ctl.allocation(a["id"])
            assert "connection lost" in ctl.allocation(a["id"])["end_reason"]
        check_pool(ctl, active=0)
    finally:
        for host in subnet.hosts:
            host.restore()
    srv.wait_settled()
    assert fd_count(srv.pid) == fds, "oriond leaked file descriptors"

    # The links are back: a client host gets a vGPU and works again.
    again = _program(module_cluster, ctl, subnet.hosts[0].prefix, "again", "1")
    assert again.wait(60) == 0, again.describe()
    assert wait_for(lambda: check_pool(ctl)["vgpu_free"] == 8, 5)
