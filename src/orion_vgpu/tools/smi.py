"""`orion smi` (alias `orion-smi`): what `nvidia-smi` shows, for the pool's vGPUs.

One table of physical GPUs (emulated ones marked) with how they are split, one table of
the programs holding vGPUs — from `GET /api/v1/pool` and `GET /api/v1/allocations`.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orion_vgpu.config import ClientConfig
from orion_vgpu.tools.controller_api import ControllerApi


def gpu_table(pool: dict[str, Any]) -> Table:
    table = Table(title="GPUs", title_justify="left")
    for column in ("Node", "GPU", "Name", "Memory (MiB)", "Compute", "vGPU", "State"):
        table.add_column(column, justify="right" if column in ("GPU", "Compute") else "left")
    for gpu in pool.get("gpus", []):
        total, free = int(gpu.get("vgpu_count", 0)), int(gpu.get("vgpu_free", 0))
        name = gpu.get("name", "?")
        if gpu.get("emulated"):
            name = f"{name} [emulated]"
        table.add_row(
            str(gpu.get("node_name", "?")),
            str(gpu.get("index", "?")),
            escape(name),
            f"{gpu.get('memory_allocated_mib', 0)} / {gpu.get('memory_mib', 0)}",
            f"{_number(gpu.get('compute_allocated', 0))}%",
            f"{total - free} / {total} used",
            str(gpu.get("state", "?")),
        )
    return table


def _number(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _age(created: Any, now: float) -> str:
    try:
        seconds = max(0, int(now - float(created)))
    except (TypeError, ValueError):
        return "?"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def process_table(allocations: list[dict[str, Any]], now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(title="Processes", title_justify="left")
    for column in ("Allocation", "User@Host", "PID", "Command", "vGPU", "Node:GPU", "Memory (MiB)", "Compute", "State", "Age"):
        table.add_column(column)
    for alloc in allocations:
        who = f"{alloc.get('user', '?')}@{alloc.get('host', '?')}"
        command = str(alloc.get("command") or "")
        for vgpu in alloc.get("vgpus", []):
            where = f"{vgpu.get('node_name', '?')}:{vgpu.get('gpu_index', '?')}"
            if vgpu.get("emulated"):
                where += " (emulated)"
            table.add_row(
                str(alloc.get("id", "?"))[:8],
                escape(who),
                str(alloc.get("pid", "?")),
                escape(command if len(command) <= 40 else command[:37] + "..."),
                str(vgpu.get("index", "?")),
                escape(where),
                str(vgpu.get("gmem_mib", "?")),
                f"{_number(vgpu.get('ratio', '?'))}%",
                str(alloc.get("state", "?")),
                _age(alloc.get("created_at"), now),
            )
    return table


def render(console: Console, addr: str, pool: dict[str, Any], allocations: list[dict[str, Any]]) -> None:
    nodes = pool.get("nodes", [])
    console.print(
        f"Orion vGPU pool at {addr}: {len(nodes)} node(s), {len(pool.get('gpus', []))} GPU, "
        f"{pool.get('vgpu_total', 0)} vGPU, {pool.get('vgpu_free', 0)} free",
        highlight=False,
    )
    console.print(gpu_table(pool))
    if allocations:
        console.print(process_table(allocations))
    else:
        console.print("No running processes hold vGPUs.")


def run(cfg: ClientConfig, controller: str | None, as_json: bool) -> int:
    addr = controller or cfg.controller_addr
    with ControllerApi(addr, cfg.token or cfg.pool_token) as api:
        pool = api.pool()
        allocations = api.allocations("active")
    if as_json:
        print(json.dumps({"controller": addr, "pool": pool, "allocations": allocations}, indent=2))
        return 0
    width = shutil.get_terminal_size((160, 40)).columns
    render(Console(width=max(width, 100)), addr, pool, allocations)
    return 0
