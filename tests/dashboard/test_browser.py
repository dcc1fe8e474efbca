"""The dashboard in a real browser, on a real pool: controller (user tokens required),
oriond with 2 emulated GPUs, and a client program holding a vGPU with a user's token.

Screenshots of every page land in artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import SCRIPTS, ServerProc, client_env
from pool import ControllerProc

from .browser import VIEWPORT, launch, shot

PASSWORD_RE = re.compile(r"created user admin with password (\S+) ")
TIMEOUT_MS = 60_000


class SecureServer(ServerProc):
    """oriond whose readiness check reads the pool with the pool token (reads are closed)."""

    def wait_registered(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"oriond exited:\n{self.output()}")
            pool = self.controller.get("/pool", headers=self.controller.auth).json()
            if any(g["node_name"] == self.name and g["state"] == "up" for g in pool["gpus"]):
                return
            time.sleep(0.1)
        raise TimeoutError(f"oriond {self.name} did not register:\n{self.output()}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch()


@pytest.fixture
def secure_pool(tmp_path: Path) -> Iterator[tuple[ControllerProc, ServerProc]]:
    ctl = ControllerProc(tmp_path / "controller", {
        "auth": "required", "lease_s": 10, "sample_interval_s": 1,
        "log_file": tmp_path / "controller.log"})  # fmt: skip
    ctl.start()
    srv = SecureServer(ctl, tmp_path / "server")
    try:
        srv.start()
        yield ctl, srv
    finally:
        srv.stop()
        ctl.stop()


def admin_password(ctl: ControllerProc) -> str:
    found = PASSWORD_RE.findall(ctl.log())
    assert len(found) == 1, ctl.log()
    return str(found[0])


def sign_in(page: Any, base: str, user: str, password: str) -> Any:
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.click("#login-form button[type=submit]")
    return page


def start_holder(ctl: ControllerProc, home: Path, token: str) -> tuple[subprocess.Popen[str], Path]:
    out = home / "hold.out"
    home.mkdir(parents=True, exist_ok=True)
    env = client_env(ctl, home, ORION_TOKEN=token)
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "hold.py")], env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while "READY" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"hold.py did not get a vGPU:\n{out.read_text()}")
        time.sleep(0.1)
    return proc, out


def metrics(page: Any, base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = page.request.get(base + "/metrics").text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip


def lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def test_dashboard_end_to_end(browser: Any, secure_pool: tuple[ControllerProc, ServerProc],
                              tmp_path: Path) -> None:  # fmt: skip
    ctl, srv = secure_pool
    base = ctl.url
    password = admin_password(ctl)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("dialog", lambda d: d.accept())

    # 1. pages need a sign-in; a wrong password is refused
    page.goto(base + "/tasks")
    assert page.url.startswith(base + "/login?next=/tasks")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not-the-password")
    with page.expect_response(lambda r: r.url == base + "/login" and r.request.method == "POST") as resp:
        page.click("#login-form button[type=submit]")
    assert resp.value.status == 401
    assert "Wrong user name or password" in page.inner_text("#login-error")
    shot(page, "login-refused")
    assert page.context.cookies(base) == [] or all(c["name"] != "orion_session"
                                                   for c in page.context.cookies(base))  # fmt: skip

    # 2. the admin signs in and lands where they were going
    sign_in(page, base, "admin", password)
    assert page.url == base + "/tasks"
    session = next(c for c in context.cookies(base) if c["name"] == "orion_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax"

    # 3. the admin creates a user and a token for them
    page.goto(base + "/users")
    page.fill("#new-user input[name=name]", "alice")
    with page.expect_navigation():
        page.click("#new-user button[type=submit]")
    assert "User alice created" in page.inner_text(".flash.secret")
    assert len(page.inner_text("#new-secret")) >= 16  # the generated password, shown once
    page.click("#manage-alice summary")
    page.fill("#manage-alice input[name=label]", "ci")
    with page.expect_navigation():
        page.click("#manage-alice button.new-token")
    token = page.inner_text("#new-secret").strip()
    assert token.startswith("orion_")
    assert page.locator('tr[data-user="alice"] ul.tokens li[data-token]').count() == 1
    page.reload()
    assert page.locator("#new-secret").count() == 0  # shown once only

    # 4. watch the Tasks page (no reload) while alice's program runs, then exits
    page.goto(base + "/tasks")
    page.wait_for_selector("#no-running")
    holder, out = start_holder(ctl, tmp_path / "alice", token)
    try:
        row = f'#running tr[data-pid="{holder.pid}"]'
        page.wait_for_selector(row)
        page.wait_for_function(
            "sel => { const r = document.querySelector(sel); const v = r && r.querySelector("
            "'[data-k$=\".mem_used_bytes\"]'); return v && Number(v.dataset.v) > 0; }", arg=row)
        text = page.inner_text(row)
        assert "alice" in text and "node-a · GPU" in text and "4.0 GiB" in text and "active" in text
        assert int(page.evaluate("document.body.dataset.refreshed || 0")) >= 1  # refreshed in place
        shot(page, "tasks")

        # 5. the node's GPU bar is split: alice's vGPU and the free rest; emulated marked
        page.goto(base + "/nodes")
        seg = page.locator('.gpu .seg[data-user="alice"]')
        assert seg.count() == 1 and "4.0 GiB" in seg.inner_text()
        bar = seg.locator("xpath=..")
        assert bar.locator(".seg.free").count() == 1
        assert page.locator('section[data-node="node-a"] .badge.emu').count() == 2
        assert page.locator(".overview .cell").count() == 1
        shot(page, "nodes")

        # 6. summary: every number on the page is the JSON API's
        page.goto(base + "/")
        page.wait_for_timeout(1500)  # a few usage samples for the charts
        page.goto(base + "/")
        data = page.request.get(base + "/api/v1/dashboard/summary?hours=6").json()
        numbers = page.locator("#live [data-k]")
        assert numbers.count() >= 12
        for i in range(numbers.count()):
            key = numbers.nth(i).get_attribute("data-k")
            shown = float(numbers.nth(i).get_attribute("data-v"))
            if "used" in key or "busy" in key:  # live numbers move with every heartbeat
                assert lookup(data, key) >= 0
                continue
            assert shown == pytest.approx(float(lookup(data, key))), key
        assert data["tasks"]["running"] == 1 and data["users"][0]["user"] == "alice"
        assert page.locator("svg.chart").count() == 4
        shot(page, "summary")

        m = metrics(page, base)
        alloc = page.request.get(base + "/api/v1/allocations").json()[0]
        labels = {"node": "node-a", "gpu_uuid": alloc["vgpus"][0]["gpu_uuid"],
                  "gpu_index": str(alloc["vgpus"][0]["gpu_index"]), "allocation": alloc["id"],
                  "vgpu": "0", "user": "alice"}  # fmt: skip
        assert m[("orion_vgpu_memory_limit_bytes", frozenset(labels.items()))] == 4096 * 2**20
        assert m[("orion_vgpu_memory_used_bytes", frozenset(labels.items()))] > 0

        page.goto(base + "/tasks")
        page.wait_for_selector(row)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
    page.wait_for_selector(row, state="detached")  # gone from Running without a reload
    finished = f'#finished tr[data-alloc="{alloc["id"]}"]'
    page.wait_for_selector(finished)
    assert "alice" in page.inner_text(finished)
    page.wait_for_selector("#no-running")

    page.goto(base + "/users")
    assert "1 allocation" in page.inner_text('tr[data-user="alice"]')
    shot(page, "users")
    m = metrics(page, base)
    ended = sum(v for (name, lab), v in m.items()
                if name == "orion_allocations_ended_total" and ("user", "alice") in lab)  # fmt: skip
    assert ended == 1

    # 7. the admin password is in no log: only once on the controller's stdout
    log_file = (tmp_path / "controller.log").read_text()
    assert "signed in" in log_file and password not in log_file
    assert ctl.log().count(password) == 1
    for log in (srv.server_log(), srv.output(), out.read_text()):
        assert password not in log and token not in log
    assert token not in log_file and token not in ctl.log()
    context.close()


def test_wrong_password_only_and_sign_out(browser: Any, secure_pool: tuple[ControllerProc, ServerProc]) -> None:
    ctl, _srv = secure_pool
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(ctl.url + "/")
    assert "/login" in page.url
    sign_in(page, ctl.url, "nobody", "whatever-pw")
    assert "Wrong user name or password" in page.inner_text("#login-error")
    sign_in(page, ctl.url, "admin", admin_password(ctl))
    assert page.url == ctl.url + "/"
    with page.expect_navigation():
        page.click("#logout")
    assert "/login" in page.url
    page.goto(ctl.url + "/nodes")
    assert "/login" in page.url  # the session is gone
    page.close()
