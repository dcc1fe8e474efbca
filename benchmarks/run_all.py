"""Every benchmark in one command; the results go into docs/performance.md.

    .venv/bin/python benchmarks/run_all.py [--only transfer,scale] [--no-write]

Runs each benchmark script below with sizes chosen for about 15 minutes in total on a
2-core machine, collects its results (``--json PATH`` when the script offers it, else its
printed table), and replaces the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in docs/performance.md with: date, machine (cores, CPU model,
memory), load average at start, git commit, the exact command, and per benchmark a table
of local, remote, ratio, target and whether it was met. The rest of the file (narrative,
past runs) is left as it is. A missing or failing script gets a note, the others still run.
Raw output and JSON of the run are kept in a temporary directory (printed at the end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
# The same OpenMP wait policy for every process: oriond's workers default to passive threads
# (workerpool); a local process with OpenMP's default spinning threads runs far slower than
# its remote twin as soon as the host is loaded, and the ratio would measure that instead.
COMMON_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

Row = dict  # name, local, remote, ratio, target, met (see localpool.write_json)


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    parse: Callable[[str], tuple[list[Row], list[str]]] | None = None  # for scripts without --json
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 1800.0


@dataclass
class Result:
    bench: Bench
    command: str
    seconds: float = 0.0
    load: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


# ----------------------------------------------------------------------------- parsers
# For scripts that print a table and have no --json (yet): the printed format is parsed.

_NUM = r"-?\d+(?:\.\d+)?"
DATAPLANE_TARGETS = [  # (substring of the row name, max ratio, issue)
    ("MLP 4x64 step, eager", 2.0, "#6"), ("graph replay", 1.0, "#6"),
    ("CNN", 1.05, "#6"), ("transformer", 1.10, "#6"),
]


def parse_dataplane(out: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    for line in out.splitlines():
        m = re.match(rf"^(?P<name>\S.*?)\s+(?P<l>{_NUM})\s+(?P<r>{_NUM})\s+(?P<x>{_NUM})$", line)
        if m and not line.startswith("machine"):
            local, remote = float(m["l"]), float(m["r"])
            target, met = "", None
            for key, limit, issue in DATAPLANE_TARGETS:
                if key.lower() in m["name"].lower():
                    target, met = f"ratio <= {limit} ({issue})", remote / local <= limit
            rows.append(row(m["name"], local, remote, target, met))
        m = re.match(rf"^client-side cost per op.*?:\s*(?P<v>{_NUM})\s*us", line)
        if m:
            v = float(m["v"])
            rows.append(row("client-side cost per tiny op, remote - local (us)", None, v,
                            "<= 15 us (#6)", v <= 15))
    notes = [line for line in out.splitlines() if line.startswith("local baseline")]
    return rows, notes


def parse_controller(out: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes = [line.strip("() ") for line in out.splitlines() if line.startswith("(")]
    for line in out.splitlines():
        m = re.match(rf"^(?P<name>\S.*?)\s+(?P<n>\d+)\s+(?P<p50>{_NUM})\s+(?P<p99>{_NUM})"
                     r"\s+(?P<target>.*)$", line)
        if not m:
            continue
        limit = re.search(rf"({_NUM})\s*ms", m["target"])
        on = "p50" if m["target"].startswith("p50") else "p99"
        for q in ("p50", "p99"):
            v = float(m[q])
            met = None if limit is None or q != on else v <= float(limit[1])
            rows.append(row(f"{m['name']}, {q} (ms)", None, v,
                            m["target"] if q == on else "", met))
    return rows, notes


def parse_dashboard(out: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes = [line for line in out.splitlines() if line.startswith("pool:")]
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.fullmatch(_NUM, cells[1]):
            continue
        med, p95 = float(cells[1]), float(cells[2])
        rows.append(row(f"{cells[0]}: median (ms)", None, med))
        rows.append(row(f"{cells[0]}: p95 (ms)", None, p95, "<= 200 ms", p95 <= 200))
    return rows, notes


def parse_throttle(out: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    mode = ""
    for line in out.splitlines():
        if line.startswith("two programs"):
            mode = "pair"
        elif line.startswith("one program"):
            mode = "alone"
        elif line.startswith("session logs"):
            break
        nums = re.findall(_NUM, line)
        m = re.match(r"^throttle_level (\d+)\s", line)
        if not m:
            continue
        level = int(m[1])
        if mode == "pair" and len(nums) >= 6:
            prop = float(nums[4])
            rows.append(row(f"ratios 25 + 75, throttle_level {level}: work r75/r25", None, prop,
                            "3 +- 10 %", abs(prop / 3 - 1) <= 0.10))
        elif mode == "alone" and len(nums) >= 4:
            busy = float(nums[3])
            target, met = (("<= 55 %", busy <= 55) if level == 0 else (">= 90 %", busy >= 90))
            rows.append(row(f"ratio 50 alone, throttle_level {level}: GPU busy (%)", None, busy,
                            target, met))
    return rows, []


def row(name: str, local: float | None, remote: float | None, target: str = "",
        met: bool | None = None) -> Row:
    ratio = remote / local if local and remote is not None else None
    return {"name": name, "local": local, "remote": remote, "ratio": ratio, "target": target,
            "met": met}


# -------------------------------------------------------------------------- the suite
# Sizes for ~15 minutes on 2 cores (each script's defaults are the larger, slower runs).
# 12 training steps a run (was 6): the median of 6 sometimes took a slow first step, and
# the suite's transformer ratio read 1.11-1.17 on the same tree (2026-12-03).
BENCHES = [
    Bench("dataplane", "bench_dataplane.py", ["--ops", "20000", "--steps", "12", "--repeat", "3"],
          parse_dataplane),
    Bench("transfer", "bench_transfer.py", ["--max-mib", "1024", "--reps", "3"]),
    Bench("startup", "bench_startup.py", ["--runs", "6"]),
    Bench("scale", "bench_scale.py", ["--programs", "32", "--seconds", "5", "--repeat", "3",
                                      "--throttle", "both"]),
    Bench("peercopy", "bench_peercopy.py", ["--max-mib", "256", "--reps", "3"]),
    Bench("throttle", "bench_throttle.py", ["--repeat", "1"], parse_throttle),
    Bench("controller", "bench_controller.py", [], parse_controller),
    Bench("dashboard", "bench_dashboard.py", ["--rounds", "20"], parse_dashboard),
    Bench("graphs", "bench_graphs.py", ["--steps", "50", "--repeat", "2"]),
]


def python_cmd() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def offers_json(path: Path) -> bool:
    try:
        out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False
    return "--json" in out.stdout


def run_bench(b: Bench, work: Path) -> Result:
    path = HERE / b.script
    args = list(b.args)
    res = Result(b, " ".join([python_cmd(), f"benchmarks/{b.script}", *args]))
    if not path.exists():
        res.error = f"skipped: benchmarks/{b.script} does not exist yet"
        return res
    use_json = offers_json(path)
    jpath = work / f"{b.name}.json"
    if use_json:
        args += ["--json", str(jpath)]
    res.load = os.getloadavg()[0]
    print(f"[run_all] {b.name}: {res.command}  (load {res.load:.1f})", flush=True)
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                             timeout=b.timeout, cwd=ROOT,
                             env={**os.environ, **COMMON_ENV, **b.env})
    except subprocess.TimeoutExpired:
        res.error = f"did not finish within {b.timeout:.0f} s"
        return res
    res.seconds = time.monotonic() - t0
    (work / f"{b.name}.out").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    print(out.stdout, flush=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        res.error = f"failed (exit {out.returncode}): {last}"
        return res
    if use_json and jpath.exists():
        doc = json.loads(jpath.read_text())
        res.rows, res.notes = doc.get("rows", []), list(doc.get("notes", []))
    elif b.parse is not None:
        res.rows, res.notes = b.parse(out.stdout)
    if not res.rows:
        res.error = "ran, but printed no result this suite can read (see the raw output)"
    return res


# --------------------------------------------------------------------------- markdown
def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def table(rows: list[Row]) -> list[str]:
    lines = ["| benchmark | local | remote | ratio | target | met? |",
             "|---|---:|---:|---:|---|:---:|"]
    for r in rows:
        met = "" if r.get("met") is None else ("yes" if r["met"] else "**no**")
        ratio = r.get("ratio")
        lines.append(f"| {r['name']} | {fmt(r.get('local'))} | {fmt(r.get('remote'))} | "
                     f"{fmt_ratio(ratio)} | {r.get('target', '')} | {met} |")
    return lines


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem = 0
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "?"
    return (f"{os.cpu_count()} cores, {model}, {mem / 2**20:.1f} GiB memory; "
            f"{platform.system()} {platform.release()} {platform.machine()}, Python "
            f"{platform.python_version()}, torch {torch}")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return head + (" with uncommitted changes" if dirty.strip() else "")


def render(results: list[Result], header: dict[str, str]) -> str:
    out = [BEGIN, "", "## Latest full run (generated by `benchmarks/run_all.py`)", "",
           "Written by the command below; do not edit by hand between the markers. *remote* "
           "is the work on a vGPU of an emulated GPU (the same CPU), *local* the same work "
           "in a plain process (or memcpy, for transfers), measured in the same run; "
           "ratio = remote / local; figures are medians of several runs unless the row "
           "says otherwise.", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    for r in results:
        out += ["", f"### {r.bench.name}", "", f"`{r.command}`" + (
            f" ({r.seconds:.0f} s, load average {r.load:.1f} at its start)" if r.seconds else ""),
            ""]
        if r.error:
            out.append(f"*{r.error}*")
            continue
        out += table(r.rows)
        out += [""] + [f"- {n}" for n in r.notes] if r.notes else []
    out += ["", END]
    return "\n".join(out)


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:  # first run: after the introduction, before the first section
        i = text.find("\n## ")
        i = len(text) if i < 0 else i + 1
        text = text[:i] + block + "\n\n" + text[i:]
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated benchmark names: "
                    + ",".join(b.name for b in BENCHES))
    ap.add_argument("--no-write", action="store_true", help="print, do not touch the doc")
    a = ap.parse_args()
    chosen = BENCHES
    if a.only:
        names = set(a.only.split(","))
        unknown = names - {b.name for b in BENCHES}
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: "
                             + ", ".join(b.name for b in BENCHES))
        chosen = [b for b in BENCHES if b.name in names]
    work = Path(tempfile.mkdtemp(prefix="orion-perf-"))
    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()
    header = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load average at start": f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)",
        "git commit": git_commit(),
        "command": "`" + " ".join([python_cmd(), "benchmarks/run_all.py", *sys.argv[1:]]) + "`",
        "environment": ", ".join(f"`{k}={v}`" for k, v in COMMON_ENV.items())
        + " for every benchmark process (local and remote alike)",
    }
    t0 = time.monotonic()
    results = [run_bench(b, work) for b in chosen]
    header["duration"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    if a.only:
        header["note"] = "partial run (--only); benchmarks not listed were not run"
    block = render(results, header)
    print(block)
    if not a.no_write:
        write_doc(block)
        print(f"[run_all] wrote {DOC.relative_to(ROOT)}")
    print(f"[run_all] raw output and JSON: {work}")


if __name__ == "__main__":
    main()
