"""Access control: every write route refuses strangers; tokens, sessions, roles, CSRF."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from orion_vgpu.controller.auth import check_routes

from .conftest import CSRF_RE, AppClient, bearer

UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def write_routes(app: FastAPI) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods & set(UNSAFE)):
                found.append((method, re.sub(r"\{[^}]+\}", "x", route.path)))
    return found


@pytest.mark.parametrize("auth", ["required", "open"])
def test_every_write_route_refuses_unauthenticated(app_factory: Callable[..., AppClient], auth: str) -> None:
    c = app_factory(auth=auth)
    routes = write_routes(c.app)
    assert ("POST", "/api/v1/allocations") in routes and ("POST", "/users/new") in routes
    assert len(routes) >= 20
    c.register("node-a")
    for method, path in routes:
        if auth == "open" and path.startswith("/api/v1/allocations"):
            continue  # open mode lets programs without a token allocate: checked below
        for body in (None, {}):
            r = c.client.request(method, path, json=body)
            assert r.status_code in (401, 403), (method, path, body, r.status_code, r.text)
        r = c.client.request(method, path, json={}, headers=bearer("wrong-token-123"))
        assert r.status_code in (401, 403), (method, path, "wrong token", r.status_code)
    if auth == "required":
        r = c.client.post("/api/v1/allocations", json={"vgpu": 1})
        assert r.status_code == 401 and "ORION_TOKEN" in r.json()["detail"]


def test_a_write_route_without_a_guard_cannot_be_built(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()

    @c.app.post("/api/v1/oops")
    async def oops() -> dict[str, bool]:
        return {"ok": True}

    with pytest.raises(RuntimeError, match="/api/v1/oops has no auth dependency"):
        check_routes(c.app, c.app.state.gate.write_guards())


def test_reads_need_a_credential_unless_public(app_factory: Callable[..., AppClient]) -> None:
    closed = app_factory(auth="required")
    for path in ("/api/v1/pool", "/api/v1/allocations", "/api/v1/dashboard/summary", "/metrics"):
        assert closed.client.get(path).status_code == 401, path
        assert closed.client.get(path, headers=closed.node_auth).status_code == 200, path
    assert closed.client.get("/api/v1/info").status_code == 200  # health checks stay open
    r = closed.client.get("/tasks", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/tasks"
    public = app_factory(auth="required", public_read=True)
    for path in ("/api/v1/pool", "/api/v1/dashboard/nodes", "/metrics", "/", "/tasks", "/nodes"):
        assert public.client.get(path).status_code == 200, path
    assert public.client.get("/users", follow_redirects=False).status_code == 303
    assert public.client.post("/api/v1/allocations", json={}).status_code == 401


def test_login_session_cookie_csrf_and_logout(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()
    page = c.client.get("/login")
    csrf = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=strict" in page.headers["set-cookie"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # a login form not from our page (no matching CSRF cookie) is refused
    r = c.client.post("/login", data={"csrf": "forged", "username": "admin",
                                      "password": c.admin_password})  # fmt: skip
    assert r.status_code == 403
    r = c.client.post("/login", data={"csrf": csrf, "username": "admin", "password": "nope-nope"})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    csrf = CSRF_RE.search(r.text).group(1)  # type: ignore[union-attr]  # a fresh form
    r = c.client.post("/login", data={"csrf": csrf, "username": "admin", "password": c.admin_password,
                                      "next": "//evil.example/"}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("orion_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    session_csrf = CSRF_RE.search(c.client.get("/users").text).group(1)  # type: ignore[union-attr]
    # the session cookie alone does not make an API write: it needs the CSRF header too
    r = c.client.post("/api/v1/users/admin/tokens", json={"label": "x"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = c.client.post("/api/v1/users/admin/tokens", json={"label": "x"},
                      headers={"X-CSRF-Token": session_csrf})  # fmt: skip
    assert r.status_code == 201
    # forms: wrong CSRF refused, right one works
    assert c.client.post("/users/new", data={"csrf": "x", "name": "bob"}).status_code == 403
    r = c.client.post("/users/new", data={"csrf": session_csrf, "name": "bob", "role": "user",
                                          "password": ""})  # fmt: skip
    assert r.status_code == 200 and "User bob created" in r.text
    r = c.client.post("/logout", data={"csrf": session_csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.client.get("/users", follow_redirects=False).status_code == 303  # signed out


def test_failed_logins_are_rate_limited(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(login_max_failures=3)
    for _ in range(3):
        r = c.client.post("/api/v1/login", json={"username": "admin", "password": "guess-1234"})
        assert r.status_code == 401
    r = c.client.post("/api/v1/login", json={"username": "admin", "password": c.admin_password})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    page = c.client.get("/login")
    csrf = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    r = c.client.post("/login", data={"csrf": csrf, "username": "admin", "password": c.admin_password})
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    # another user is not locked out by admin's failures (limits are per name, and per
    # client address at 4x the per-name limit)
    token = c.app.state.service.accounts.create_token("admin", "t", _system())[1]
    c.add_user(token, "eve", password="eve-password-1")
    assert c.client.post("/api/v1/login", json={"username": "eve",
                                                "password": "eve-password-1"}).status_code == 201  # fmt: skip


def _system():  # noqa: ANN202
    from orion_vgpu.controller.accounts import Principal

    return Principal("user", "test", "none")


def test_tokens_roles_and_ownership(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="required")
    c.register("node-a")
    admin = c.api_token()
    c.add_user(admin, "alice", password="alice-password")
    c.add_user(admin, "bob")
    alice, bob = c.user_token(admin, "alice"), c.user_token(admin, "bob")
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "root"}, headers=bearer(alice))
    assert r.status_code == 201
    a = r.json()
    assert a["user"] == "alice"  # the token's user, not what the client claims
    stored = c.service.find(a["id"])
    assert stored.request["os_user"] == "root" and stored.request["auth"] == "token"
    # bob may not release alice's allocation; an admin may
    assert c.client.delete(f"/api/v1/allocations/{a['id']}", headers=bearer(bob)).status_code == 403
    r = c.client.delete(f"/api/v1/allocations/{a['id']}", headers=bearer(admin))
    assert r.status_code == 200 and r.json()["end_reason"] == "released by admin"
    # users manage only themselves; roles and limits are for admins
    assert c.client.get("/api/v1/users", headers=bearer(bob)).json()[0]["name"] == "bob"
    assert c.client.post("/api/v1/users", json={"name": "x"}, headers=bearer(bob)).status_code == 403
    assert c.client.post("/api/v1/users/alice/tokens", json={}, headers=bearer(bob)).status_code == 403
    r = c.client.patch("/api/v1/users/bob", json={"max_vgpus": 9}, headers=bearer(bob))
    assert r.status_code == 403
    # the pool token is for servers, not for allocations
    assert c.client.post("/api/v1/allocations", json={}, headers=c.node_auth).status_code == 403
    # a revoked token stops working at once
    tid = c.client.get("/api/v1/users/alice/tokens", headers=bearer(admin)).json()[0]["id"]
    assert c.client.delete(f"/api/v1/users/alice/tokens/{tid}", headers=bearer(admin)).status_code == 200
    assert c.client.post("/api/v1/allocations", json={}, headers=bearer(alice)).status_code == 401
    # the last admin cannot be deleted or demoted
    r = c.client.patch("/api/v1/users/admin", json={"role": "user"}, headers=bearer(admin))
    assert r.status_code == 409 and "last admin" in r.json()["detail"]
    assert c.client.delete("/api/v1/users/bob", headers=bearer(admin)).status_code == 200
    assert c.client.post("/api/v1/allocations", json={}, headers=bearer(bob)).status_code == 401


def test_open_mode_records_the_reported_user(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory(auth="open")
    c.register("node-a")
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "carol"})
    assert r.status_code == 201 and r.json()["user"] == "carol"
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1})
    assert r.json()["user"] == "anonymous"
    token = c.api_token()
    r = c.client.post("/api/v1/allocations", json={"vgpu": 1, "user": "x"}, headers=bearer(token))
    assert r.json()["user"] == "admin"  # a token still names the user in open mode
    assert c.client.post("/api/v1/allocations", json={}, headers=bearer("bad-token-1")).status_code == 401
    users = c.client.get("/api/v1/dashboard/users", headers=bearer(token)).json()
    assert {o["name"] for o in users["others"]} == {"carol", "anonymous"}


def test_passwords_are_stored_only_as_scrypt_hashes(app_factory: Callable[..., AppClient]) -> None:
    c = app_factory()
    admin = c.api_token()
    c.add_user(admin, "dora", password="dora-secret-pw")
    token = c.user_token(admin, "dora")
    db = (c.settings.data_dir / "controller.db").read_bytes()
    wal = c.settings.data_dir / "controller.db-wal"
    raw = db + (wal.read_bytes() if wal.exists() else b"")
    for secret in (c.admin_password, "dora-secret-pw", token, admin):
        assert secret.encode() not in raw
    assert b"scrypt$16384$8$1$" in raw
    hashes = {u.name: u.password_hash for u in c.service.accounts.users()}
    assert all(h and h.startswith("scrypt$") for h in hashes.values())


def test_configured_admin_password_and_restart(app_factory: Callable[..., AppClient],
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("ORION_ADMIN_PASSWORD", "from-the-env-1")
    c = app_factory()
    assert c.announced == []  # nothing generated, nothing printed
    c.api_token("admin", "from-the-env-1")
    monkeypatch.delenv("ORION_ADMIN_PASSWORD")
    assert c.app.state.admin_password_source == "ORION_ADMIN_PASSWORD"
    short = pytest.raises(Exception, match="at least 8 characters")
    with short:
        app_factory(admin_password="short")
