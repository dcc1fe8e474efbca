"""Keep a node known to the controller: register, heartbeat, report session events.

Runs in one background thread of `oriond`. The controller being down is normal weather:
each kind of trouble is logged once (not once per retry), the thread retries with
backoff, and registers again after any outage or a `404` (controller restarted and forgot
us; the node id is stable per name, so nothing else changes). Session events are queued
and delivered in order once the controller answers again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
MAX_QUEUED_EVENTS = 10_000


class _Unknown(Exception):
    """The controller answered 404 for our node id."""


class _Rejected(Exception):
    """The controller refused the pool token (401/403)."""


class Backoff:
    """0.5 s doubling to `maximum`, with a little jitter so nodes don't retry in step."""

    def __init__(self, first: float = 0.5, maximum: float = 30.0) -> None:
        first = min(first, maximum)
        self.first, self.maximum, self.current = first, maximum, first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self.current = self.first

    def cap(self, maximum: float) -> None:
        """Lower the longest wait to ``maximum`` (never raise it)."""
        self.maximum = min(self.maximum, maximum)
        self.first = min(self.first, self.maximum)
        self.current = min(self.current, self.maximum)


class ControllerLink:
    """Registration + heartbeat + events for one node; `start()` runs it in a thread."""

    def __init__(
        self,
        *,
        controller_addr: str,
        pool_token: str,
        registration: dict[str, Any],
        stats: Callable[[], dict[str, Any]],
        on_registered: Callable[[str], None],
        on_end_sessions: Callable[[list[dict[str, Any]]], None] | None = None,
        heartbeat_interval: float | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.controller_addr = controller_addr
        self._client = httpx.Client(
            base_url=f"http://{controller_addr}/api/v1",
            headers={"Authorization": f"Bearer {pool_token}"},
            timeout=timeout,
            transport=transport,
        )
        self._registration = registration
        self._stats = stats
        self._on_registered = on_registered
        self._on_end_sessions = on_end_sessions
        self._interval_override = heartbeat_interval
        self.interval = heartbeat_interval or DEFAULT_HEARTBEAT_S
        self.node_id: str | None = None
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._backoff = Backoff(maximum=max_backoff)
        self._trouble: str | None = None  # kind of the last logged failure
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()  # set on every successful registration

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="controller-link", daemon=True)
        self._thread.start()

    def post_event(self, event: dict[str, Any]) -> None:
        """Queue a session event; safe from any thread, never blocks on the network."""
        self._events.append(event)
        self._wake.set()

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Stop the thread after trying to deliver queued events for `flush_timeout` s."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_timeout + 1)
        self._client.close()

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            if self.node_id is None and not self._attempt(self._register):
                self._stopping.wait(self._backoff.next())
                continue
            ok = self._attempt(self._send_events)
            if ok and time.monotonic() >= next_beat:
                ok = self._attempt(self._heartbeat)
                next_beat = time.monotonic() + self.interval
            if ok:
                self._backoff.reset()
                self._wait_for_work(next_beat)
            else:
                self._stopping.wait(self._backoff.next())
        self._final_flush()

    def _wait_for_work(self, deadline: float) -> None:
        self._wake.wait(max(0.0, deadline - time.monotonic()))
        self._wake.clear()

    def _attempt(self, step: Callable[[], None]) -> bool:
        """Run one exchange; turn failures into one log line per kind and False."""
        try:
            step()
        except _Unknown:
            log.warning(
                "Orion Controller %s does not know node id %s (restarted?); registering again",
                self.controller_addr,
                self.node_id,
            )
            self.node_id = None
            return False
        except _Rejected as exc:
            self._report("rejected", str(exc), logging.ERROR)
            return False
        except httpx.TransportError as exc:
            self.node_id = None  # re-register once it is back: it may have restarted
            self._report(
                "unreachable",
                f"Orion Controller {self.controller_addr} is unreachable ({_reason(exc)}); "
                "retrying in the background",
            )
            return False
        except (httpx.HTTPStatusError, ValueError, KeyError) as exc:
            self._report("http", f"Orion Controller {self.controller_addr} failed: {_reason(exc)}")
            return False
        except Exception as exc:  # a bug must not silently end the node's registration
            log.exception("Talking to Orion Controller failed unexpectedly")
            self._report("bug", f"unexpected {type(exc).__name__}; retrying")
            return False
        if self._trouble is not None:
            log.info("Orion Controller %s answers again", self.controller_addr)
            self._trouble = None
        return True

    def _report(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        if kind != self._trouble:
            log.log(level, message)
            self._trouble = kind

    # ------------------------------------------------------------------ exchanges

    def _call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = self._client.post(path, json=body, **kwargs)
        if response.status_code in (401, 403):
            raise _Rejected(
                f"Orion Controller {self.controller_addr} rejected the pool token "
                f"(HTTP {response.status_code}); set [controller] pool_token to the "
                "controller's <data-dir>/pool_token and restart oriond"
            )
        if response.status_code == 404 and path != "/nodes/register":
            raise _Unknown()
        response.raise_for_status()
        return response.json()

    def _register(self) -> None:
        reply = self._call("/nodes/register", self._registration)
        node_id = str(reply["node_id"])
        if self._interval_override is None:
            self.interval = float(reply.get("heartbeat_interval_s") or DEFAULT_HEARTBEAT_S)
        timeout = reply.get("heartbeat_timeout_s")
        if timeout and self.interval >= float(timeout):
            log.warning(
                "heartbeat_interval %.3gs is not below the controller's heartbeat timeout "
                "%.3gs; the node will flap between alive and lost",
                self.interval,
                float(timeout),
            )
        gpus = self._registration.get("gpus", [])
        vgpus = len(gpus) * int(self._registration.get("vgpu_count", 0))
        log.info(
            "Registered with Orion Controller %s as node %s (node id %s): %d GPU, %d vGPU, "
            "heartbeat every %.3gs",
            self.controller_addr,
            self._registration.get("name"),
            node_id,
            len(gpus),
            vgpus,
            self.interval,
        )
        self.node_id = node_id
        # A controller restarted from its store gives known nodes one heartbeat timeout
        # (3 intervals) to come back before it fails their allocations, whose programs
        # still run. So once registered, never wait longer than an interval to retry.
        self._backoff.cap(self.interval)
        try:
            self._on_registered(node_id)
        except Exception:
            log.exception("Setting the node id %s on the session manager failed", node_id)
        self.registered.set()

    def _heartbeat(self, timeout: float | None = None) -> None:
        reply = self._call(f"/nodes/{self.node_id}/heartbeat", self._stats(), timeout)
        end = reply.get("end_sessions") if isinstance(reply, dict) else None
        if end and isinstance(end, list):
            self._end_sessions([e for e in end if isinstance(e, dict)])

    def _end_sessions(self, sessions: list[dict[str, Any]]) -> None:
        """The controller says these sessions' allocations are over: end them here."""
        if self._on_end_sessions is None:
            return
        try:
            self._on_end_sessions(sessions)
        except Exception:
            log.exception("Ending sessions the controller no longer grants failed")

    def _send_events(self, timeout: float | None = None) -> None:
        while self._events:
            event = self._events[0]
            try:
                self._call(f"/nodes/{self.node_id}/events", event, timeout)
            except _Unknown:
                # 404 means "node unknown" or "allocation unknown": a heartbeat tells which
                # (it raises _Unknown itself when the node is the problem).
                self._heartbeat(timeout)
                log.warning("Orion Controller does not know %s; dropping it", _describe(event))
            except httpx.HTTPStatusError as exc:
                # The controller will never accept this one.
                log.warning("Orion Controller refused event %s: %s", _describe(event), _reason(exc))
                if event.get("type") == "session_started" and exc.response.status_code == 409:
                    # Its allocation is over (the grant outlives a lapsed lease a little):
                    # its vGPU may be someone else's now, so the session must not run.
                    self._end_sessions([{**event, "reason": _detail(exc) or "allocation ended"}])
            self._events.popleft()

    def _final_flush(self) -> None:
        if not self._events or self.node_id is None:
            return
        try:
            self._send_events(timeout=2.0)
        except (httpx.HTTPError, _Unknown, _Rejected, ValueError) as exc:
            log.warning(
                "Could not deliver %d session event(s) while stopping: %s",
                len(self._events),
                _reason(exc),
            )


def _describe(event: dict[str, Any]) -> str:
    return f"{event.get('type')} allocation {event.get('allocation_id')} vGPU {event.get('vgpu_index')}"


def _detail(exc: httpx.HTTPStatusError) -> str:
    try:
        body = exc.response.json()
    except ValueError:
        return ""
    return str(body.get("detail") or body.get("error") or "") if isinstance(body, dict) else ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        detail = _detail(exc)
        return f"HTTP {exc.response.status_code}{': ' + detail if detail else ''}"
    text = str(exc) or type(exc).__name__
    if "Connection refused" in text:
        return "connection refused"
    return text.splitlines()[0]
