"""Unmodified PyTorch programs on a vGPU give the results they give on the server's device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from e2e.cluster import client_env, run_local, run_script, wait_for


def _result(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("script", ["mlp.py", "cnn.py", "transformer.py"])
def test_training_matches_local_exactly(pool, tmp_path: Path, script: str) -> None:
    ctl, srv = pool
    local = _result(run_local(script))
    remote_proc = run_script(script, client_env(ctl, tmp_path / "client"))
    remote = _result(remote_proc)
    assert remote == local  # fp32 results identical, to the last printed digit
    # seed 001's lines: the runtime names itself at start, and the allocation at exit
    assert "Orion vGPU client runtime" in remote_proc.stderr
    assert "Client exits with allocation ID" in remote_proc.stderr
    assert srv.session_logs(), "the server writes a session log per run"
    assert wait_for(lambda: ctl.get("/pool").json()["vgpu_free"] == 8, timeout=10)


def test_checkpoint_resume_identical_and_tagged_cuda(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    proc = run_script("checkpoint.py", client_env(ctl, tmp_path / "c"), str(tmp_path / "ck.pt"))
    out = _result(proc)
    assert "device cuda" in out  # loaded back onto the vGPU without map_location
    cont, resumed = out[-1].split()[1:]
    assert cont == resumed
    import torch
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "ck.pt")  # a CPU-only torch sees storages saved from cuda
    state = torch.load(tmp_path / "ck.pt", map_location="cpu")
    assert next(iter(state["model"].values())).device.type == "cpu"


@pytest.mark.parametrize("enable_net", ["0", "1"])
def test_oom_beyond_gmem_keeps_session_usable(pool, tmp_path: Path, enable_net: str) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_GMEM="64", ORION_ENABLE_NET=enable_net)
    out = _result(run_script("oom.py", env))
    assert out[0].startswith("RESULT oom OutOfMemoryError"), out
    assert out[1] == "RESULT after 2097152.0"
    assert out[2] == "RESULT caught-at-line True"
    assert out[3] == "RESULT stats 2 True"  # memory_stats counts both OutOfMemoryErrors


def test_dropped_tensors_are_freed_without_the_cycle_collector(pool, tmp_path: Path) -> None:
    """A first-seen op kept its inputs in a reference cycle until a gc: their vGPU memory
    stayed held (a later allocation could run out of quota, as the OOM test above did
    when a gc came late)."""
    ctl, _ = pool
    out = _result(run_script("no_cycles.py", client_env(ctl, tmp_path / "c")))
    assert out == [f"RESULT held after round {i} 0" for i in range(3)] + [
        "RESULT tensors in cycles 0"]


def test_a_replaced_large_tensor_is_freed_before_its_successor_is_made(pool, tmp_path: Path) -> None:
    """``x = x + 1`` on a 16 MiB tensor, 40 times, with a quota of 80 MiB: the server frees
    the old ``x`` before it makes the next one, as PyTorch does locally, and the session
    peaks at two of them. Frees went out at the end of a frame (up to 32 commands later):
    the dropped ones piled up on the server, which ran out of quota within the first frame."""
    ctl, srv = pool
    local = _result(run_local("replace_large.py"))
    proc = run_script("replace_large.py", client_env(ctl, tmp_path / "c", ORION_GMEM="80"))
    assert _result(proc) == local == ["RESULT 40.0 167772160.0"]
    alloc = re.search(r"allocation (\S+) granted", proc.stderr).group(1)

    def peak() -> str | None:
        for log in srv.session_logs():
            m = re.search(rf"allocation {alloc} .*ended: .*peak (\d+) MiB", log.read_text())
            if m:
                return m.group(1)
        return None

    assert wait_for(lambda: peak() is not None, timeout=10)
    assert peak() == "32"


def test_amp_autocast_and_gradscaler_converge(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    out = _result(run_script("amp.py", client_env(ctl, tmp_path / "c")))
    _, out_dtype, loss_dtype, first, last, scale = out[-1].split()
    assert out_dtype == "torch.float16"  # autocast ran the linear layers in half precision
    assert loss_dtype == "torch.float32"  # and the loss in float32, as on a GPU
    assert float(last) < 0.5 * float(first)
    assert float(scale) > 0


# "1": the client's wrapped torch functions (the default); "0": a torch-function mode sees
# every call of the process (the escape hatch, and what a compiling program runs with).
@pytest.mark.parametrize("hooks", ["1", "0"])
def test_cuda_api_surface(pool, tmp_path: Path, hooks: str) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_GMEM="3000", ORION_TORCH_HOOKS=hooks)
    out = _result(run_script("cuda_api.py", env))
    assert out[-1] == "RESULT ok"


@pytest.mark.parametrize("hooks", ["1", "0", "yes"])
def test_torch_calls_reach_the_pool_with_or_without_a_process_mode(pool, tmp_path: Path,
                                                                   hooks: str) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_TORCH_HOOKS=hooks)
    proc = run_script("torch_hooks.py", env)
    assert _result(proc)[-1] == "RESULT ok"
    # A value that is neither: one line says so, and the default (wrappers) is used.
    warned = "ORION_TORCH_HOOKS='yes' is not 0 or 1; using 1" in proc.stderr
    assert warned == (hooks == "yes"), proc.stderr


def test_deepcopy_of_models_state_and_tensors_matches_local(pool, tmp_path: Path) -> None:
    """copy.deepcopy of a model, its state dict, its optimizer's state and a tensor with a
    gradient, on a vGPU: every printed result equal to the same script's run locally."""
    ctl, _ = pool
    local = _result(run_local("deepcopy.py"))
    remote = _result(run_script("deepcopy.py", client_env(ctl, tmp_path / "c")))
    assert remote == local
    assert "RESULT resumed equal True" in remote and "RESULT copy unchanged True" in remote


