"""The controller SIGKILLed and restarted while programs run.

The data plane does not need the controller, so running programs keep working; a program
that ends while it is down is accounted for once it is back; new allocations work after
the restart; after every step the API shows a consistent pool (no leaked or doubled vGPU).
"""

from __future__ import annotations

import signal
import time

from faults.procs import (
    Cluster,
    Controller,
    Program,
    check_pool,
    client_env,
    measured,
    wait_for,
)

LIVE = ("pending", "active")
HEARTBEAT_S = 1.0  # the controller's: after a restart it waits 3 of them for each node
OUTAGE_S = 10.0


def _alloc_id(ctl: Controller, prog: Program) -> str:
    ids = [a["id"] for a in ctl.all_allocations() if a["pid"] == prog.pid]
    assert len(ids) == 1, ids
    return ids[0]


def _keeps_ticking(*progs: Program, rounds: int = 10) -> None:
    start = [p.ticks() for p in progs]
    assert wait_for(lambda: all(p.ticks() >= s + rounds for p, s in zip(progs, start,
                                                                         strict=True)), 20), [
        p.describe() for p in progs]


def test_controller_killed_and_restarted(cluster: Cluster) -> None:
    ctl = cluster.controller(heartbeat_interval_s=HEARTBEAT_S)
    srv = cluster.server(ctl)
    one = cluster.program("ticker.py", client_env(ctl, cluster.root / "one"))
    two = cluster.program("ticker.py", client_env(ctl, cluster.root / "two", ORION_VGPU="2"))
    one.expect("TICK 2")
    two.expect("TICK 2")
    one_id, two_id = _alloc_id(ctl, one), _alloc_id(ctl, two)
    assert check_pool(ctl, active=2)["vgpu_free"] == 5

    ctl.kill()
    down_at = time.monotonic()
    _keeps_ticking(one, two)
    # Ends while the controller is down: oriond holds the session_ended event for later.
    two.signal(signal.SIGKILL)
    two.wait(10)
    _keeps_ticking(one)

    # Down for longer than the heartbeat timeout, so oriond's retries have backed off:
    # they must still reach the restarted controller before it gives up on the node.
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    ctl.start()  # same port and data dir
    t0 = time.monotonic()
    # Straight after the restart the stored state is consistent, before any heartbeat.
    check_pool(ctl)
    assert ctl.allocation(one_id)["state"] == "active"
    assert wait_for(lambda: ctl.node(srv.name)["state"] == "up", 10), ctl.pool()["nodes"]
    assert wait_for(lambda: ctl.allocation(two_id)["state"] not in LIVE, 10), (
        ctl.allocation(two_id))
    measured("controller restarted: allocation of the program that ended meanwhile ended",
             time.monotonic() - t0)
    assert "client disconnected" in ctl.allocation(two_id)["end_reason"]
    # Past the restarted controller's grace for the node: the survivor still holds its vGPU.
    time.sleep(max(0.0, 3 * HEARTBEAT_S + 1.0 - (time.monotonic() - t0)))
    assert ctl.allocation(one_id)["state"] == "active", ctl.allocation(one_id)
    assert check_pool(ctl, active=1)["vgpu_free"] == 7
    _keeps_ticking(one)

    # New allocations work, and are placed beside the surviving one, not on top of it.
    new = cluster.program("ticker.py", client_env(ctl, cluster.root / "new"), "1")
    new.expect("READY")
    assert check_pool(ctl, active=2)["vgpu_free"] == 6
    assert new.wait(60) == 0, new.describe()
    assert wait_for(lambda: len([a for a in ctl.all_allocations() if a["state"] in LIVE]) == 1,
                    5)
    check_pool(ctl, active=1)

    one.signal(signal.SIGUSR1)  # ends normally: releases through the restarted controller
    assert one.wait(30) == 0, one.describe()
    assert ctl.allocation(one_id)["end_reason"] == "released by client"
    assert check_pool(ctl, active=0)["vgpu_free"] == 8
    assert len(ctl.all_allocations()) == 3  # nothing created twice
