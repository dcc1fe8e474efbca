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

Forked workers: each worker imports torch, about 150 MiB of private memory per process.
An idle worker that says it can (``ready`` with ``fork``) is asked to fork new workers
instead: the copy shares the imported modules copy-on-write (about 1 MiB of its own while
idle). The idle worker has never run an op nor started a thread, and has seen no session,
so a copy holds nothing of anyone's. The last idle worker that can fork is kept back from
hand-offs while a copy is made for the client, so the pool never falls back to a cold start
in a burst. The pool is a child subreaper and the worker double-forks, so forked workers
are this process's children like the others: reaped here, with their exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
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
# ORION_WORKER_FORK=0 starts every worker cold (python -m), as before forked workers.
FORK_ENV = "ORION_WORKER_FORK"
# A fork takes milliseconds; a copy that has not said hello by then is not coming.
_FORK_TIMEOUT_S = 10.0
_ORPHAN_CHECK_S = 5.0
_PR_SET_CHILD_SUBREAPER = 36


class WorkerUnavailable(Exception):
    """No worker could take the session; ``str(exc)`` is the reason for the client."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"worker exited with code {returncode}"


class AdoptedProc:
    """A forked worker: our child by adoption, so waited for and signalled like a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: the status is lost (as Popen)
                    pid, status = self.pid, 0
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return rc

    def send_signal(self, sig: int) -> None:
        # Under the lock: not reaped yet, so the pid cannot have been reused.
        with self._lock:
            if self.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Worker:
    """One worker process and the manager's end of its control socket."""

    def __init__(self, proc: subprocess.Popen[bytes] | AdoptedProc,
                 ctrl: socket.socket) -> None:
        self.proc = proc
        self.ctrl = ctrl
        self.started_at = time.monotonic()
        self.state = "idle"
        self.ready = False          # the worker said it finished importing (optional)
        self.talked = False         # any control message received
        self.can_fork = False       # said it can fork copies of itself
        self.forking = False        # a copy is being made: not to be handed a session
        self.owner: Any = None      # the session object, set before the fd is sent
        self.end_reason: str | None = None
        self.exit_desc: str | None = None   # set once reaped
        self.monitor: threading.Thread | None = None
        self.send_lock = threading.Lock()  # hand-off and end messages may cross
        self.end_timer: threading.Timer | None = None  # kills it if told to end and it lingers

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
        self._fork = False          # set in start(): forking allowed and we can adopt
        # Session ids of our workers, live or gone: their orphans are ours to reap. Forked
        # workers stay in their cold ancestor's session, so this holds one id per cold start.
        self._worker_sids: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if os.environ.get(FORK_ENV, "1") != "0":
            self._fork = _subreaper.acquire()
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
        if self._fork:
            self._reap_orphans()
            _subreaper.release()
            self._fork = False

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
                with worker.send_lock:
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

    def end_session(self, owner: Any, reason: str, grace_s: float) -> None:
        """Ask the worker serving ``owner`` to end its session; kill it after ``grace_s``."""
        with self._cond:
            worker = next((w for w in self._all if w.owner is owner), None)
        if worker is None:
            return
        body = msgpack.packb({"type": "end", "reason": reason})
        try:
            with worker.send_lock:
                worker.ctrl.sendall(frames.HEADER.pack(len(body), 0) + body)
        except OSError:
            pass  # gone already: its exit is being reported
        timer = threading.Timer(grace_s, self._kill_if_alive, args=(worker, reason))
        timer.daemon = True
        with self._cond:
            if worker.exit_desc is not None:
                return
            worker.end_timer = timer
        timer.start()

    def _kill_if_alive(self, worker: Worker, reason: str) -> None:
        if worker.proc.poll() is None:
            log.warning("worker pid %d did not end its session in time; killing it", worker.pid)
            worker.end_reason = worker.end_reason or f"ended by the controller: {reason}"
            worker.signal(kill=True)

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
        # No warm worker to spare (a burst of sessions): start one now, forked from the
        # idle worker kept for that (milliseconds); a cold one gets the fd and spec in its
        # control socket and reads them once it has finished importing.
        worker = self._spawn_or_refuse()
        with self._cond:
            worker.state, worker.owner = "handing", owner
            if not self._register(worker):
                raise WorkerUnavailable("server is stopping")
        return worker

    def _pick_idle(self) -> Worker | None:
        live = [w for w in self._idle if w.proc.poll() is None]
        forkers = [w for w in live if w.can_fork]
        # Keep the last worker that can fork: the caller forks a copy of it instead.
        live = [w for w in live if not w.forking
                and not (self._fork and len(forkers) == 1 and w is forkers[0])]
        if not live:
            return None
        # Prefer workers known to have torch imported, then not the one the next fork
        # copies, then the oldest.
        template = _template(forkers) if self._fork else None
        worker = min(live, key=lambda w: (not w.ready, w is template, w.started_at))
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
        orphans_checked = time.monotonic()
        while True:
            with self._cond:
                while not self._stopping and not self._should_spawn():
                    timeout = self._wait_time()
                    if self._fork:
                        timeout = min(timeout or _ORPHAN_CHECK_S, _ORPHAN_CHECK_S)
                    self._cond.wait(timeout=timeout)
                    if self._fork and time.monotonic() - orphans_checked >= _ORPHAN_CHECK_S:
                        orphans_checked = time.monotonic()
                        self._cond.release()  # no lock while reading /proc
                        try:
                            self._reap_orphans()
                        finally:
                            self._cond.acquire()
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

    def _reap_orphans(self) -> None:
        """Reap zombies adopted from our workers' process trees (a subreaper adopts every
        orphan below it: a copy that died before its hello, a dead worker's children).
        Only processes in one of our workers' sessions that lead none themselves: never a
        child that other code in this process started and will wait for."""
        try:
            # Cheap check first: is any child of ours a zombie at all?
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return
        except ChildProcessError:
            return
        with self._cond:
            tracked = {w.pid for w in self._all}
            ours = set(self._worker_sids)
        for pid, sid in _zombie_children():
            if pid not in tracked and sid != pid and sid in ours:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                    log.debug("reaped orphan pid %d of worker session %d", pid, sid)

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
        """A new worker: forked from an idle one when one can, else started cold."""
        template = self._claim_template()
        if template is None:
            return self._spawn_cold()
        try:
            return self._spawn_forked(template)
        except (OSError, frames.FrameError, ValueError) as exc:
            log.warning("could not fork a worker from idle worker pid %d (%s); starting one "
                        "cold", template.pid, exc)
            return self._spawn_cold()
        finally:
            with self._cond:
                template.forking = False
                self._cond.notify_all()

    def _claim_template(self) -> Worker | None:
        """An idle worker that can fork, marked as forking; waits while all are busy forking."""
        with self._cond:
            while self._fork and not self._stopping:
                forkers = [w for w in self._idle if w.can_fork and w.proc.poll() is None]
                template = _template(forkers)
                if template is not None:
                    template.forking = True
                    return template
                if not forkers:
                    return None
                self._cond.wait(0.5)
            return None

    def _spawn_forked(self, template: Worker) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            request = msgpack.packb({"type": "fork", "adopter": os.getpid()})
            try:
                _send_with_fd(template.ctrl, frames.HEADER.pack(len(request), 0) + request,
                              child.fileno())
            finally:
                child.close()
            # The copy says hello once it is our child (adopted), so its pid is ours to reap.
            parent.settimeout(_FORK_TIMEOUT_S)
            body, _ = frames.recv_frame(parent, max_body=MAX_CONTROL_BODY)
            parent.settimeout(None)
            hello = msgpack.unpackb(bytes(body), raw=False)
            pid = hello.get("pid") if isinstance(hello, dict) else None
            if not isinstance(pid, int) or hello.get("type") != "ready" or _ppid(pid) != os.getpid():
                raise ValueError(f"unexpected hello {hello!r} from a forked worker")
        except BaseException:
            parent.close()
            raise
        worker = Worker(AdoptedProc(pid), parent)
        worker.ready = worker.talked = True
        worker.can_fork = hello.get("fork") is True
        log.debug("forked session worker pid %d from idle worker pid %d", pid, template.pid)
        return worker

    def _spawn_cold(self) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # A worker must never arm the client runtime for itself, even when the daemon was
        # started from a shell that has ORION_VGPU set for client programs.
        env.pop("ORION_VGPU", None)
        # Spinning OpenMP threads steal the cores other sessions' ops need (and skew shares).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # ...after a short spin (about 0.3 ms): an emulated GPU's large ops come back to back,
        # and waking a sleeping thread for each parallel region made a transformer step
        # 45.6 ms against 41.0 with the spin (local 40.9; docs/performance.md).
        env.setdefault("GOMP_SPINCOUNT", "30000")
        # numpy's OpenBLAS starts a thread pool at import; an idle worker must have no
        # thread to be forked safely, and ops run on torch's own pools anyway.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
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
        with contextlib.suppress(OSError):
            self._worker_sids.add(os.getsid(worker.pid))
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
            worker.can_fork = msg.get("fork") is True
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
        if worker.end_timer is not None:
            worker.end_timer.cancel()  # its thread ends now, not after the grace period
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


class _Subreaper:
    """PR_SET_CHILD_SUBREAPER for as long as any pool in this process forks workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0

    def acquire(self) -> bool:
        with self._lock:
            if self._users == 0 and not _set_subreaper(1):
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                _set_subreaper(0)


def _set_subreaper(on: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok and on:
        log.warning("cannot become a child subreaper (%s); session workers start cold",
                    os.strerror(ctypes.get_errno()) if ctypes.get_errno() else "no prctl")
    return ok


_subreaper = _Subreaper()


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _ppid(pid: int) -> int:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return -1


def _zombie_children() -> list[tuple[int, int]]:
    """(pid, session id) of this process's zombie children."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            found.append((int(entry), int(fields[3])))
    return found


def _template(forkers: list[Worker]) -> Worker | None:
    """The worker the next fork copies: the oldest that can fork and is not forking."""
    free = [w for w in forkers if not w.forking]
    return min(free, key=lambda w: w.started_at) if free else None


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
