"""Session worker processes: a warm pool, fd hand-off and lifetime monitoring.

Starting Python and importing torch takes about a second, far over the budget for opening
a session, so a few idle workers are started ahead of time. A session is opened by
passing the client's connection to an idle worker over its control socket
(``socket.send_fds``); the worker then owns the connection. Each worker has one monitor
thread that reads its control messages and reaps it when it exits, so there are no
zombies and every exit is reported exactly once.

Worker states: ``idle`` (warm, in the pool) -> ``handing`` (picked, fd being sent) ->
``busy`` (serving a session) -> ``dead``. An exit seen while ``handing`` is held back
until the hand-off finished, so the session's start is always reported before its end.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from orion_vgpu.protocol import frames

log = logging.getLogger("orion.server")

DEFAULT_WORKER_MODULE = "orion_vgpu.server.worker"
WORKER_MODULE_ENV = "ORION_WORKER_MODULE"
# Control messages from our own worker are small; anything bigger is a bug.
MAX_CONTROL_BODY = 1 << 20
# A worker that dies this soon after starting, without ever talking, failed to start.
_FAST_DEATH_S = 10.0
# After this many failed starts in a row, refuse clients instead of feeding them to
# workers that will just die (e.g. a broken install); the pool keeps retrying with backoff.
_FAILING_THRESHOLD = 3
_MAX_BACKOFF_S = 30.0
_REAP_AFTER_EOF_S = 3.0


class WorkerUnavailable(Exception):
    """No worker could take the session; ``str(exc)`` is the reason for the client."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"worker exited with code {returncode}"


class Worker:
    """One worker process and the manager's end of its control socket."""

    def __init__(self, proc: subprocess.Popen[bytes], ctrl: socket.socket) -> None:
        self.proc = proc
        self.ctrl = ctrl
        self.started_at = time.monotonic()
        self.state = "idle"
        self.ready = False          # the worker said it finished importing (optional)
        self.talked = False         # any control message received
        self.owner: Any = None      # the session object, set before the fd is sent
        self.end_reason: str | None = None
        self.exit_desc: str | None = None   # set once reaped
        self.monitor: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, kill: bool) -> None:
        # Popen.send_signal skips processes already reaped, so a recycled pid is safe.
        try:
            self.proc.kill() if kill else self.proc.terminate()
        except OSError:
            pass


ExitCallback = Callable[[Any, str | None, str], None]
MessageCallback = Callable[[Any, dict[str, Any]], None]


