"""CUDA graphs and torch.compile on vGPUs: graphs the server keeps, one message per call.

Each script runs on the pool and on this machine's own device (no ORION_VGPU); results must
agree to fp32 tolerance (interpreted aten graphs run the same kernels as eager code, so in
practice they agree exactly).
"""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script

TOL = 1e-5


def _lines(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


def _values(lines: list[str], tag: str) -> list[float]:
    line = next(x for x in lines if x.startswith(f"RESULT {tag} "))
    return [float(v) for v in line.split()[2:]]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= TOL * max(1.0, abs(y))
                                        for x, y in zip(a, b, strict=True))


def test_make_graphed_callables_trains_like_eager(pool, tmp_path: Path) -> None:
    ctl, srv = pool
    eager = _lines(run_local("graphed_callables.py", "eager"))
    remote = _lines(run_script("graphed_callables.py", client_env(ctl, tmp_path / "c"), "graph"))
    assert _close(_values(remote, "losses"), _values(eager, "losses")), (remote, eager)
    counts = next(x for x in remote if x.startswith("RESULT forward")).split()
    # forward: the input copy and the replay, one frame; backward: one replay
    assert counts[1:] == ["forward", "frames", "1", "replays", "1", "backward", "frames",
                          counts[8], "replays", "1"], counts
    logs = "".join(p.read_text() for p in srv.session_logs())
    assert "captured stream" in logs  # the server keeps the captures


def test_compiled_model_matches_local_eager(pool, tmp_path: Path) -> None:
    ctl, srv = pool
    eager = _lines(run_local("compile_train.py", "eager"))
    proc = run_script("compile_train.py", client_env(ctl, tmp_path / "c"), "compile")
    remote = _lines(proc)
    assert _close(_values(remote, "losses"), _values(eager, "losses")), (remote, eager)
    assert _close(_values(remote, "eval"), _values(eager, "eval")), (remote, eager)
    per_call = next(x for x in remote if x.startswith("RESULT per-call")).split()
    # one compiled call (and its sync) is one frame holding one graph run and nothing else
    assert per_call[2:] == ["frames", "1.0", "graph-runs", "1.0", "other-commands", "0.0"], per_call
    logs = "".join(p.read_text() for p in srv.session_logs())
    assert "torch.compile graph of" in logs  # forward, backward and inference graphs


def test_compiled_eval_batch_norm_with_autograd_matches_eager(pool, tmp_path: Path) -> None:
    """The graph is traced with a GPU's batch norm (eval mode saves the running mean and
    1/std); an emulated GPU's CPU kernel saved empty tensors, and the run failed."""
    ctl, _ = pool
    eager = [line for line in _lines(run_local("compile_bn.py", "eager")) if "RESULT" in line]
    proc = run_script("compile_bn.py", client_env(ctl, tmp_path / "c"), "compile")
    assert len(eager) == 9
    assert [line for line in _lines(proc) if "RESULT" in line] == eager


def test_compiled_graph_with_unknown_operator_is_refused(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _lines(run_local("compile_refused.py"))
    assert local[-1] == "RESULT 16.0"  # the program itself is fine
    proc = run_script("compile_refused.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 1
    assert "RESULT eager-ok 12.0" in proc.stdout
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert errors == ["orion: error: torch.compile: the graph was refused by the vGPU's server: "
                      "operator 'orion_test::scale' is not allowed on a vGPU (only aten, prims "
                      "operators run remotely)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_tensor_dropped_during_capture_stays_with_the_graph(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _lines(run_local("graph_drops.py"))
    remote = _lines(run_script("graph_drops.py", client_env(ctl, tmp_path / "c")))
    assert len(_values(local, "losses")) == 4
    assert _close(_values(remote, "losses"), _values(local, "losses")), (remote, local)
