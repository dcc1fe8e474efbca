"""oriond SIGKILLed under running programs: each gets one clear error at its next op (no
hang), the controller marks the node down and ends its allocations within the heartbeat
timeout, no worker outlives the daemon, and a restarted oriond registers and serves again.
"""

from __future__ import annotations

import signal
import time

from faults.procs import (
    Cluster,
    Program,
    alive,
    assert_one_clear_error,
    check_pool,
    client_env,
    measured,
    timed,
    wait_for,
)

HEARTBEAT_S = 1.0  # the controller's interval; it declares a node down after 3 of them
HEARTBEAT_TIMEOUT_S = 3 * HEARTBEAT_S
# The controller's reaper runs every 0.5 s and oriond's last heartbeat may be 0.5 s old.
REAPER_SLACK_S = 1.0
# "Not a hang": the daemon's death reaches a program as soon as its worker exits.
ERROR_WITHIN_S = 10.0


def _alloc_id(ctl, prog: Program) -> str:  # noqa: ANN001
    ids = [a["id"] for a in ctl.all_allocations() if a["pid"] == prog.pid]
    assert len(ids) == 1, ids
    return ids[0]


def test_server_killed_then_restarted(cluster: Cluster) -> None:
    ctl = cluster.controller(heartbeat_interval_s=HEARTBEAT_S)
    srv = cluster.server(ctl)
    node_id = ctl.node(srv.name)["id"]
    busy = cluster.program("ticker.py", client_env(ctl, cluster.root / "busy"))
    # Over TCP and stopped: it cannot release its grant, so only the controller can end it.
    idle = cluster.program("ticker.py", client_env(ctl, cluster.root / "idle",
                                                   ORION_ENABLE_NET="1"))
    busy.expect("TICK 2")
    idle.expect("TICK 2")
    idle.signal(signal.SIGSTOP)
    busy_id, idle_id = _alloc_id(ctl, busy), _alloc_id(ctl, idle)
    workers = srv.worker_pids()
    check_pool(ctl, active=2)

    srv.kill_daemon()
    t0 = time.monotonic()
    busy.wait(ERROR_WITHIN_S)
    measured("oriond killed: busy program's error", time.monotonic() - t0)
    assert_one_clear_error(busy, "lost the session with Orion Server")
    assert wait_for(lambda: not any(alive(w) for w in workers), 5), "workers outlived oriond"

    # The node goes down and its allocations end within the heartbeat timeout.
    bound = HEARTBEAT_TIMEOUT_S + REAPER_SLACK_S
    assert timed(lambda: ctl.node(srv.name)["state"] == "down",
                 bound - (time.monotonic() - t0)) is not None, ctl.pool()["nodes"]
    measured("oriond killed: node down", time.monotonic() - t0)
    assert wait_for(lambda: ctl.allocation(idle_id)["state"] == "failed",
                    bound - (time.monotonic() - t0)), ctl.allocation(idle_id)
    assert ctl.allocation(idle_id)["end_reason"] == "node down"
    assert ctl.allocation(busy_id)["state"] in ("released", "failed")
    pool = check_pool(ctl, active=0)
    assert pool["vgpu_total"] == 0 and pool["vgpu_free"] == 0, pool

    # A program that was not running ops meets the same one error at its next op.
    idle.signal(signal.SIGCONT)
    idle.wait(ERROR_WITHIN_S)
    assert_one_clear_error(idle, "lost the session with Orion Server")

    # Restarted (same name, port and Unix socket path): same node, up, serving.
    srv.start()
    node = ctl.node(srv.name)
    assert node is not None and node["id"] == node_id and node["state"] == "up", node
    pool = check_pool(ctl, active=0)
    assert pool["vgpu_total"] == pool["vgpu_free"] == 8, pool
    after = cluster.program("ticker.py", client_env(ctl, cluster.root / "after"), "1")
    assert after.wait(60) == 0, after.describe()
    assert after.out[-1].startswith("RESULT ok")
    assert wait_for(lambda: check_pool(ctl)["vgpu_free"] == 8, 5)
    check_pool(ctl, active=0)
