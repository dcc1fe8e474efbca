"""Starts a throwaway pool (controller + oriond with emulated GPUs) for benchmarks."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, pred, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if pred(json.load(r)):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def pool_dir(env: dict[str, str]) -> Path:
    """The pool's scratch directory (``log/`` holds server.log and ``session/``)."""
    return Path(env["ORION_HOME"]).parent


def write_json(path: str, benchmark: str, rows: list[dict], **extra: object) -> None:
    """The machine-readable result ``benchmarks/run_all.py`` collects.

    ``rows``: dicts with ``name`` (what and unit), ``local``, ``remote``, ``ratio``
    (remote / local, or None), ``target`` (text, may be empty) and ``met`` (bool or None).
    """
    doc = {"benchmark": benchmark, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "rows": rows, **extra}
    Path(path).write_text(json.dumps(doc, indent=1))


def pinned(cpus: set[int] | None):  # noqa: ANN201 - a preexec_fn or None
    """A ``preexec_fn`` that runs a child process on ``cpus`` only (None: anywhere)."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


_PR_SET_PDEATHSIG = 1


def _daemon_setup(cpus: set[int] | None):  # noqa: ANN202 - a preexec_fn
    """``pinned``, and the daemon gets SIGTERM when the benchmark dies, however it dies (a
    benchmark killed by a signal runs no cleanup, and its pool would outlive it)."""
    pin = pinned(cpus)

    def setup() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # not Linux: cleanup as before, on normal exit
            pass
        if pin is not None:
            pin()
    return setup


def print_table(rows: list[dict], title: str = "", width: int = 58, fmt: str = "10.1f",
                missed: str = "MISSED") -> None:
    """Rows as write_json takes them, one a line: name, local, remote, ratio, target."""
    w = int(fmt.split(".")[0])
    print(f"{title:{width}} {'local':>{w}} {'remote':>{w}} {'ratio':>7}  target")
    for r in rows:
        met = "" if r["met"] is None else (" met" if r["met"] else f" {missed}")
        local = "–" if r["local"] is None else format(r["local"], fmt)
        remote = "–" if r["remote"] is None else format(r["remote"], fmt)
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:7.2f}"
        print(f"{r['name']:{width}} {local:>{w}} {remote:>{w}} {ratio:>7}  {r['target']}{met}")


def _throttle_conf(level: int | None, enabled: bool) -> str:
    lines = ([] if level is None else [f"    throttle_level = {level}\n"]) \
        + ([] if enabled else ["    enable_computation_throttle = false\n"])
    return "[throttle]\n" + "".join(lines) if lines else ""


@contextmanager
def local_pool(emulated: str = "2x16GiB", vgpu_count: int = 4,
               throttle_level: int | None = None, throttle: bool = True,
               cpus: set[int] | None = None) -> Iterator[dict[str, str]]:
    """Yield the environment a client needs; everything is killed on exit and its
    directory removed (kept with ORION_BENCH_KEEP=1).

    ``throttle_level`` writes ``[throttle] throttle_level`` into server.conf; ``throttle``
    False writes ``enable_computation_throttle = false`` (no compute share at all).
    ``cpus``: the controller and oriond (and so its workers) run on these CPUs only.
    """
    pin = _daemon_setup(cpus)
    tmp = Path(tempfile.mkdtemp(prefix="orion-bench-"))
    cport, sport = _port(), _port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    # The emulated device's knobs (ORION_EMULATED_*) are oriond's, not a client's: they
    # reach the daemons, so that a benchmark can be rerun with them.
    env = dict(base, ORION_HOME=str(tmp / "home"),
               **{k: v for k, v in os.environ.items() if k.startswith("ORION_EMULATED_")})
    procs = [subprocess.Popen([sys.executable, "-m", "orion_vgpu.controller", "--listen",
                               f"127.0.0.1:{cport}", "--data-dir", str(tmp / "ctl"),
                               "--auth", "open"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=pin)]
    try:
        _wait(f"http://127.0.0.1:{cport}/api/v1/info", lambda d: True)
        token = (tmp / "ctl" / "pool_token").read_text().strip()
        conf = tmp / "server.conf"
        conf.write_text(f"[log]\n    log_to_screen = false\n    log_dir = {tmp / 'log'}\n"
                        f"[controller]\n    controller_addr = 127.0.0.1:{cport}\n"
                        f"    pool_token = {token}\n[server]\n    name = bench-node\n"
                        f"    emulated_gpus = {emulated}\n    vgpu_count = {vgpu_count}\n"
                        f"    listen_port = {sport}\n    unix_socket = {tmp / 'oriond.sock'}\n"
                        + _throttle_conf(throttle_level, throttle))
        procs.append(subprocess.Popen([sys.executable, "-m", "orion_vgpu.server", "--config",
                                       str(conf)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=pin))
        _wait(f"http://127.0.0.1:{cport}/api/v1/pool", lambda d: d.get("vgpu_free", 0) > 0)
        yield dict(base, ORION_HOME=str(tmp / "home"), ORION_CONTROLLER=f"127.0.0.1:{cport}",
                   ORION_VGPU="1", ORION_GMEM="8192", ORION_QUIET="1")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("ORION_BENCH_KEEP") != "1":  # its database and logs, for a look
            shutil.rmtree(tmp, ignore_errors=True)


def step_args(doc: str | None, steps: int,
              workload: Callable[[int], dict]) -> argparse.Namespace | None:
    """``--steps`` and ``--repeat`` of a per-step diagnosis. Run again as its own workload
    process (``--workload N``, see run_json), it runs ``workload(N)``, prints the JSON and
    gives None."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workload", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        print(json.dumps(workload(a.workload)))
        return None
    return a


def run_json(argv: list[str], env: dict[str, str], timeout: float = 900) -> dict:
    """Run a workload process (``python *argv``) and return the JSON of its last line."""
    out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"workload {' '.join(argv[1:])} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
