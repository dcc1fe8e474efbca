"""Dashboard render time on a large pool: 1,000 nodes x 8 GPUs, 5,000 allocations in
history, 2,000 running, 24 h of usage samples.

    .venv/bin/python benchmarks/bench_dashboard.py [--nodes 1000] [--history 5000] [--rounds 30]

Each page is requested in-process through the real ASGI app (auth, view, template, all
of it; no socket), signed in as the admin, with the real SQLite store in a temp dir.
Prints median and p95 per page. Target: every page under 200 ms server-side.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
from fastapi.testclient import TestClient  # noqa: E402

from orion_vgpu.controller import schemas  # noqa: E402
from orion_vgpu.controller.app import create_app  # noqa: E402
from orion_vgpu.controller.history import Sample  # noqa: E402
from orion_vgpu.controller.service import ControllerService, Owner  # noqa: E402
from orion_vgpu.controller.settings import ControllerSettings  # noqa: E402
from orion_vgpu.controller.store import StoredAllocation, StoredVgpu  # noqa: E402

GPUS_PER_NODE = 8
USERS = [f"user{i:02d}" for i in range(40)]
PAGES = [
    ("summary (6 h charts)", "/"),
    ("summary (24 h charts)", "/?hours=24"),
    ("tasks", "/tasks"),
    ("tasks, finished page 50", "/tasks?fpage=50"),
    ("nodes (20 per page)", "/nodes"),
    ("nodes, 100 per page (the most)", "/nodes?per_page=100"),
    ("nodes, last page, filtered", "/nodes?q=node-9&page=5"),
    ("users (30 days usage)", "/users?period=30d"),
    ("summary partial refresh", "/"),
    ("tasks partial refresh", "/tasks"),
    ("JSON summary", "/api/v1/dashboard/summary"),
    ("JSON nodes, all 1,000", "/api/v1/dashboard/nodes?per_page=1000"),
    ("/metrics (~80,000 series)", "/metrics"),
]


def build_pool(svc: ControllerService, nodes: int) -> None:
    for n in range(nodes):
        gpus = [{"index": i, "uuid": f"GPU-{n:04d}-{i}", "name": "Emulated GPU (CPU) 16GiB",
                 "memory_mib": 16384, "emulated": True} for i in range(GPUS_PER_NODE)]  # fmt: skip
        body = schemas.RegisterIn(name=f"node-{n}", addr=f"10.0.{n // 250}.{n % 250}:9960",
                                  version="bench", protocol_version=1, vgpu_count=4, gpus=gpus)  # fmt: skip
        svc.register(body)


def fill_history(svc: ControllerService, count: int, now: float, rng: random.Random) -> None:
    """Ended allocations spread over the last 30 days, written straight to the store."""
    for _ in range(count):
        start = now - rng.uniform(0, 30 * 86400)
        node = rng.choice(list(svc.nodes.values()))
        vgpus = [StoredVgpu(i, node.id, node.gpus[i].uuid, i, 4096, 25, True)
                 for i in range(rng.choice([1, 1, 2]))]  # fmt: skip
        a = StoredAllocation(
            id=str(uuid.uuid4()), state=rng.choice(["released", "released", "failed", "expired"]),
            user=rng.choice(USERS), host=f"ws-{rng.randrange(50)}", pid=rng.randrange(1, 99999),
            command="python train.py --epochs 10", created_at=start,
            ended_at=start + rng.uniform(10, 7200), end_reason="released by client",
            lease_expires_at=start + 30, request={"vgpu": len(vgpus)}, vgpus=vgpus,
        )  # fmt: skip
        svc.store.insert_allocation(a)


def run_live(svc: ControllerService, count: int, rng: random.Random) -> None:
    """Running allocations through the real scheduler, with heartbeat numbers."""
    for _ in range(count):
        user = rng.choice(USERS)
        body = schemas.AllocationIn(vgpu=rng.choice([1, 1, 2]), user=user, host="ws", pid=4242,
                                    command="python train.py")  # fmt: skip
        svc.try_allocate(body, Owner(user, "token"))
    for node in svc.nodes.values():
        node.live = {g.uuid: (rng.randrange(16 << 30), rng.uniform(0, 100)) for g in node.gpus}
    for a in svc.live.values():
        for v in a.vgpus:
            v.session_started = True
            svc.vgpu_live[(a.id, v.index)] = (rng.randrange(v.gmem_mib << 20), rng.uniform(0, 100))
        a.state = "active"


def fill_samples(svc: ControllerService, now: float, rng: random.Random) -> None:
    """24 h of one-minute usage samples, as the sampler writes them."""
    t = svc.sample()
    for i in range(24 * 60, 0, -1):
        per_user = {u: [rng.randrange(80), rng.randrange(300_000), rng.randrange(40)]
                    for u in rng.sample(USERS, 25)}  # fmt: skip
        svc.history.samples.insert(0, Sample(now - i * 60, t.vgpu_total, rng.randrange(4000),
                                             t.mem_total_mib, rng.randrange(t.mem_total_mib),
                                             0.0, t.compute_total, 0, 0.0, 2000, len(svc.nodes),
                                             0, per_user))  # fmt: skip


def timed(client: TestClient, path: str, rounds: int, partial: bool) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds per request. CPU time (all threads of this process, the
    test client's share included) is what the page costs even on a busy machine."""
    headers = {"X-Orion-Partial": "1"} if partial else {}
    client.get(path, headers=headers).raise_for_status()  # warm: template compile, caches
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        r = client.get(path, headers=headers)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
        r.raise_for_status()
    return wall, cpu


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--history", type=int, default=5000)
    ap.add_argument("--live", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    logging.getLogger("orion").setLevel(logging.WARNING)  # 1,000 registrations, one line each
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="orion-bench-dash-") as tmp:
        # Nodes never heartbeat here: a long interval keeps them up for the whole run.
        settings = ControllerSettings(data_dir=Path(tmp), admin_password="bench-admin-pw",
                                      sample_interval_s=3600, heartbeat_interval_s=3600)  # fmt: skip
        app = create_app(settings)
        svc: ControllerService = app.state.service
        now = time.time()
        t0 = time.perf_counter()
        build_pool(svc, args.nodes)
        fill_history(svc, args.history, now, rng)
        run_live(svc, args.live, rng)
        fill_samples(svc, now, rng)
        print(f"pool: {args.nodes} nodes x {GPUS_PER_NODE} GPUs, {args.history} allocations in "
              f"history, {len(svc.live)} running, {len(svc.history.samples)} usage samples "
              f"(built in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
        with TestClient(app) as client:
            r = client.post("/api/v1/login", json={"username": "admin", "password": "bench-admin-pw"})
            client.headers["Authorization"] = f"Bearer {r.json()['token']}"
            print(f"| {'page':34} | median ms | p95 ms | CPU median ms | CPU p95 ms | KiB |")
            print(f"|{'-' * 36}|----------:|-------:|--------------:|-----------:|----:|")
            for label, path in PAGES:
                partial = label.endswith("partial refresh")
                wall, cpu = timed(client, path, args.rounds, partial)
                size = len(client.get(path, headers={"X-Orion-Partial": "1"} if partial else {}).content)
                print(f"| {label:34} | {statistics.median(wall):9.1f} | {p95(wall):6.1f} | "
                      f"{statistics.median(cpu):13.1f} | {p95(cpu):10.1f} | {size / 1024:3.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
