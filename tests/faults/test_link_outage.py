"""oriond's controller link during a long controller outage (in process, no sockets).

A restarted controller gives a known node one heartbeat timeout (3 intervals) to come
back before it fails the node's allocations, whose programs are still running. So once
registered, oriond must retry at least once per heartbeat interval however long the
outage lasts; before the fix its backoff grew to 30 s and the node came back too late
(found by faults/test_controller_restart.py).
"""

from __future__ import annotations

import threading
import time

import httpx

from orion_vgpu.server.registration import Backoff, ControllerLink

INTERVAL_S = 0.1


class Outage:
    """A controller that answers, then refuses connections; records when it was tried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down = False
        self.tries: list[float] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            if self.down:
                self.tries.append(time.monotonic())
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.path.endswith("/nodes/register"):
            return httpx.Response(200, json={"node_id": "n1", "heartbeat_interval_s": INTERVAL_S,
                                             "heartbeat_timeout_s": 3 * INTERVAL_S})
        return httpx.Response(200, json={"ok": True})


def test_retries_at_least_once_per_heartbeat_interval_during_an_outage() -> None:
    ctl = Outage()
    link = ControllerLink(controller_addr="127.0.0.1:1", pool_token="t",
                          registration={"name": "n", "gpus": [], "vgpu_count": 1},
                          stats=lambda: {"gpus": []}, on_registered=lambda _id: None,
                          transport=httpx.MockTransport(ctl.handler))  # max backoff 30 s
    link.start()
    try:
        assert link.registered.wait(5)
        with ctl.lock:
            ctl.down = True
        time.sleep(12 * INTERVAL_S)  # long enough for an uncapped backoff to reach 1.6 s
        with ctl.lock:
            tries = list(ctl.tries)
    finally:
        link.stop(flush_timeout=0.1)
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert len(tries) >= 6 and max(gaps) < 2 * INTERVAL_S, gaps


def test_backoff_cap_only_lowers() -> None:
    b = Backoff(first=0.5, maximum=30.0)
    b.cap(2.0)
    assert max(b.next() for _ in range(10)) <= 2.0 * 1.1
    b.cap(60.0)
    assert b.maximum == 2.0
    b.cap(0.1)
    assert b.first == b.current == b.maximum == 0.1
