"""Real processes for fault and soak tests: controller, oriond, client programs, /proc probes.

Builds on ``tests/pool.py`` and ``tests/e2e/cluster.py`` and adds what faults need: a
controller and oriond bound to any local address (a veth in the network-namespace
test), extra environment for oriond (a crashing worker module, short keepalives), client
programs whose output is read while they run, and the server's process tree (pids, RSS,
open fds) read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.cluster import ServerProc, active_allocations
from pool import ControllerProc

HERE = Path(__file__).parent
SCRIPTS = HERE / "scripts"
TESTS = HERE.parent
# Every client program error the user sees must be this one line (client/errors.py).
ERROR_PREFIX = "orion: error:"


# -- controller and server ----------------------------------------------------------------


@dataclass
class Controller(ControllerProc):
    """A controller listening on ``host`` (loopback unless a test needs another address).

    ``auth open``: allocations without a user token, reads without signing in, which is
    what these tests need (auth has its own tests).
    """

    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.opts = {"auth": "open", **self.opts}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def node(self, name: str) -> dict[str, Any] | None:
        return next((n for n in self.pool()["nodes"] if n["name"] == name), None)

    def allocation(self, alloc_id: str) -> dict[str, Any]:
        r = self.get(f"/allocations/{alloc_id}")
        r.raise_for_status()
        return dict(r.json())

    def all_allocations(self) -> list[dict[str, Any]]:
        # The API's most (its default is 1000: the full sequential soak makes 1001).
        r = self.get("/allocations", params={"state": "all", "limit": 10000})
        r.raise_for_status()
        data = r.json()
        return list(data if isinstance(data, list) else data.get("allocations", []))


@dataclass
class Oriond(ServerProc):
    """oriond bound to ``bind_addr`` with ``env`` added to its environment.

    The Unix socket lives in one short directory for the object's life, so a restart
    reuses the path (and must replace the socket file the killed daemon left).
    """

    bind_addr: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    sock_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="orion-f-")))

    def start(self) -> Oriond:
        from pool import free_port

        self.port = self.port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        conf = self.home / "server.conf"
        conf.write_text(
            "[log]\n    log_to_screen = false\n"
            f"    log_dir = {self.home / 'log'}\n"
            f"[controller]\n    controller_addr = {self.controller.addr}\n"
            f"    pool_token = {self.controller.token}\n"
            f"[server]\n    name = {self.name}\n    emulated_gpus = {self.emulated_gpus}\n"
            f"    vgpu_count = {self.vgpu_count}\n    bind_addr = {self.bind_addr}\n"
            f"    listen_port = {self.port}\n    unix_socket = {self.sock_dir / 'oriond.sock'}\n"
            f"    enable_shm = {'true' if self.enable_shm else 'false'}\n"
            "    heartbeat_interval = 0.5\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
        env.update(ORION_HOME=str(self.home), **self.env)
        with open(self.home / "oriond.out", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orion_vgpu.server", "--config", str(conf)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_registered()
        return self

    def kill_daemon(self) -> None:
        """SIGKILL oriond alone, as a crash would: its workers are left to notice."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def cleanup(self) -> None:
        """Stop the daemon and kill any worker it left behind."""
        workers = self.worker_pids() if self.alive() else []
        self.stop()
        for pid in workers:  # only if still a worker: the pid may have been recycled
            if "server.worker" in _cmdline(pid) or "abort_worker" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return children(self.pid)

    def worker_of(self, alloc_id: str, vgpu: int = 0) -> int:
        """The worker pid serving ``alloc_id`` vGPU ``vgpu`` (from server.log)."""
        pat = re.compile(rf"session started \(alloc {alloc_id} vgpu {vgpu}\): "
                         r"session \w+, worker pid (\d+)")
        found = pat.search(self.server_log())
        assert found, f"no session for {alloc_id} in server.log:\n{self.server_log()}"
        return int(found.group(1))

    def tree_rss(self) -> int:
        """RSS bytes of oriond plus every worker."""
        return sum(rss_bytes(p) for p in [self.pid, *self.worker_pids()])

    def wait_settled(self, warm: int = 2, busy: Sequence[int] = (),
                     timeout: float = 30.0) -> None:
        """Wait until the workers are the ``busy`` ones (serving programs that keep
        running) plus ``warm`` idle ones done importing torch (oriond and they are quiet)."""
        def settled() -> bool:
            idle = [p for p in self.worker_pids() if p not in busy]
            if len(idle) != warm:
                return False
            before = sum(cpu_seconds(p) for p in [self.pid, *idle])
            time.sleep(0.5)
            return sum(cpu_seconds(p) for p in [self.pid, *idle]) - before < 0.05
        assert wait_for(settled, timeout, 0.2), (
            f"oriond did not settle to {warm} idle workers: {self.worker_pids()}")


# -- client programs ----------------------------------------------------------------------


class Program:
    """A client program in its own process; its output is read by threads as it comes."""

    def __init__(self, script: str | Path, env: dict[str, str], *args: str,
                 prefix: Sequence[str] = ()) -> None:
        path = script if isinstance(script, Path) else SCRIPTS / script
        self.name = path.name
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.proc = subprocess.Popen([*prefix, sys.executable, str(path), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._readers = [threading.Thread(target=self._read, args=(s, b, q), daemon=True)
                         for s, b, q in ((self.proc.stdout, self.out, True),
                                         (self.proc.stderr, self.err, False))]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, into: list[str], to_queue: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if to_queue:
                self.lines.put(line.rstrip("\n"))
        if to_queue:
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The next stdout line starting with ``prefix``; fails with the program's output."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {prefix!r} within {timeout} s\n"
                                     f"{self.describe()}") from None
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"{self.name} ended before printing {prefix!r}\n"
                                     f"{self.describe(wait=True)}")
            if line.startswith(prefix):
                return line

    def ticks(self) -> int:
        """The last ``TICK n`` the program printed (0 before the first)."""
        nums = [int(ln.split()[1]) for ln in list(self.out) if ln.startswith("TICK ")]
        return nums[-1] if nums else 0

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def signal(self, sig: int) -> None:
        # Popen skips a process it already reaped, so a recycled pid is never signalled.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped program must be able to die
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(10)

    def errors(self) -> list[str]:
        return [ln for ln in self.err if ln.startswith(ERROR_PREFIX)]

    def describe(self, wait: bool = False) -> str:
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(5)
        return (f"rc={self.proc.poll()}\n--- stdout\n" + "\n".join(self.out[-20:]) +
                "\n--- stderr\n" + "\n".join(self.err[-40:]))


