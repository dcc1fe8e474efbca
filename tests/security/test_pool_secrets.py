"""A real pool (controller + oriond + a client program): shared memory is owner-only,
listeners bind only where configured, and no token, grant or password reaches a log."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sessions_support import make_grant, make_hello, open_session

from e2e.cluster import SCRIPTS, ServerProc, client_env, run_script
from e2e.conftest import pool  # noqa: F401 - the e2e pool fixture, reused
from pool import ControllerProc

# A grant is base64url(json claims).base64url(hmac); the claims JSON starts with '{"'.
GRANT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{40,}")
PASSWORD_RE = re.compile(r"created user admin with password (\S+)")


def _mapped_shm(pid: int) -> list[str]:
    """The orion shared-memory files ``pid`` maps, as paths that stat them even after the
    client unlinked them (it does, right after the handshake)."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/dev/shm/orion" in line:
                found.append(f"/proc/{pid}/map_files/{line.split()[0]}")
    return found


def _listening(port: int) -> set[str]:
    """Local addresses (hex as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, _remote, state = line.split()[1:4]
                addr, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:
                    found.add(addr)
    return found


LOOPBACK_HEX = "0100007F"  # 127.0.0.1, little-endian as /proc/net/tcp shows it


def _log_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".stderr")]


def test_pool_keeps_its_secrets(pool: tuple[ControllerProc, ServerProc],  # noqa: F811
                                tmp_path: Path) -> None:
    """One pool for every check (a pool takes seconds to start)."""
    ctl, srv = pool
    _check_shared_memory_and_listeners(ctl, srv, tmp_path)
    runs = [run_script("mlp.py", client_env(ctl, tmp_path / "c1"), timeout=120),
            run_script("oom.py", client_env(ctl, tmp_path / "c2", ORION_GMEM="64"), timeout=120)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    # A refused handshake too: a forged grant must not be echoed into the server log.
    forged, _ = make_grant(token="not-the-pool-token", node="whatever")
    sock, reply = open_session(("127.0.0.1", srv.port), make_hello(forged))
    sock.close()
    assert reply["kind"] == "orion-refused"
    srv.stop()
    ctl.stop()
    _check_logs(ctl, srv, tmp_path, forged, runs)
    _check_database(ctl)


def _check_shared_memory_and_listeners(ctl: ControllerProc, srv: ServerProc,
                                       tmp_path: Path) -> None:
    env = client_env(ctl, tmp_path / "holder")
    p = subprocess.Popen([sys.executable, str(SCRIPTS / "hold.py")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("READY")
        segments = _mapped_shm(p.pid)
        assert segments, "the client maps no shared memory"
        for path in segments:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
            assert st.st_uid == os.geteuid()
        for table in Path("/dev/shm").glob("orion-throttle-*"):  # compute-share tables
            assert stat.S_IMODE(table.stat().st_mode) == 0o600, table
        for port in (srv.port, ctl.port):
            assert _listening(port) == {LOOPBACK_HEX}, (port, _listening(port))
            # Another local address of this host: nothing answers there.
            with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), 2):
                pass
    finally:
        p.kill()
        p.wait()


def _check_logs(ctl: ControllerProc, srv: ServerProc, root: Path, forged: str,
                runs: list[subprocess.CompletedProcess[str]]) -> None:
    token = ctl.token
    console = ctl.log()
    password = PASSWORD_RE.search(console)
    files = _log_files(root)
    assert any(p.name == "server.log" for p in files) and srv.session_logs(), files
    for path in files:
        text = path.read_text(errors="replace")
        assert token not in text, f"pool token in {path}"
        assert forged.split(".")[1] not in text, f"grant signature in {path}"
        assert not GRANT_RE.search(text), f"a grant in {path}: {GRANT_RE.search(text)}"
        assert "Bearer " not in text, f"an Authorization header in {path}"
        if password and path != ctl.log_path:
            assert password.group(1) not in text, f"admin password in {path}"
    for r in runs:
        assert token not in r.stdout + r.stderr and not GRANT_RE.search(r.stdout + r.stderr)
    if password:  # printed once on the controller's console by design, in no log line
        assert console.count(password.group(1)) == 1


def _check_database(ctl: ControllerProc) -> None:
    """Listing allocations never hands out a grant; the database does not keep them, and
    only the controller's user can read it (it holds password and token hashes)."""
    for path in ctl.data_dir.glob("controller.db*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    con = sqlite3.connect(f"file:{ctl.data_dir / 'controller.db'}?mode=ro", uri=True)
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert ctl.token not in dump
    assert not GRANT_RE.search(dump), "grants stored in the controller database"
