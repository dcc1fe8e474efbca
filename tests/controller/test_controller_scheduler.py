"""Pure unit tests of the in-memory scheduler (no processes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.controller.scheduler import (
    CROSS_NODE_NEEDS_RATIO,
    BadRequest,
    GpuSpec,
    NoFit,
    Request,
    Scheduler,
)


def pool(
    nodes: int = 1, gpus: int = 2, mem: int = 16384, n: int = 4, policy: str = "binpack"
) -> Scheduler:
    s = Scheduler(policy)  # type: ignore[arg-type]
    for k in range(nodes):
        specs = [GpuSpec(i, f"u{k}-{i}", "emu", mem, True) for i in range(gpus)]
        s.upsert_node(f"n{k}", f"node-{chr(97 + k)}", n, specs)
    return s


def gpus_of(placements: list) -> list[tuple[str, int]]:
    return [(p.node_id, p.gpu_index) for p in placements]


def test_default_vgpus_and_sizes() -> None:
    s = pool()
    assert (s.vgpu_total(), s.vgpu_free()) == (8, 8)
    (p,) = s.allocate("a", Request(1))
    assert (p.gmem_mib, p.ratio) == (4096, 25)
    assert s.vgpu_free() == 7


def test_two_12000_go_to_two_gpus_and_two_4000_share_one() -> None:
    s = pool()
    assert sorted(gpus_of(s.plan(Request(2, 12000)))) == [("n0", 0), ("n0", 1)]
    assert gpus_of(s.plan(Request(2, 4000))) == [("n0", 0), ("n0", 0)]
    assert sorted(gpus_of(s.plan(Request(2, 4000, policy="spread")))) == [("n0", 0), ("n0", 1)]


def test_binpack_prefers_most_allocated_gpu_and_spread_least() -> None:
    s = pool()
    s.allocate("a", Request(1, 8000))  # lands on gpu 0
    assert gpus_of(s.plan(Request(1, 4000))) == [("n0", 0)]
    assert gpus_of(s.plan(Request(1, 4000, policy="spread"))) == [("n0", 1)]


def test_refusal_names_constraint_and_what_is_free() -> None:
    s = pool()
    with pytest.raises(
        NoFit,
        match="no GPU has 20000 MiB free for one vGPU: largest free is 16384 MiB on node-a GPU 0",
    ):
        s.plan(Request(1, 20000))
    with pytest.raises(NoFit, match="at most 2 fit on one node"):
        s.plan(Request(3, 12000))


def test_vgpu_count_caps_slices_per_gpu() -> None:
    s = pool(gpus=1, n=2)
    s.allocate("a", Request(1, 100, 1))
    s.allocate("b", Request(1, 100, 1))
    with pytest.raises(NoFit, match="every GPU already holds vgpu_count vGPUs"):
        s.plan(Request(1, 100, 1))


def test_cross_node_needs_ratio_100_and_spans_nodes() -> None:
    s = pool(nodes=2)
    with pytest.raises(BadRequest, match=CROSS_NODE_NEEDS_RATIO):
        s.plan(Request(4, None, 50, cross_node=True))
    with pytest.raises(NoFit):
        s.plan(Request(4, None, 100))
    placed = s.allocate("a", Request(4, None, 100, cross_node=True))
    assert {p.node_id for p in placed} == {"n0", "n1"}
    assert len(set(gpus_of(placed))) == 4
    assert s.vgpu_free() == 0


def test_cross_node_prefers_one_node_when_it_fits() -> None:
    s = pool(nodes=2)
    placed = s.allocate("a", Request(2, None, 100, cross_node=True))
    assert len({p.node_id for p in placed}) == 1


def test_down_nodes_are_not_used_and_release_returns() -> None:
    s = pool(nodes=2)
    s.set_node_up("n0", False)
    assert s.vgpu_total() == 8
    assert {p.node_id for p in s.allocate("a", Request(8))} == {"n1"}
    with pytest.raises(NoFit):
        s.plan(Request(1))
    s.release("a")
    assert s.vgpu_free() == 8


def test_reregistration_keeps_fitting_placements_and_drops_lost_gpu() -> None:
    s = pool(gpus=2)
    s.allocate("a", Request(1, 8000))  # gpu 0
    assert gpus_of(s.allocate("b", Request(1, 12000))) == [("n0", 1)]  # no room on gpu 0
    lost = s.upsert_node("n0", "node-a", 4, [GpuSpec(0, "u0-0", "emu", 16384, True)])
    assert lost == ["b"]
    assert s.nodes["n0"].gpus[0].mem_alloc == 8000
    s.release("a")
    assert s.vgpu_free() == 4


def test_no_nodes_reason() -> None:
    with pytest.raises(NoFit, match="no GPU node has registered"):
        Scheduler().plan(Request(1))
    s = pool()
    s.set_node_up("n0", False)
    with pytest.raises(NoFit, match="none up"):
        s.plan(Request(1))


# ----- invariants under random operations ------------------------------------------------

requests = st.builds(
    Request,
    vgpu=st.integers(1, 6),
    gmem_mib=st.one_of(st.none(), st.integers(1, 20000)),
    ratio=st.one_of(st.none(), st.integers(1, 100)),
    cross_node=st.just(False),
    policy=st.sampled_from([None, "binpack", "spread"]),
)
cross_requests = st.builds(
    Request, vgpu=st.integers(1, 6), gmem_mib=st.one_of(st.none(), st.integers(1, 20000)),
    ratio=st.just(100), cross_node=st.just(True), policy=st.sampled_from([None, "spread"]),
)  # fmt: skip
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.one_of(requests, cross_requests)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("toggle"), st.integers(0, 2)),
    ),
    max_size=60,
)


def check_invariants(s: Scheduler) -> None:
    used: dict[tuple[str, str], list[int]] = {}
    for places in s.allocations.values():
        for p in places:
            u = used.setdefault((p.node_id, p.gpu_uuid), [0, 0, 0])
            u[0] += 1
            u[1] += p.gmem_mib
            u[2] += p.ratio
    for node in s.nodes.values():
        for g in node.gpus:
            placed, mem, ratio = used.get((node.id, g.spec.uuid), [0, 0, 0])
            assert (g.placed, g.mem_alloc, g.ratio_alloc) == (placed, mem, ratio)
            assert g.mem_alloc <= g.spec.memory_mib, "memory over-committed"
            assert g.ratio_alloc <= 100, "compute over-committed"
            assert g.placed <= g.vgpu_count, "more slices than vgpu_count"
    assert [k for k in s._order] == sorted(n.key for n in s.nodes.values() if n.up)
    up = [n for n in s.nodes.values() if n.up]
    assert s.vgpu_free() == sum(g.free_default() for n in up for g in n.gpus)
    assert s.vgpu_total() == sum(g.vgpu_count for n in up for g in n.gpus)


@settings(max_examples=150, deadline=None)
@given(ops=ops, sizes=st.lists(st.sampled_from([8192, 16384, 24576]), min_size=3, max_size=3))
def test_never_overcommits_and_release_restores(ops: list, sizes: list[int]) -> None:
    s = Scheduler()
    for k, mem in enumerate(sizes):
        s.upsert_node(
            f"n{k}", f"node-{k}", 1 + k * 2, [GpuSpec(i, f"u{k}-{i}", "emu", mem) for i in range(2)]
        )
    total = s.vgpu_total()
    live: list[str] = []
    for i, (op, arg) in enumerate(ops):
        if op == "alloc":
            try:
                placed = s.allocate(str(i), arg)
            except NoFit:
                continue
            live.append(str(i))
            assert len(placed) == arg.vgpu
            assert all(s.nodes[p.node_id].up for p in placed)
            if not arg.cross_node:
                assert len({p.node_id for p in placed}) == 1
        elif op == "release" and live:
            s.release(live.pop(arg % len(live)))
        elif op == "toggle":
            s.set_node_up(f"n{arg}", not s.nodes[f"n{arg}"].up)
        check_invariants(s)
    for a in live:
        s.release(a)
    for k in range(3):
        s.set_node_up(f"n{k}", True)
    check_invariants(s)
    assert s.vgpu_free() == s.vgpu_total() == total
