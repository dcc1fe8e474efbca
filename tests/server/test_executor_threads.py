"""Thread counts on an emulated GPU: a small op whose kernel keeps a partial result per
thread at any size runs on the threads a local process has, so the vGPU's bits are the
local ones; other small ops run on one thread, and a large op on one fewer than all while
the co-located client holds a core."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from orion_vgpu.server.executor import Executor, describe_op

aten = torch.ops.aten


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _executor(client_running: bool) -> Executor:
    ex = Executor(torch.device("cpu"), 1 << 26)
    ex.client_running = lambda: client_running
    return ex


@pytest.mark.parametrize("op", [aten.native_layer_norm_backward.default,
                                aten.native_group_norm_backward.default,
                                aten.native_batch_norm.default,
                                aten.native_batch_norm_backward.default,
                                aten.convolution_backward.default, aten._ctc_loss.default,
                                aten.embedding_dense_backward.default])
def test_ops_with_a_partial_result_per_thread_run_on_exact_threads(op) -> None:  # noqa: ANN001
    assert describe_op(op).exact_threads


@pytest.mark.parametrize("op", [aten.add_.Tensor, aten.mm.default, aten.sum.dim_IntList,
                                aten.view.default, aten._fused_adamw_.default])
def test_other_ops_keep_the_size_rule(op) -> None:  # noqa: ANN001
    assert not describe_op(op).exact_threads


@pytest.mark.parametrize("client_running", [False, True])
def test_a_small_thread_dependent_op_gets_every_local_thread(two_threads, client_running) -> None:  # noqa: ANN001
    ex = _executor(client_running)
    assert ex.threads == 2
    assert ex.threads_for(describe_op(aten.native_layer_norm_backward.default), False) == 2
    assert ex.threads_for(describe_op(aten.convolution_backward.default), False) == 2
    # Another op keeps the narrowing: one thread when small.
    assert ex.threads_for(describe_op(aten.add_.Tensor), False) == 1
    assert ex.threads_for(describe_op(aten.mm.default), False) == 1


@pytest.mark.parametrize("op", [aten.add_.Tensor, aten.convolution_backward.default])
def test_a_large_op_leaves_the_running_clients_core(two_threads, op) -> None:  # noqa: ANN001
    info = describe_op(op)
    assert _executor(client_running=True).threads_for(info, True) == 1
    assert _executor(client_running=False).threads_for(info, True) == 2


def test_layer_norm_backward_matches_local_bits(two_threads) -> None:  # noqa: ANN001
    """LayerNorm's backward keeps one partial weight gradient per thread: on one thread
    its sums round differently from a local two-thread run (seen on an AMD EPYC host)."""
    torch.manual_seed(0)
    rows, d = 96, 32
    x, w, b = torch.randn(rows, d), torch.randn(d), torch.randn(d)
    out, mean, rstd = aten.native_layer_norm.default(x, [d], w, b, 1e-5)
    grad = torch.randn_like(out)
    args = [grad, x, [d], mean, rstd, w, b, [True, True, True]]
    local = aten.native_layer_norm_backward.default(*args)

    ex = _executor(client_running=True)
    ex.define(1, "aten::native_layer_norm_backward.default")
    handles = [10, 11, 12]
    ex.run(1, list(args), {}, handles)
    remote = [ex.tensors[h] for h in handles]
    assert torch.get_num_threads() == 2  # the op ran on every thread and it stays so
    for mine, theirs in zip(remote, local, strict=True):
        assert torch.equal(mine, theirs)