class WorkerPool:
    """Keeps ``warm`` idle workers and hands client connections to them."""

    def __init__(self, *, warm: int, on_message: MessageCallback, on_exit: ExitCallback,
                 module: str | None = None) -> None:
        self.module = module or os.environ.get(WORKER_MODULE_ENV) or DEFAULT_WORKER_MODULE
        self.warm = warm
        self._on_message = on_message
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._idle: list[Worker] = []
        self._all: set[Worker] = set()
        self._stopping = False
        self._failures = 0
        self._last_failure = ""
        self._retry_at = 0.0
        self._maintainer: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._maintainer = threading.Thread(target=self._maintain, name="orion-workerpool",
                                            daemon=True)
        self._maintainer.start()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM every worker, SIGKILL what is left after ``grace_s``, reap them all."""
        with self._cond:
            self._stopping = True
            workers = list(self._all)
            self._cond.notify_all()
        for w in workers:
            w.signal(kill=False)
        deadline = time.monotonic() + grace_s
        for w in workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.signal(kill=True)
                w.proc.wait()
        for w in workers:
            if w.monitor is not None:
                w.monitor.join(5.0)
                if w.monitor.is_alive():  # something else still holds the control socket
                    _shutdown(w.ctrl)
                    w.monitor.join(1.0)
        if self._maintainer is not None:
            self._maintainer.join(5.0)

    def idle_pids(self) -> list[int]:
        with self._cond:
            return [w.pid for w in self._idle]

    def all_pids(self) -> list[int]:
        with self._cond:
            return [w.pid for w in self._all]

    # -- hand-off ----------------------------------------------------------------------

    def hand_off(self, conn: socket.socket, frame: bytes, owner: Any) -> Worker:
        """Send ``frame`` plus ``conn``'s fd to a worker; return it in state ``handing``.

        The caller still owns ``conn`` (closes its copy) and must call ``activate``.
        """
        for attempt in (1, 2):
            worker = self._take(owner)
            try:
                _send_with_fd(worker.ctrl, frame, conn.fileno())
                return worker
            except OSError as exc:
                # The worker died between being picked and receiving the fd.
                log.warning("session hand-off to worker pid %d failed (%s)%s", worker.pid,
                            exc, "; trying another" if attempt == 1 else "")
                with self._cond:
                    worker.owner = None
                    worker.state = "dead"
                worker.signal(kill=True)
        raise WorkerUnavailable("could not hand the session to a worker (workers are dying); "
                                "see the server log")

    def activate(self, worker: Worker) -> None:
        """Finish a hand-off: from now on the worker's exit is reported to its owner."""
        with self._cond:
            exited = worker.exit_desc is not None
            worker.state = "dead" if exited else "busy"
            self._cond.notify_all()
        if exited:
            self._report_exit(worker)

    def _take(self, owner: Any) -> Worker:
        with self._cond:
            if self._stopping:
                raise WorkerUnavailable("server is stopping")
            worker = self._pick_idle()
            if worker is None and self._failures >= _FAILING_THRESHOLD:
                raise WorkerUnavailable(
                    f"session workers keep failing to start ({self._last_failure}); "
                    "see the server log")
            if worker is not None:
                worker.state, worker.owner = "handing", owner
                self._cond.notify_all()  # the maintainer starts a replacement
                return worker
        # No warm worker (a burst of sessions): start one now. The fd and spec wait in
        # the control socket until it has finished importing.
        worker = self._spawn_or_refuse()
        with self._cond:
            worker.state, worker.owner = "handing", owner
            if not self._register(worker):
                raise WorkerUnavailable("server is stopping")
        return worker

    def _pick_idle(self) -> Worker | None:
        live = [w for w in self._idle if w.proc.poll() is None]
        if not live:
            return None
        # Prefer workers known to have torch imported, then the oldest (most likely warm).
        worker = min(live, key=lambda w: (not w.ready, w.started_at))
        self._idle.remove(worker)
        if time.monotonic() - worker.started_at > _FAST_DEATH_S:
            self._failures = 0
        return worker

    def _spawn_or_refuse(self) -> Worker:
        try:
            return self._spawn()
        except OSError as exc:
            log.error("cannot start a session worker (%s -m %s): %s", sys.executable,
                      self.module, exc)
            with self._cond:
                self._record_failure(f"could not start {self.module}: {exc}")
            raise WorkerUnavailable(f"could not start a session worker: {exc}") from None

    # -- keeping the pool warm ---------------------------------------------------------

    def _maintain(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._should_spawn():
                    self._cond.wait(timeout=self._wait_time())
                if self._stopping:
                    return
            try:
                worker = self._spawn()
            except OSError as exc:
                log.error("cannot start a session worker (%s -m %s): %s", sys.executable,
                          self.module, exc)
                with self._cond:
                    self._record_failure(f"could not start {self.module}: {exc}")
                continue
            with self._cond:
                if self._register(worker):
                    self._idle.append(worker)

    def _should_spawn(self) -> bool:
        return len(self._idle) < self.warm and time.monotonic() >= self._retry_at

    def _wait_time(self) -> float | None:
        delay = self._retry_at - time.monotonic()
        return delay if delay > 0 else None

    def _record_failure(self, desc: str) -> None:
        """Count a failed start and back off before the next one (caller holds the lock)."""
        self._failures += 1
        self._last_failure = desc
        delay = min(0.5 * 2 ** (self._failures - 1), _MAX_BACKOFF_S)
        self._retry_at = time.monotonic() + delay
        self._cond.notify_all()

    def _spawn(self) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # A worker must never arm the client runtime for itself, even when the daemon was
        # started from a shell that has ORION_VGPU set for client programs.
        env.pop("ORION_VGPU", None)
        # Spinning OpenMP threads steal the cores other sessions' ops need (and skew shares).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Workers run client-chosen kernels: keep the pool's secrets out of their reach.
        for secret in ("ORION_POOL_TOKEN", "ORION_TOKEN", "ORION_ADMIN_PASSWORD"):
            env.pop(secret, None)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--control-fd", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env,
                # Own session: a Ctrl-C at the daemon's terminal must not kill sessions;
                # the daemon ends them itself in stop().
                start_new_session=True)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        log.debug("started session worker pid %d", proc.pid)
        return Worker(proc, parent)

    def _register(self, worker: Worker) -> bool:
        """Track a new worker and start its monitor (caller holds the lock)."""
        if self._stopping:
            worker.signal(kill=True)
            worker.proc.wait()
            worker.ctrl.close()
            return False
        self._all.add(worker)
        worker.monitor = threading.Thread(target=self._monitor, args=(worker,),
                                          name=f"orion-worker-{worker.pid}", daemon=True)
        worker.monitor.start()
        return True

    # -- monitoring ----------------------------------------------------------------------

    def _monitor(self, worker: Worker) -> None:
        try:
            self._read_control(worker)
        except frames.PeerClosed:
            pass
        except (frames.FrameError, OSError, ValueError) as exc:
            log.error("bad control message from worker pid %d (%s); killing it", worker.pid,
                      exc)
            worker.signal(kill=True)
        finally:
            self._reap(worker)

    def _read_control(self, worker: Worker) -> None:
        while True:
            body, payload_len = frames.recv_frame(worker.ctrl, max_body=MAX_CONTROL_BODY)
            if payload_len:
                raise frames.FrameError("control frames carry no payload")
            msg = msgpack.unpackb(bytes(body), raw=False)
            if not isinstance(msg, dict):
                raise ValueError("control message is not a map")
            self._dispatch(worker, msg)

    def _dispatch(self, worker: Worker, msg: dict[str, Any]) -> None:
        with self._cond:
            worker.talked = True
            self._failures = 0
            owner = worker.owner
        kind = msg.get("type")
        if kind == "end":
            reason = msg.get("reason")
            worker.end_reason = reason if isinstance(reason, str) and reason else None
        elif kind == "ready":
            worker.ready = True
        elif owner is not None:
            self._on_message(owner, msg)

    def _reap(self, worker: Worker) -> None:
        try:
            worker.proc.wait(_REAP_AFTER_EOF_S)
        except subprocess.TimeoutExpired:
            # It closed its control socket but did not exit: it is no use to anyone.
            log.warning("worker pid %d closed its control socket but kept running; killing",
                        worker.pid)
            worker.signal(kill=True)
            worker.proc.wait()
        worker.ctrl.close()
        desc = describe_exit(worker.proc.returncode)
        with self._cond:
            worker.exit_desc = desc
            self._all.discard(worker)
            state = worker.state
            if state == "idle":
                if worker in self._idle:
                    self._idle.remove(worker)
                self._idle_died(worker, desc)
            elif state == "busy":
                worker.state = "dead"
            self._cond.notify_all()
        if state == "busy":
            self._report_exit(worker)

    def _idle_died(self, worker: Worker, desc: str) -> None:
        if self._stopping:
            return
        young = time.monotonic() - worker.started_at < _FAST_DEATH_S
        log.warning("idle session worker pid %d died (%s); starting a replacement",
                    worker.pid, desc)
        if young and not worker.talked:
            self._record_failure(desc)
        else:
            self._failures = 0

    def _report_exit(self, worker: Worker) -> None:
        assert worker.exit_desc is not None
        if (worker.owner is not None and not worker.talked
                and worker.proc.returncode != 0
                and time.monotonic() - worker.started_at < _FAST_DEATH_S):
            with self._cond:
                self._record_failure(worker.exit_desc)
        try:
            self._on_exit(worker.owner, worker.end_reason, worker.exit_desc)
        except Exception:
            log.exception("session end handler failed for worker pid %d", worker.pid)


def _send_with_fd(ctrl: socket.socket, frame: bytes, fd: int) -> None:
    """Send ``frame`` with ``fd`` attached to its first bytes (SCM_RIGHTS)."""
    sent = socket.send_fds(ctrl, [frame], [fd])
    if sent < len(frame):
        ctrl.sendall(frame[sent:])


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