def assert_one_clear_error(prog: Program, *needles: str) -> str:
    """The program failed with exactly one ``orion: error:`` line and no traceback."""
    assert prog.proc.returncode not in (None, 0), prog.describe()
    errs = prog.errors()
    assert len(errs) == 1, prog.describe()
    assert not any("Traceback" in ln for ln in prog.err), prog.describe()
    for n in needles:
        assert n in errs[0], prog.describe()
    return errs[0]


class Cluster:
    """Starts controllers, oriond and programs for one test and ends them all after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Oriond] = []
        self.controllers: list[Controller] = []
        self.programs: list[Program] = []

    def controller(self, host: str = "127.0.0.1", **opts: Any) -> Controller:
        ctl = Controller(self.root / f"controller{len(self.controllers)}",
                         {"lease_s": 10, **opts}, host=host)
        self.controllers.append(ctl)
        return ctl.start()

    def server(self, ctl: Controller, **kw: Any) -> Oriond:
        srv = Oriond(ctl, self.root / f"server{len(self.servers)}", **kw)
        self.servers.append(srv)
        return srv.start()

    def program(self, script: str | Path, env: dict[str, str], *args: str,
                prefix: tuple[str, ...] = ()) -> Program:
        prog = Program(script, env, *args, prefix=prefix)
        self.programs.append(prog)
        return prog

    def kill_programs(self, since: int = 0) -> None:
        """Kill the programs started since the ``since``-th (all by default)."""
        for prog in self.programs[since:]:
            prog.kill()
        del self.programs[since:]

    def close(self) -> None:
        self.kill_programs()
        for srv in self.servers:
            with contextlib.suppress(Exception):
                srv.cleanup()
        for ctl in self.controllers:
            ctl.kill()



# -- pool state ---------------------------------------------------------------------------


def check_pool(ctl: Controller, active: int | None = None) -> dict[str, Any]:
    """Pool state as the API reports it is self-consistent: no leaked or doubled vGPU.

    Assumes default-sized vGPUs (what these tests ask for), so a GPU's free vGPU count
    is its ``vgpu_count`` minus what active allocations placed on it. /pool and the
    allocation list are two requests: they are compared only when the list did not
    change around the /pool read. Returns /pool.
    """
    for _ in range(50):
        before = active_allocations(ctl)
        pool = ctl.pool()
        allocs = active_allocations(ctl)
        if _ids(before) == _ids(allocs):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("allocations kept changing; cannot take a consistent snapshot")
    ids = [a["id"] for a in allocs]
    assert len(ids) == len(set(ids)), f"allocation listed twice: {ids}"
    placed: Counter[tuple[str, int]] = Counter()
    gmem: Counter[tuple[str, int]] = Counter()
    for a in allocs:
        for v in a["vgpus"]:
            placed[(v["node_id"], v["gpu_index"])] += 1
            gmem[(v["node_id"], v["gpu_index"])] += v["gmem_mib"]
    for g in pool["gpus"]:
        key = (g["node_id"], g["index"])
        assert g["vgpus_placed"] == placed[key], (g, allocs)
        assert g["memory_allocated_mib"] == gmem[key], (g, allocs)
        assert g["vgpus_placed"] <= g["vgpu_count"], g
    up = [g for g in pool["gpus"] if g["state"] == "up"]
    assert pool["vgpu_total"] == sum(g["vgpu_count"] for g in up), pool
    assert pool["vgpu_free"] == pool["vgpu_total"] - sum(g["vgpus_placed"] for g in up), pool
    if active is not None:
        assert len(allocs) == active, allocs
    return pool


def _ids(allocs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((a["id"], a["state"]) for a in allocs)


def used_bytes(ctl: Controller) -> int:
    """Server memory in use by sessions, as the last heartbeat reported it."""
    return sum(g.get("mem_used_bytes") or 0 for g in ctl.pool()["gpus"])


def client_env(ctl: Controller, home: Path, **extra: str) -> dict[str, str]:
    """ORION_* for a program: one default-sized vGPU, no inherited ORION_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env.update(ORION_HOME=str(home), ORION_CONTROLLER=ctl.addr, ORION_VGPU="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def measured(what: str, seconds: float) -> None:
    """Print a timing for docs/reliability.md (seen with ``pytest -s``)."""
    print(f"MEASURED {what}: {seconds:.2f} s", flush=True)


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def timed(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``pred()`` holds, or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    return time.monotonic() - t0 if wait_for(pred, timeout, interval) else None


# -- /proc --------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (oriond's are its session workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# client/transport.py names its arenas so; host buffers (client/hostpool.py) have 16 more
_ARENA = re.compile(r"orion-[0-9a-f]{16}([0-9a-f]{16})?")


def shm_files() -> set[str]:
    """Arena files of client programs in /dev/shm (they must never be left behind)."""
    try:
        return {n for n in os.listdir("/dev/shm") if _ARENA.fullmatch(n)}
    except OSError:
        return set()
