"""Start-up benchmark (issue #6): process start to the first completed op, vGPU and local.

    .venv/bin/python benchmarks/bench_startup.py [--runs 10] [--json PATH]

Each run starts a fresh Python process of PROGRAM below (``device`` is ``cuda`` for the
vGPU, with the ORION_* variables set so the .pth hook arms the runtime, and ``cpu`` for the
local run, without them). Local and remote runs alternate, and before each one the pool's
processes are left to go quiet (a session's worker is replaced by a fresh one that imports
torch: that must not run during the next measurement on a 2-core machine).

Times are wall clock (``time.time()``), from ``spawn``, taken by this process just before
it starts the child:

- (a) ``import torch`` returned: torch's import plus, for the vGPU, the hook's switch-over
  (``activate``) that runs inside it;
- (b) the first op completed: ``x.cpu()`` returned the values.

Reported (medians over the runs):

- ``plain import torch``: local (a) - spawn, a process without Orion;
- ``start-up``: remote (b) - spawn - ``plain import torch``, i.e. everything the vGPU adds
  to a program's start (hook, switch-over, allocation, session, first op) over a plain
  ``import torch`` (the issue #6 target is <= 150 ms);
- the same start-up with torch's import subtracted inside the same remote process (the
  hook times torch's own import): remote (b) - spawn - that time - local (t) - spawn,
  where (t) is the moment before ``import torch``; it does not depend on how long
  torch's import happened to take in that run (a loaded machine varies it by seconds);
- (b) - (a) for local and remote, and the remote breakdown measured inside the process:
  switch-over, settings, allocation (controller round trip), connect + handshake (socket,
  hello, hand-off to a warm worker, welcome) and the first op's own time (the rest of
  (b) - (a): probes, fetch). Before HEAD's runtime recorded these, they print as 0.

The client package should be byte-compiled (``python -m orion_vgpu.client.install_hook``,
as ``scripts/bootstrap.sh`` does), as in any pip installation; the first line says whether
it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from localpool import local_pool, write_json  # noqa: E402

PROGRAM = """
import time
t = time.time()
import torch
a = time.time()
x = torch.ones(4, device=DEVICE); x.add_(1); x.cpu()
b = time.time()
import json, sys
out = {"t": t, "a": a, "b": b}
for mod, key in (("orion_vgpu.client.autoload", "timings"), ("orion_vgpu.client.runtime", "startup")):
    m = sys.modules.get(mod)
    out.update({k: v for k, v in getattr(m, key, {}).items()})
out["dtensor"] = "torch.distributed.tensor" in sys.modules
print(json.dumps(out))
"""


def run_once(env: dict[str, str], device: str) -> dict:
    code = PROGRAM.replace("DEVICE", repr(device))
    spawn = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"start-up program failed on {device}: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ("t", "a", "b"):
        res[k] -= spawn
    return res


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (the pool's controller, oriond and its workers)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(timeout: float = 30.0) -> None:
    """Wait until the pool's processes used no CPU for 0.3 s (warm workers imported)."""
    deadline = time.monotonic() + timeout
    before = _cpu_ticks(_children(os.getpid()))
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _cpu_ticks(_children(os.getpid()))
        if now == before:
            return
        before = now


def bytecode_state() -> str:
    """How many of the client's modules a program loads from a valid .pyc."""
    import importlib.util

    import orion_vgpu
    root = Path(orion_vgpu.__file__).parent
    files = [root / "__init__.py", root / "config.py", *sorted((root / "client").glob("*.py")),
             *sorted((root / "protocol").glob("*.py"))]
    valid = 0
    for f in files:
        try:
            head = Path(importlib.util.cache_from_source(str(f))).read_bytes()[:16]
            src = f.read_bytes()
        except OSError:
            continue
        if int.from_bytes(head[4:8], "little") & 1:  # hash-based .pyc
            valid += head[8:16] == importlib.util.source_hash(src)
        else:
            valid += (int.from_bytes(head[8:12], "little") == int(f.stat().st_mtime) & 0xFFFFFFFF
                      and int.from_bytes(head[12:16], "little") == len(src) & 0xFFFFFFFF)
    return f"{valid} of {len(files)} client modules byte-compiled"


