"""The dashboard: server-rendered pages, login/logout, and the admin forms.

Pages: ``/`` (summary), ``/tasks``, ``/nodes``, ``/users``. Each is rendered from the
dict of ``views`` that ``GET /api/v1/dashboard/<page>`` also returns. Forms post back
here with the session's CSRF token and redirect (303) with a message; a secret made by a
form (password, token) is shown once on the next page and kept nowhere else.
"""

# No `from __future__ import annotations`: FastAPI must see the dependency types
# (local Annotated aliases) as objects, not strings.

import logging
import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from orion_vgpu.controller import views
from orion_vgpu.controller.accounts import Principal
from orion_vgpu.controller.auth import SESSION_COOKIE, Gate, LoginRefused, LoginRequired, guarded
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.forms import (
    PageError,
    check_csrf,
    optional_int,
    read_form,
    require_session,
    safe_next,
)
from orion_vgpu.controller.render import render_page
from orion_vgpu.controller.routing import Routes

log = logging.getLogger("orion.controller")

REFRESH_S = 3  # pages refresh their live part this often
LOGIN_CSRF_COOKIE = "orion_login_csrf"


def client_ip(request: Request) -> str:
    # The socket peer: X-Forwarded-For is not trusted (anyone can send it).
    return request.client.host if request.client else "?"


