"""Ctrl-C in a program that goes on after it (a Jupyter kernel): an exchange with the
server finishes before the KeyboardInterrupt, so the session stays in step; a second
Ctrl-C during one gives the session up with a clear error instead of wrong bytes."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import active_allocations, client_env, run_script, wait_for

INTERRUPTED = ("RESULT after-double OrionError this program's vGPU session was interrupted in "
               "the middle of a message (a second Ctrl-C): what it computed is lost; rerun "
               "the program")


def test_interrupted_programs_keep_their_session_in_step(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    proc = run_script("interrupts.py", client_env(ctl, tmp_path / "c"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    first, *rest = results
    count = int(first.split()[2])
    assert first.endswith("of 40, session intact") and count >= 30, first
    assert rest == ["RESULT double KeyboardInterrupt", INTERRUPTED], results
    assert wait_for(lambda: not active_allocations(ctl), timeout=15)