# Scripts whose every printed line must equal the same script's run locally, and how many
# lines they print; run with the wrapped torch functions ("1") and with the process mode.
#   indexing.py: index lists, host index tensors and masks, numbers assigned into slices,
#     one_hot (they failed or lost values on a vGPU);
#   packed_rnn.py: pack_padded_sequence with host lengths, an LSTM, pad_packed_sequence,
#     backward and a step, then CTC loss with host and vGPU lengths;
#   masking.py: torch.where with numbers, clamp, masked_fill and their backward formulas
#     (which make helper tensors with the gradient's options): values, dtypes, gradients;
#   generators.py: torch.Generator(device="cuda") drawn from by factories and in-place
#     random ops, its state saved and restored, copied, pickled, reseeded (refused before);
#   legacy_types.py: torch.cuda.FloatTensor(2, 3) & co., isinstance and .type() with them,
#     set_default_tensor_type (a CPU build refuses them all);
#   default_dtype.py: set_default_dtype(float64) for factories, int/float promotions and a
#     training step (the vGPU computed in float32 before);
#   settings.py: deterministic algorithms (their memory fill), cuDNN flags, TF32, matmul
#     precision, in order with the ops around them.
@pytest.mark.parametrize("hooks", ["1", "0"])
@pytest.mark.parametrize(("script", "lines"), [("indexing.py", 14), ("packed_rnn.py", 4),
                                               ("masking.py", 11), ("generators.py", 19),
                                               ("legacy_types.py", 16),
                                               ("default_dtype.py", 13),
                                               ("settings.py", 7)])
def test_script_matches_local(pool, tmp_path: Path, script: str, lines: int,
                              hooks: str) -> None:
    ctl, _ = pool
    local = _result(run_local(script))
    env = client_env(ctl, tmp_path / "c", ORION_TORCH_HOOKS=hooks)
    remote = _result(run_script(script, env))
    assert len(remote) == lines and remote == local


def test_two_vgpus_on_two_gpus(pool, tmp_path: Path) -> None:
    """Seed 001: ORION_VGPU=2, ORION_GMEM=12000 on 16 GiB GPUs puts one vGPU on each card."""
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="12000")
    out = _result(run_script("multi_vgpu.py", env))
    assert out[-1].startswith("RESULT ok")
    allocs = ctl.get("/allocations", params={"state": "all"}).json()
    allocs = allocs if isinstance(allocs, list) else allocs["allocations"]
    gpus = {v["gpu_index"] for v in allocs[-1]["vgpus"]}
    assert gpus == {0, 1}


def test_errors_have_pytorch_types_and_session_continues(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    out = _result(run_script("errors.py", client_env(ctl, tmp_path / "c")))
    assert out == ["RESULT shape True", "RESULT index True", "RESULT after 24.0",
                   "RESULT storage CodecError cannot send a UntypedStorage to a vGPU",
                   "RESULT next [0.0, 2.0, 4.0]",
                   "RESULT sparse tensors of layout torch.sparse_coo are not supported on a vGPU",
                   "RESULT after-sparse [1.0, 2.0, 3.0]"], out


def test_data_parallel_matches_single_device(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _result(run_local("data_parallel.py"))[-1].split()
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="2048")
    proc = run_script("data_parallel.py", env)
    remote = _result(proc)[-1].split()
    assert remote[1] == "2" and local[1] == "1"
    assert abs(float(remote[2]) - float(local[2])) < 1e-5
    assert abs(float(remote[3]) - float(local[3])) < 1e-4
    assert "Warning" not in proc.stderr


@pytest.mark.parametrize("adam", ["foreach", "fused"])
def test_cuda_graph_capture_and_replay(pool, tmp_path: Path, adam: str) -> None:
    """Replays equal the same steps run locally, with either capturable Adam: for-each
    (a dozen ops per step) or fused (one _fused_adam_ for all parameters)."""
    ctl, _ = pool
    eager = _result(run_local("graph_train.py", "eager", adam))[-1].split()[1:]
    proc = run_script("graph_train.py", client_env(ctl, tmp_path / "c"), "graph", adam)
    graph = _result(proc)[-1].split()[1:]
    assert len(graph) == len(eager) == 12
    # capturable Adam does its step arithmetic in tensors: equal to ~1e-6, not bit-exact
    assert all(abs(float(a) - float(b)) < 1e-5 for a, b in zip(graph, eager, strict=True))