def page_routes(app: FastAPI, gate: Gate) -> None:
    service = gate.service
    accounts = service.accounts
    settings = service.settings
    r = Routes(app, include_in_schema=False)

    def context(request: Request, who: Principal, page: str, title: str, **extra: Any) -> dict[str, Any]:
        session = who.session
        flashes: list[dict[str, str]] = []
        if session is not None and request.headers.get("x-orion-partial") != "1":
            flashes, session.flash[:] = list(session.flash), []
        return {
            "me": who if who.user is not None else None,
            "csrf": session.csrf if session else "",
            "page": page, "title": title, "refresh": REFRESH_S, "flashes": flashes,
            "auth_mode": settings.auth, "reads_open": settings.reads_open,
            "path": request.url.path, **extra,
        }  # fmt: skip

    def signed_in(who: Principal) -> Principal:
        if who.user is None:
            raise LoginRequired()
        return who

    Reader = Annotated[Principal, Depends(gate.page_reader)]

    # ----- pages ---------------------------------------------------------------------

    @r.get("/", response_class=HTMLResponse)
    async def summary_page(request: Request, who: Reader, hours: int = 6) -> Response:
        data = views.summary(service, hours)
        return render_page(request, "summary.html", context(
            request, who, "summary", "Summary", data=data, hours_options=views.CHART_HOURS,
            api=f"/api/v1/dashboard/summary?hours={data['hours']}"))  # fmt: skip

    @r.get("/tasks", response_class=HTMLResponse)
    async def tasks_page(
        request: Request, who: Reader, page: Annotated[int, Query(ge=1)] = 1,
        fpage: Annotated[int, Query(ge=1)] = 1, user: str = "",
    ) -> Response:  # fmt: skip
        data = views.tasks(service, page, fpage, user=user or None)
        query = request.url.query
        return render_page(request, "tasks.html", context(
            request, who, "tasks", "Tasks", data=data,
            api="/api/v1/dashboard/tasks" + (f"?{query}" if query else "")))  # fmt: skip

    @r.get("/nodes", response_class=HTMLResponse)
    async def nodes_page(
        request: Request, who: Reader, q: str = "", state: str = "",
        page: Annotated[int, Query(ge=1)] = 1,
        per_page: Annotated[int, Query(ge=1)] = 20,
    ) -> Response:  # fmt: skip
        per_page = min(per_page, views.PAGE_MAX)  # the overview shows every node anyway
        data = views.nodes(service, q, state if state in ("up", "down") else "", page, per_page)
        query = request.url.query
        return render_page(request, "nodes.html", context(
            request, who, "nodes", "Nodes", data=data,
            api="/api/v1/dashboard/nodes" + (f"?{query}" if query else "")))  # fmt: skip

    @r.get("/users", response_class=HTMLResponse)
    async def users_page(request: Request, who: Reader, period: str = "24h") -> Response:
        who = signed_in(who)
        data = views.users(service, who, period)
        return render_page(request, "users.html", context(
            request, who, "users", "Users" if who.is_admin else "Account", data=data,
            periods=list(views.PERIODS), api=f"/api/v1/dashboard/users?period={data['period']}"))  # fmt: skip

    # ----- login / logout ------------------------------------------------------------

    def login_page(request: Request, nxt: str, error: str = "", status: int = 200,
                   name: str = "") -> Response:  # fmt: skip
        token = secrets.token_urlsafe(24)
        resp = render_page(request, "login.html", {
            "csrf": token, "next": safe_next(nxt), "error": error, "username": name,
            "title": "Sign in", "page": "login", "me": None, "refresh": 0,
        }, status)  # fmt: skip
        # Double-submit token: a cross-site page cannot read it, so it cannot log a
        # victim's browser into the attacker's account (login CSRF).
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/login", max_age=3600)  # fmt: skip
        return resp

    @r.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002
        try:
            who: Principal | None = gate.principal(request)
        except ApiError:
            who = None
        if who is not None and who.user is not None:
            return RedirectResponse(safe_next(next), 303)
        return login_page(request, next)

    @r.post("/login", response_class=HTMLResponse)
    @guarded
    async def login(request: Request) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie:  # no form of ours was loaded in this browser
            service.metrics.failure("csrf")
            raise PageError(403, "Open the sign-in page first, then sign in.")
        form = await read_form(request)
        if not secrets.compare_digest(form.get("csrf", ""), cookie):
            service.metrics.failure("csrf")
            raise PageError(403, "The sign-in form expired; reload the page and sign in again.")
        name = form.get("username", "").strip()[:64]
        nxt = form.get("next", "/")
        ip = client_ip(request)
        try:
            user = await gate.sign_in(name, form.get("password", ""), ip)
        except LoginRefused as refused:
            resp = login_page(request, nxt, refused.message, refused.status, name)
            if refused.retry_after:
                resp.headers["Retry-After"] = str(int(refused.retry_after) + 1)
            return resp
        cookie_value, _session = accounts.open_session(user, ip)
        log.info("user %s signed in from %s", user.name, ip)
        resp = RedirectResponse(safe_next(nxt), 303)
        resp.set_cookie(SESSION_COOKIE, cookie_value, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", path="/",
                        max_age=int(settings.session_ttl_s))  # fmt: skip
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @r.post("/logout")
    @guarded
    async def logout(request: Request) -> Response:
        who, _fields = await _form(request)
        assert who.session is not None
        accounts.close_session(who.session)
        log.info("user %s signed out", who.name)
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # ----- forms ---------------------------------------------------------------------

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        try:
            who = gate.principal(request)
        except ApiError as exc:
            raise PageError(401, exc.detail) from None
        require_session(who)
        form = await read_form(request)
        check_csrf(who, form)
        return who, form

    def _admin(who: Principal) -> None:
        if not who.is_admin:
            raise PageError(403, f"User {who.name} is not an admin.")

    def _self_or_admin(who: Principal, name: str) -> None:
        if not who.is_admin and who.name != name:
            raise PageError(403, "You may change only your own account.")

    def _done(who: Principal, target: str, kind: str, text: str, secret: str = "") -> Response:
        assert who.session is not None
        who.session.flash.append({"kind": kind, "text": text, "secret": secret})
        return RedirectResponse(target, 303)

    def _back(request: Request, form: dict[str, str]) -> str:
        return safe_next(form.get("back") or "/users")

    @r.post("/users/new")
    @guarded
    async def user_new(request: Request) -> Response:
        who, form = await _form(request)
        _admin(who)
        password = form.get("password") or None
        try:
            user, shown = accounts.add_user(form.get("name", "").strip(),
                                            form.get("role", "user"), password)  # fmt: skip
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        if shown:
            return _done(who, "/users", "secret", f"User {user.name} created. Password (shown once):", shown)
        return _done(who, "/users", "ok", f"User {user.name} created.")

    @r.post("/users/{name}/limits")
    @guarded
    async def user_limits(request: Request, name: str) -> Response:
        who, form = await _form(request)
        _admin(who)
        try:
            accounts.set_limits(name, optional_int(form, "max_vgpus"),
                                optional_int(form, "max_gmem_mib"), who)  # fmt: skip
        except ApiError as exc:
            return _done(who, _back(request, form), "error", exc.detail)
        return _done(who, _back(request, form), "ok", f"Limits of {name} saved.")

    @r.post("/users/{name}/role")
    @guarded
    async def user_role(request: Request, name: str) -> Response:
        who, form = await _form(request)
        _admin(who)
        try:
            accounts.set_role(name, form.get("role", ""), who)
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        return _done(who, "/users", "ok", f"{name} is now {form.get('role')}.")

    @r.post("/users/{name}/password")
    @guarded
    async def user_password(request: Request, name: str) -> Response:
        who, form = await _form(request)
        _self_or_admin(who, name)
        try:
            shown = accounts.set_password(name, form.get("password") or None, who)
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        if shown:
            return _done(who, "/users", "secret", f"New password of {name} (shown once):", shown)
        return _done(who, "/users", "ok", f"Password of {name} changed.")

    @r.post("/users/{name}/delete")
    @guarded
    async def user_delete(request: Request, name: str) -> Response:
        who, form = await _form(request)
        _admin(who)
        try:
            accounts.delete_user(name, who)
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        return _done(who, "/users", "ok", f"User {name} deleted.")

    @r.post("/users/{name}/tokens")
    @guarded
    async def token_new(request: Request, name: str) -> Response:
        who, form = await _form(request)
        _self_or_admin(who, name)
        try:
            token, secret = accounts.create_token(name, form.get("label", "").strip(), who)
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        return _done(who, "/users", "secret",
                     f"Token {token.id} for {name} (shown once; use it as ORION_TOKEN):", secret)  # fmt: skip

    @r.post("/users/{name}/tokens/{token_id}/revoke")
    @guarded
    async def token_revoke(request: Request, name: str, token_id: str) -> Response:
        who, form = await _form(request)
        _self_or_admin(who, name)
        try:
            accounts.revoke_token(name, token_id, who)
        except ApiError as exc:
            return _done(who, "/users", "error", exc.detail)
        return _done(who, "/users", "ok", f"Token {token_id} of {name} revoked.")

    @r.post("/tasks/{alloc_id}/release")
    @guarded
    async def task_release(request: Request, alloc_id: str) -> Response:
        who, form = await _form(request)
        back = safe_next(form.get("back") or "/tasks")
        try:
            a = service.find(alloc_id)
            if not who.is_admin and a.user != who.name:
                raise PageError(403, "You may release only your own tasks.")
            service.release(alloc_id, f"released by {who.name} from the dashboard")
        except ApiError as exc:
            return _done(who, back, "error", exc.detail)
        return _done(who, back, "ok", f"Allocation {alloc_id[:8]} released.")


