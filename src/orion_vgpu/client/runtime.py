"""The client runtime: one allocation per process, one session per granted vGPU."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orion_vgpu import __version__
from orion_vgpu.client import allocation
from orion_vgpu.client.errors import OrionError
from orion_vgpu.client.transport import Connection, install_interrupt_guard

log = logging.getLogger("orion.client")
# Seconds each start-up step took in this process (benchmarks/bench_startup.py reads them):
# "settings", "allocate" (controller round trip), "connect" (socket + handshake, all vGPUs),
# "start" (the whole first-use start).
startup: dict[str, float] = {}


@dataclass
class Settings:
    controller_addr: str = "127.0.0.1:9123"
    vgpu: int = 1
    gmem_mib: int | None = None
    ratio: int | None = None
    cross_node: bool = False
    enable_net: bool = False
    token: str | None = None
    log_dir: Path | None = None
    shm_path: str | None = None
    use_shm: bool = True
    wait_s: float = 0.0

    @classmethod
    def from_config(cls) -> Settings:
        from orion_vgpu.config import ConfigError, load_client_config
        try:
            cfg = load_client_config()
        except ConfigError as exc:
            raise OrionError(str(exc)) from None
        shm = os.environ.get("ORION_SHM", "").strip()
        return cls(controller_addr=str(cfg.controller_addr), vgpu=int(cfg.vgpu or 1),
                   gmem_mib=cfg.gmem_mib, ratio=cfg.ratio, cross_node=bool(cfg.cross_node),
                   enable_net=bool(cfg.enable_net), token=getattr(cfg, "token", None),
                   log_dir=getattr(cfg, "log_dir", None), shm_path=shm or None,
                   use_shm=shm.lower() not in ("0", "off", "false", "no"),
                   wait_s=float(os.environ.get("ORION_WAIT", "0") or 0))


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self.alloc: dict | None = None
        self.conns: list[Connection] = []
        self.current = 0
        self.seeds: dict[int, int] = {}
        self.pid = os.getpid()
        self.failed: OrionError | None = None
        self.parents_conns: list[Connection] = []  # in a forked child: never used, never closed

    @property
    def device_count(self) -> int:
        return self.settings.vgpu

    @property
    def started(self) -> bool:
        return self.alloc is not None

    def conn(self, dev: int) -> Connection:
        conns = self.conns
        if dev < len(conns):
            return conns[dev]
        self.start()
        if not 0 <= dev < len(self.conns):
            raise RuntimeError(f"CUDA error: invalid device ordinal (cuda:{dev}; this program "
                               f"has {len(self.conns)} vGPU, set ORION_VGPU for more)")
        return self.conns[dev]

    def start(self) -> None:
        with self.lock:
            if self.alloc is not None:
                return
            if self.failed is not None:
                raise self.failed
            try:
                self._start()
            except OrionError as exc:
                self.failed = exc
                raise

    def _start(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self._setup_log()
        req = allocation.Request(vgpu=s.vgpu, gmem_mib=s.gmem_mib, ratio=s.ratio,
                                 cross_node=s.cross_node, wait_s=s.wait_s)
        try:
            alloc = allocation.allocate(s.controller_addr, req, s.token)
        except allocation.ControllerError as exc:
            raise OrionError(str(exc)) from None
        t1 = time.perf_counter()
        self.alloc = alloc
        atexit.register(self.shutdown)
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:  # a multiprocessing child ends in os._exit, past atexit
            mp_util.Finalize(self, self.shutdown, exitpriority=0)
        try:
            self.conns.extend(self._open_sessions(alloc["vgpus"]))
        except BaseException:
            self.shutdown(quiet=True)
            raise
        t2 = time.perf_counter()
        startup.update(allocate=t1 - t0, connect=t2 - t1)
        install_interrupt_guard()
        for dev, seed in self.seeds.items():
            self.conns[dev].seed(seed)
        self.sync_settings()
        places = ", ".join(f"{v['node_name']} gpu {v['gpu_index']} ({v['gmem_mib']} MiB"
                           f"{', emulated' if v.get('emulated') else ''})" for v in alloc["vgpus"])
        _say(f"Orion vGPU client runtime {__version__}: allocation {alloc['id']} granted "
             f"{len(self.conns)} vGPU: {places}")
        startup["start"] = time.perf_counter() - t0
        log.info("allocation %s started in %.1f ms (controller %.1f ms, sessions %.1f ms) via %s",
                 alloc["id"], startup["start"] * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                 ", ".join(f"{c.where} (shm {'yes' if c.arena else 'no'}, server on "
                           f"{'other' if c.cores_apart else 'these'} cores)" for c in self.conns))

    def _open_sessions(self, vgpus: list[dict]) -> list[Connection]:
        """One session per vGPU, in vGPU order; on any failure none stays open."""
        s = self.settings
        shm_path = s.shm_path if s.use_shm else None

        def open_one(v: dict) -> Connection:
            return Connection(v, enable_net=s.enable_net, use_shm=s.use_shm, shm_path=shm_path)

        # A given ORION_SHM file is a single arena: its sessions take it one after another.
        opener = _one_by_one if len(vgpus) == 1 or shm_path else _side_by_side
        return opener(open_one, vgpus)

    def _setup_log(self) -> None:
        d = self.settings.log_dir
        if d is None:
            return
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            path = Path(d) / f"client-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            h = logging.FileHandler(path)
        except OSError:
            return
        h.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s",
                                         "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)

    def quota(self, dev: int) -> int:
        """Bytes granted on vGPU ``dev`` (ORION_GMEM), from the server's welcome."""
        return int(self.conn(dev).welcome["device"]["total_memory"])

    def seed(self, dev: int, seed: int) -> None:
        self.seeds[dev] = seed
        if self.alloc is not None and dev < len(self.conns):
            self.conns[dev].seed(seed)

    def sync_settings(self) -> None:
        """Every session runs the program's ops with its torch settings (client/settings)."""
        if not self.conns:
            return
        from orion_vgpu.protocol.settings import snapshot
        values = snapshot()
        for conn in self.conns:
            if not conn.closed:
                conn.send_settings(values)

    def synchronize(self, dev: int | None = None) -> None:
        if self.alloc is None:
            return
        from orion_vgpu.client import frontend
        from orion_vgpu.protocol import messages as m
        frontend._drain_frees()  # what the program dropped is freed by the time it syncs
        for i, c in enumerate(self.conns):
            if dev is None or i == dev:
                c.request([m.CMD_SYNC])

    def shutdown(self, quiet: bool = False) -> None:
        with self.lock:
            alloc, self.alloc = self.alloc, None
            if alloc is None or os.getpid() != self.pid:
                return
            for c in self.conns:
                try:
                    c.close()
                except Exception:  # exiting: nothing left to report to
                    pass
            self.conns = []
            try:
                allocation.release(self.settings.controller_addr, alloc["id"], self.settings.token)
            except allocation.ControllerError as exc:
                log.info("release of allocation %s failed: %s (its server reports the session "
                         "gone instead)", alloc["id"], exc)
            log.info("Client exits with allocation ID %s", alloc["id"])
            if not quiet:
                _say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [INFO] Client exits with allocation "
                     f"ID {alloc['id']}")


