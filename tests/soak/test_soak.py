"""Load and soak: many programs against one oriond, at once and one after another.

No program may fail, every grant must be released at the end, and oriond must end where
it started: the same open fds and threads, and no RSS growth beyond noise (oriond and its
idle workers, sampled from /proc with the server settled before and after). CI runs a
small size; ``ORION_SOAK=1`` runs the issue's (see conftest.py and docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from faults.procs import (
    Cluster,
    Controller,
    Oriond,
    Program,
    check_pool,
    client_env,
    fd_count,
    rss_bytes,
    thread_count,
    wait_for,
)
from soak.sizes import SoakSize, soak_size_from_env

SCRIPTS = Path(__file__).parent / "scripts"
SIZE = soak_size_from_env()
# oriond's own RSS may grow a little while it serves (allocator arenas, caches of first
# use); a leak per program or session would grow it far more than this over a soak.
ORIOND_RSS_SLACK = 16 << 20


@dataclass
class Sample:
    """oriond and its workers as /proc shows them. PSS (proportional set size) splits each
    shared page among the processes that map it, so sums of PSS are real memory: forked
    workers share their imports copy-on-write, which a sum of RSS would count N times."""

    oriond_rss: int
    oriond_fds: int
    oriond_threads: int
    workers: int
    tree_rss: int
    tree_pss: int = 0
    programs_pss: int = 0

    @classmethod
    def of(cls, srv: Oriond, programs: list[Program] | None = None) -> Sample:
        workers = srv.worker_pids()
        return cls(oriond_rss=rss_bytes(srv.pid), oriond_fds=fd_count(srv.pid),
                   oriond_threads=thread_count(srv.pid), workers=len(workers),
                   tree_rss=rss_bytes(srv.pid) + sum(rss_bytes(w) for w in workers),
                   tree_pss=sum(pss_bytes(p) for p in [srv.pid, *workers]),
                   programs_pss=sum(pss_bytes(p.pid) for p in programs or []))


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.fixture(scope="module")
def pool(soak_cluster: Cluster, soak_size: SoakSize) -> tuple[Controller, Oriond]:
    # The controller's default lease (30 s, not the fault tests' 10 s): in a burst of 100
    # program starts on 2 cores a program can take over 10 s from its allocation to its
    # session, and an allocation that expires then is not a leak of the server's.
    ctl = soak_cluster.controller(lease_s=30)
    # Room for every concurrent program on two emulated GPUs (default-sized vGPUs).
    srv = soak_cluster.server(ctl, vgpu_count=max(4, math.ceil(soak_size.concurrent / 2)))
    _run_short(ctl, soak_cluster.root / "warm-up")  # first use of everything, before sampling
    return ctl, srv


def _run_short(ctl: Controller, home: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPTS / "short.py")],
                          env=client_env(ctl, home, ORION_QUIET="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "RESULT ok" in proc.stdout, (proc.stdout, proc.stderr)
    assert not proc.stderr.strip(), proc.stderr
    return time.monotonic() - t0


def _settled_sample(srv: Oriond) -> Sample:
    srv.wait_settled(timeout=120)
    return Sample.of(srv)


def _all_released(ctl: Controller, expected: int) -> None:
    """Every allocation the soak made ended as released by its program; none is left."""
    assert wait_for(lambda: not check_pool(ctl)["vgpu_total"] - check_pool(ctl)["vgpu_free"],
                    30)
    check_pool(ctl, active=0)
    allocs = ctl.all_allocations()
    assert len(allocs) == expected, len(allocs)
    reasons = {a["end_reason"] for a in allocs}
    assert reasons == {"released by client"}, reasons


def _no_growth(start: Sample, end: Sample) -> None:
    assert end.oriond_fds == start.oriond_fds, (start, end)
    assert end.oriond_threads == start.oriond_threads, (start, end)
    assert end.workers == start.workers, (start, end)
    assert end.oriond_rss - start.oriond_rss <= ORIOND_RSS_SLACK, (start, end)


def _report(name: str, **fields: object) -> None:
    """One JSON line per soak result: on stdout (pytest -s) and in $ORION_SOAK_REPORT."""
    line = json.dumps({"test": name, **fields}, default=lambda o: asdict(o))
    print(line)
    path = os.environ.get("ORION_SOAK_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# Starting N programs at once costs 2 N torch imports (program and worker) on 2 cores.
STARTUP_S = 180 + 8 * SIZE.concurrent


@pytest.mark.timeout(STARTUP_S + SIZE.seconds + 600)
def test_concurrent_programs(soak_cluster: Cluster, pool: tuple[Controller, Oriond],
                             soak_size: SoakSize) -> None:
    ctl, srv = pool
    made = len(ctl.all_allocations())
    start = _settled_sample(srv)
    try:
        progs, startup_s, loaded = _run_concurrently(soak_cluster, ctl, srv, soak_size)
    finally:
        soak_cluster.kill_programs()  # a failure must not leave N programs to the next test
    _all_released(ctl, made + soak_size.concurrent)
    end = _settled_sample(srv)
    _report("concurrent", programs=soak_size.concurrent, seconds=soak_size.seconds,
            startup_s=round(startup_s, 1), steps=sum(int(p.out[-1].split()[2]) for p in progs),
            start=start, end=end, loaded_first=loaded[0], loaded_last=loaded[-1],
            peak_tree_rss=max(s.tree_rss for s in loaded),
            peak_tree_pss=max(s.tree_pss for s in loaded),
            peak_programs_pss=max(s.programs_pss for s in loaded))
    _no_growth(start, end)
    # While loaded, oriond itself holds steady: one control socket per worker, no more.
    assert loaded[-1].oriond_fds == loaded[0].oriond_fds, (loaded[0], loaded[-1])
    assert loaded[-1].oriond_rss - loaded[0].oriond_rss <= ORIOND_RSS_SLACK


def _run_concurrently(cluster: Cluster, ctl: Controller, srv: Oriond,
                      size: SoakSize) -> tuple[list[Program], float, list[Sample]]:
    """Start all programs at once, keep them all running ``size.seconds``, end them."""
    t0 = time.monotonic()
    progs = [cluster.program(SCRIPTS / "steady.py",
                             client_env(ctl, cluster.root / "c", ORION_QUIET="1"))
             for _ in range(size.concurrent)]
    for prog in progs:  # a burst of allocations, handshakes and worker starts
        prog.expect("READY", timeout=max(10.0, STARTUP_S - (time.monotonic() - t0)))
        _check_available_memory()
    startup_s = time.monotonic() - t0
    check_pool(ctl, active=size.concurrent)
    loaded = [Sample.of(srv, progs)]
    while time.monotonic() - t0 < startup_s + size.seconds:
        time.sleep(min(10.0, size.seconds / 3))
        assert all(p.proc.poll() is None for p in progs), [p.describe() for p in progs
                                                          if p.proc.poll() is not None]
        loaded.append(Sample.of(srv, progs))
        _check_available_memory()
    for prog in progs:
        prog.signal(signal.SIGUSR1)
    for prog in progs:
        assert prog.wait(120 + size.concurrent) == 0, prog.describe()
        assert prog.out[-1].startswith("RESULT ok") and not prog.err, prog.describe()
    return progs, startup_s, loaded


def _check_available_memory() -> None:
    """Stop a soak that would push this machine into the OOM killer (other work runs here
    too): a fail with the numbers, not a machine that kills processes at random."""
    floor = int(os.environ.get("ORION_SOAK_MIN_AVAILABLE_MIB") or 1024) << 20
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    assert avail >= floor, f"only {avail >> 20} MiB available: soak too big for this machine"


@pytest.mark.timeout(600 + 10 * SIZE.sequential)
def test_sequential_programs(soak_cluster: Cluster, pool: tuple[Controller, Oriond],
                             soak_size: SoakSize) -> None:
    ctl, srv = pool
    made = len(ctl.all_allocations())
    start = _settled_sample(srv)
    times = [_run_short(ctl, soak_cluster.root / "s") for _ in range(soak_size.sequential)]
    _all_released(ctl, made + soak_size.sequential)
    end = _settled_sample(srv)
    _report("sequential", programs=len(times), mean_s=round(sum(times) / len(times), 2),
            max_s=round(max(times), 2), start=start, end=end)
    _no_growth(start, end)


def test_memory_in_use_stays_flat(soak_cluster: Cluster,
                                  pool: tuple[Controller, Oriond]) -> None:
    """A program that drops its temporaries holds no more vGPU memory as it runs: on a GPU
    they are freed at once, and a long run must not creep towards its ORION_GMEM."""
    ctl, _ = pool
    proc = subprocess.run([sys.executable, str(SCRIPTS / "flat.py")],
                          env=client_env(ctl, soak_cluster.root / "f", ORION_QUIET="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
