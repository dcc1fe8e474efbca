"""`orion user …` against a real controller process (user tokens required)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pool import ControllerProc

ADMIN_PW = "cli-admin-password"


def orion_user(ctl: ControllerProc, home: Path, *args: str, token: str | None = None,
               stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env.update(ORION_HOME=str(home), ORION_CONTROLLER=ctl.addr)
    if token:
        env["ORION_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "orion_vgpu.cli", "user", *args], env=env,
                          input=stdin or "", capture_output=True, text=True, timeout=60)  # fmt: skip


def test_orion_user_commands(controller_factory: Callable[..., ControllerProc], tmp_path: Path) -> None:
    # a long heartbeat interval: the node registered by hand must stay up without beats
    ctl = controller_factory(auth="required", admin_password=ADMIN_PW, heartbeat_interval_s=60)
    ctl.register_node("node-a")
    home = tmp_path / "home"

    r = orion_user(ctl, home, "list")
    assert r.returncode == 2 and "needs an admin's token" in r.stderr
    r = orion_user(ctl, home, "login", "--password-stdin", stdin="wrong-password\n")
    assert r.returncode == 2 and "HTTP 401" in r.stderr
    r = orion_user(ctl, home, "login", "--password-stdin", stdin=ADMIN_PW + "\n")
    assert r.returncode == 0, r.stderr
    admin = r.stdout.strip()
    assert admin.startswith("orion_") and "\n" not in admin

    r = orion_user(ctl, home, "add", "alice", "--max-vgpus", "1", token=admin)
    assert r.returncode == 0, r.stderr
    alice_pw = r.stdout.strip()
    assert len(alice_pw) >= 16 and "created user alice (user, limits 1 vGPU / ∞)" in r.stderr
    r = orion_user(ctl, home, "token", "alice", "--label", "ci", token=admin)
    alice = r.stdout.strip()
    assert r.returncode == 0 and alice.startswith("orion_")

    # alice's token allocates as alice, and her limit holds
    ok = ctl.post("/allocations", {"vgpu": 1, "user": "someone"}, headers={"Authorization": f"Bearer {alice}"})
    assert ok.status_code == 201 and ok.json()["user"] == "alice"
    over = ctl.post("/allocations", {"vgpu": 1}, headers={"Authorization": f"Bearer {alice}"})
    assert over.status_code == 409 and over.json()["error"] == "limit_exceeded"
    r = orion_user(ctl, home, "limit", "alice", "--max-vgpus", "none", "--max-gmem", "8192", token=admin)
    assert r.returncode == 0 and "limits of alice: ∞ vGPU / 8192 MiB" in r.stderr
    again = ctl.post("/allocations", {"vgpu": 1}, headers={"Authorization": f"Bearer {alice}"})
    assert again.status_code == 201

    r = orion_user(ctl, home, "list", token=admin)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["USER", "ROLE", "LIMITS", "HOLDS", "TOKENS"]
    row = next(line for line in lines if line.startswith("alice"))
    assert "2 vGPU / 8192 MiB" in row and "(ci)" in row

    # a user may not manage others; the token list names ids, never secrets
    r = orion_user(ctl, home, "add", "mallory", token=alice)
    assert r.returncode == 2 and "HTTP 403" in r.stderr
    r = orion_user(ctl, home, "token", "alice", "--list", token=admin)
    token_id = r.stdout.split()[0]
    assert alice not in r.stdout and token_id in alice
    r = orion_user(ctl, home, "passwd", "alice", token=admin)
    assert r.returncode == 0 and len(r.stdout.strip()) >= 16 and r.stdout.strip() != alice_pw
    r = orion_user(ctl, home, "token", "alice", "--revoke", token_id, token=admin)
    assert r.returncode == 0
    assert ctl.post("/allocations", {}, headers={"Authorization": f"Bearer {alice}"}).status_code == 401
    r = orion_user(ctl, home, "del", "alice", token=admin)
    assert r.returncode == 0 and "deleted user alice" in r.stderr
    # nothing secret in the controller's output
    for secret in (ADMIN_PW, admin, alice, alice_pw):
        assert secret not in ctl.log()