FORKED = ("Cannot re-initialize CUDA in forked subprocess: this process was forked after its "
          "parent opened its vGPU session. To use CUDA with multiprocessing, you must use the "
          "'spawn' start method")


def _after_fork_in_child() -> None:
    """As with CUDA: a child forked before the parent used its vGPU may open a session of
    its own; one forked after must not write into the parent's session (its socket and
    shared memory are the parent's too), so every CUDA call of the child raises."""
    rt = _runtime
    if rt is None:
        return
    rt.lock = threading.RLock()  # another thread of the parent may have held it
    rt.pid = os.getpid()
    if rt.alloc is None:
        return
    rt.parents_conns, rt.conns = rt.conns, []  # kept, not closed: they are the parent's
    rt.alloc = None
    rt.failed = OrionError(FORKED)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _one_by_one(open_one: Callable[[dict], Connection], vgpus: list[dict]) -> list[Connection]:
    conns: list[Connection] = []
    try:
        for v in vgpus:
            conns.append(open_one(v))
    except BaseException:
        for c in conns:
            c.close()
        raise
    return conns


def _side_by_side(open_one: Callable[[dict], Connection],
                  vgpus: list[dict]) -> list[Connection]:
    """A handshake mostly waits for its server to hand the session to a worker: with
    several vGPUs, wait for all of them at once."""
    results: list[Connection | BaseException | None] = [None] * len(vgpus)

    def run(i: int, v: dict) -> None:
        try:
            results[i] = open_one(v)
        except BaseException as exc:  # raised again in the caller's thread below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, v), name="orion-connect", daemon=True)
               for i, v in enumerate(vgpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opened = [r for r in results if isinstance(r, Connection)]
    if len(opened) == len(vgpus):
        return opened
    for c in opened:
        c.close()
    failed = next(r for r in results if not isinstance(r, Connection))
    raise failed if failed is not None else OrionError("a vGPU session did not open")


def _say(line: str) -> None:
    if os.environ.get("ORION_QUIET") != "1":
        print(line, file=sys.stderr, flush=True)


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        t0 = time.perf_counter()
        _runtime = Runtime(Settings.from_config())
        startup["settings"] = time.perf_counter() - t0
    return _runtime
