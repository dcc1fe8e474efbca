"""Views (t, view, slices, detach, ...) are made by the client without the server, in-place
ops that reshape a tensor (t_, resize_, out=) reshape only it, and a program sees the
values it sees locally."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, run_local, run_script


def _lines(proc, prefix: str) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [line for line in proc.stdout.splitlines() if line.startswith(prefix)]


def test_views_match_local_and_send_no_ops(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    local = _lines(run_local("views.py"), "RESULT")
    remote_proc = run_script("views.py", client_env(ctl, tmp_path / "c"))
    remote = _lines(remote_proc, "RESULT")
    assert len(local) == 25
    assert remote == local
    (commands,) = _lines(remote_proc, "COMMANDS")
    assert commands == "COMMANDS views-sent-ops 0 views-made 140", commands


def test_data_assignment_and_format_specs_match_local(pool, tmp_path: Path) -> None:
    """``x.data = y`` makes x name y's memory on the server (before, only the wrapper's
    metadata changed: x kept its old values); f"{loss:.4f}" formats a 0-d vGPU tensor."""
    ctl, _ = pool
    local = _lines(run_local("data_assign.py"), "RESULT")
    remote_proc = run_script("data_assign.py", client_env(ctl, tmp_path / "c"))
    assert len(local) == 20
    assert _lines(remote_proc, "RESULT") == local
    (memory,) = _lines(remote_proc, "MEMORY")
    assert memory.startswith("MEMORY True True "), memory


def test_conjugate_views_and_their_parts_match_local(pool, tmp_path: Path) -> None:
    """A lazy conjugate view (conj(), .H) is flagged as one on the client too, so .imag and
    .real of it take PyTorch's path for conjugates (they failed: "view_as_real doesn't work
    on unresolved conjugated tensors")."""
    ctl, _ = pool
    local = _lines(run_local("conj_views.py"), "RESULT")
    assert len(local) == 11
    assert _lines(run_script("conj_views.py", client_env(ctl, tmp_path / "c")), "RESULT") == local


def test_storage_pointers_tell_shared_storages_apart_as_locally(pool, tmp_path: Path) -> None:
    """``untyped_storage().data_ptr()`` of a vGPU tensor is its storage's stand-in pointer,
    the same for its views and distinct for other tensors. It was 0 for every vGPU tensor,
    so the shared-storage checks libraries make before saving (transformers'
    ``id_tensor_storage``: device, pointer, size) took all weights of one size for one
    tied weight."""
    ctl, _ = pool
    local = _lines(run_local("storage_ptrs.py"), "RESULT")
    assert len(local) == 7
    assert local[0] == "RESULT shared [['emb.weight', 'head.weight']]"
    remote = _lines(run_script("storage_ptrs.py", client_env(ctl, tmp_path / "c")), "RESULT")
    assert remote == local
