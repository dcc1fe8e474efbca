"""ControllerLink against a scripted controller (httpx.MockTransport): register,
heartbeat, re-register on 404, quiet retries while down, events delivered in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orion_vgpu.server.registration import ControllerLink

REGISTRATION = {"name": "node-a", "addr": "127.0.0.1:9960", "vgpu_count": 4,
                "gpus": [{"index": 0}, {"index": 1}]}  # fmt: skip


class FakeController:
    """Answers like the controller of docs/architecture.md; switchable down/amnesic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.known: set[str] = set()
        self.down = False
        self.token = "pool-token-1"
        self.registrations = 0
        self.unknown_allocations: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            if self.down:
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return httpx.Response(401, json={"error": "unauthorized", "detail": "bad token"})
            body = __import__("json").loads(request.content or b"{}")
            path = request.url.path.removeprefix("/api/v1")
            self.calls.append((path, body))
            if path == "/nodes/register":
                self.registrations += 1
                self.known.add("node-1")
                return httpx.Response(200, json={"node_id": "node-1", "heartbeat_interval_s": 0.05,
                                                 "heartbeat_timeout_s": 1.0})  # fmt: skip
            node = path.split("/")[2]
            if node not in self.known:
                return httpx.Response(404, json={"error": "unknown_node", "detail": node})
            if path.endswith("/events") and body.get("allocation_id") in self.unknown_allocations:
                return httpx.Response(404, json={"error": "unknown_allocation"})
            return httpx.Response(200, json={"ok": True})

    def paths(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.calls]

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [b for p, b in self.calls if p.endswith("/events")]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def make_link(fake: FakeController, token: str = "pool-token-1") -> tuple[ControllerLink, list[str]]:
    node_ids: list[str] = []
    link = ControllerLink(
        controller_addr="127.0.0.1:9123",
        pool_token=token,
        registration=REGISTRATION,
        stats=lambda: {"sessions": [], "gpus": [{"uuid": "EMU-0", "mem_used_bytes": 0, "busy_pct": 0.0}]},
        on_registered=node_ids.append,
        transport=httpx.MockTransport(fake.handler),
        max_backoff=0.05,
    )
    return link, node_ids


def test_registers_and_heartbeats() -> None:
    fake = FakeController()
    link, node_ids = make_link(fake)
    link.start()
    try:
        wait_for(lambda: fake.paths().count("/nodes/node-1/heartbeat") >= 3)
    finally:
        link.stop()
    assert fake.paths()[0] == "/nodes/register"
    assert fake.calls[0][1] == REGISTRATION
    assert node_ids == ["node-1"]
    assert link.interval == 0.05  # what the controller asked for
    beat = next(b for p, b in fake.calls if p.endswith("/heartbeat"))
    assert beat["gpus"][0]["uuid"] == "EMU-0" and beat["sessions"] == []


def test_reregisters_after_404() -> None:
    fake = FakeController()
    link, node_ids = make_link(fake)
    link.start()
    try:
        wait_for(lambda: fake.registrations == 1 and "/nodes/node-1/heartbeat" in fake.paths())
        with fake.lock:
            fake.known.clear()  # controller restarted with an empty store
        wait_for(lambda: fake.registrations == 2)
    finally:
        link.stop()
    assert node_ids == ["node-1", "node-1"]


def test_controller_down_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orion_vgpu")
    fake = FakeController()
    fake.down = True
    link, _ = make_link(fake)
    link.start()
    try:
        time.sleep(0.5)  # many retries at 0.05 s backoff
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1
        assert "Orion Controller 127.0.0.1:9123 is unreachable (connection refused)" in unreachable[0].getMessage()
        link.post_event({"type": "session_started", "allocation_id": "a1", "vgpu_index": 0, "reason": None})
        link.post_event({"type": "session_ended", "allocation_id": "a1", "vgpu_index": 0, "reason": "exit"})
        with fake.lock:
            fake.down = False
        wait_for(lambda: len(fake.events()) == 2)
    finally:
        link.stop()
    assert [e["type"] for e in fake.events()] == ["session_started", "session_ended"]
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_unknown_allocation_event_is_dropped_not_looped() -> None:
    fake = FakeController()
    fake.unknown_allocations.add("gone")
    link, _ = make_link(fake)
    link.start()
    try:
        wait_for(lambda: link.node_id == "node-1")
        link.post_event({"type": "session_ended", "allocation_id": "gone", "vgpu_index": 0, "reason": "x"})
        link.post_event({"type": "session_ended", "allocation_id": "a2", "vgpu_index": 0, "reason": "x"})
        wait_for(lambda: any(e["allocation_id"] == "a2" for e in fake.events()))
    finally:
        link.stop()
    assert fake.registrations == 1


def test_rejected_token_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orion_vgpu")
    fake = FakeController()
    link, _ = make_link(fake, token="wrong-token")
    link.start()
    time.sleep(0.4)
    link.stop()
    rejected = [r for r in caplog.records if "rejected the pool token" in r.getMessage()]
    assert len(rejected) == 1 and rejected[0].levelno == logging.ERROR
    assert "pool_token" in rejected[0].getMessage()


def test_events_flushed_on_stop() -> None:
    fake = FakeController()
    link, _ = make_link(fake)
    link.start()
    wait_for(lambda: link.node_id == "node-1")
    link.post_event({"type": "session_ended", "allocation_id": "a3", "vgpu_index": 1, "reason": "server stopping"})
    link.stop()
    assert any(e["allocation_id"] == "a3" for e in fake.events())