def byte_compile() -> None:
    """Compile the package's modules as an installation (or a first run) leaves them: with
    PYTHONDONTWRITEBYTECODE set, a module edited since its .pyc was written is compiled
    again in every program: two edited client modules added 9 ms to every start-up."""
    import compileall

    import orion_vgpu
    compileall.compile_dir(str(Path(orion_vgpu.__file__).parent), quiet=1)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10, help="alternating local/remote runs")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    a = ap.parse_args()
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    byte_compile()
    loc: list[dict] = []
    rem: list[dict] = []
    with local_pool() as env:
        settle()
        run_once(env, "cuda")  # warm the page cache and the controller's first request
        for _ in range(a.runs):
            settle()
            loc.append(run_once(local_env, "cpu"))
            settle()
            rem.append(run_once(env, "cuda"))
    ms = 1e3
    plain = median(loc, "a") * ms
    startup = statistics.median(r["b"] * ms - plain for r in rem)
    # The same, with torch's import subtracted in the same process (the hook times it):
    # immune to how long torch's import took in that run.
    interp = median(loc, "t") * ms
    same = (statistics.median(r["b"] * ms - r["torch"] * ms - interp for r in rem)
            if all("torch" in r for r in rem) else None)  # None: a runtime that does not time it
    first_op = statistics.median(
        (r["b"] - r["a"] - r.get("start", 0.0) - r.get("settings", 0.0)) for r in rem) * ms
    rows = [
        ("plain import torch (a) - spawn", plain, None),
        ("(a) - spawn: import torch returned", plain, median(rem, "a") * ms),
        ("(b) - spawn: first op completed", median(loc, "b") * ms, median(rem, "b") * ms),
        ("(b) - (a)", statistics.median((r["b"] - r["a"]) for r in loc) * ms,
         statistics.median((r["b"] - r["a"]) for r in rem) * ms),
    ]
    parts = [("torch's own import (inside the hook)", median(rem, "torch") * ms),
             ("switch-over (activate)", median(rem, "activate") * ms),
             ("settings (config)", median(rem, "settings") * ms),
             ("allocation (controller round trip)", median(rem, "allocate") * ms),
             ("connect + handshake", median(rem, "connect") * ms),
             ("first op after the session is up", first_op)]
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load {load:.1f}; {a.runs} runs each; remote = vGPU on "
          f"an emulated GPU (CPU), same host; {bytecode_state()}")
    print(f"{'wall time, medians (ms)':40} {'local':>9} {'remote':>9}")
    for name, lv, rv in rows:
        print(f"{name:40} {lv:9.1f} {'' if rv is None else f'{rv:9.1f}':>9}")
    print("remote breakdown (in-process, ms):")
    for name, v in parts:
        print(f"  {name:38} {v:9.1f}")
    dtensor = sum(1 for r in rem if r.get("dtensor"))
    print(f"torch.distributed.tensor imported in {dtensor} of {len(rem)} remote runs")
    print(f"start-up = remote (b) - plain import torch: {startup:.1f} ms (target <= 150 ms)")
    if same is not None:
        print(f"start-up, torch's import subtracted in the same process: {same:.1f} ms")
    if a.json:
        table = [{"name": name + " (ms)", "local": lv, "remote": rv,
                  "ratio": None if rv is None else rv / lv, "target": "", "met": None}
                 for name, lv, rv in rows]
        table.append({"name": "start-up: remote (b) - plain import torch (ms)", "local": None,
                      "remote": startup, "ratio": None, "target": "<= 150 ms",
                      "met": startup <= 150})
        table.append({"name": "start-up, torch's import subtracted in-process (ms)",
                      "local": None, "remote": same, "ratio": None, "target": "<= 150 ms",
                      "met": None if same is None else same <= 150})
        write_json(a.json, "startup", table, breakdown=dict(parts), load=load,
                   bytecode=bytecode_state(), raw={"local": loc, "remote": rem})


if __name__ == "__main__":
    main()
