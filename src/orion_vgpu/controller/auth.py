"""Who is calling and what they may do: the dependencies every route declares.

Credentials, in order: ``Authorization: Bearer`` with a user's API token or the pool
token, then the dashboard session cookie. A bearer that matches nothing is refused
(never silently anonymous). A session used for a write must also carry its CSRF token
(header ``X-CSRF-Token`` on the API, a ``csrf`` field on dashboard forms); bearer
tokens need none because browsers never attach them on their own.

``WRITE_GUARDS`` lists the dependencies that authenticate a write; ``check_routes``
refuses to build an app with a write route that declares none of them.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from orion_vgpu.controller.accounts import ANONYMOUS, Principal, User, check_password
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.ratelimit import LoginLimiter

if TYPE_CHECKING:
    from fastapi import FastAPI

    from orion_vgpu.controller.service import ControllerService

log = logging.getLogger("orion.controller")

SESSION_COOKIE = "orion_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class LoginRequired(Exception):
    """A page needs a logged-in user: answered with a redirect to /login."""


class LoginRefused(Exception):
    """Wrong name/password (401) or too many failures (429, ``retry_after`` seconds)."""

    def __init__(self, status: int, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail)


def _forbidden(detail: str) -> ApiError:
    return ApiError(403, "forbidden", detail)


class Gate:
    """Resolves the caller of a request; its methods are FastAPI dependencies."""

    def __init__(self, service: ControllerService) -> None:
        self.service = service
        self.accounts = service.accounts
        self.settings = service.settings
        self.limiter = LoginLimiter(
            self.settings.login_max_failures,
            self.settings.login_window_s,
            ip_max_failures=4 * self.settings.login_max_failures,
        )

    async def sign_in(self, name: str, password: str, ip: str) -> User:
        """Check a password (rate-limited per user name and per client address)."""
        keys = (f"ip:{ip}", f"user:{name.lower()}")
        # Unknown names are not logged: people type passwords into the name field.
        shown = name if name in self.accounts.by_name else "an unknown user"
        wait = self.limiter.retry_after(keys)
        if wait > 0:
            self.service.metrics.failure("login_rate_limited")
            log.warning("sign-in refused for %s from %s: too many failures", shown, ip)
            raise LoginRefused(429, f"Too many failed sign-ins; try again in {wait:.0f} s.", wait)
        stored = self.accounts.password_hash_of(name)
        ok = await run_in_threadpool(check_password, password, stored)
        user = self.accounts.by_name.get(name) if ok else None
        if user is None:
            self.limiter.failed(keys)
            self.service.metrics.failure("login_failed")
            log.warning("sign-in failed for %s from %s", shown, ip)
            raise LoginRefused(401, "Wrong user name or password.")
        self.limiter.succeeded([keys[1]])
        return user

    # ----- identification ----------------------------------------------------------------

    def principal(self, request: Request) -> Principal:
        cached = getattr(request.state, "principal", None)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        who = self._identify(request)
        request.state.principal = who
        return who

    def _identify(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise _unauthorized("send Authorization: Bearer <token>")
            if self.service.is_pool_token(value):
                return Principal("node", "pool", "pool_token")
            user = self.accounts.by_token(value)
            if user is None:
                raise _unauthorized("unknown or revoked token (create one with `orion user token`)")
            return Principal("user", user.name, "token", user)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            found = self.accounts.session(cookie)
            if found is not None:
                session, user = found
                return Principal("user", user.name, "session", user, session)
        return ANONYMOUS

    def _csrf_ok(self, request: Request, who: Principal) -> None:
        """API writes by a browser session must echo the session's CSRF token."""
        if who.via == "session" and request.method in UNSAFE:
            sent = request.headers.get(CSRF_HEADER, "")
            if who.session is None or not hmac.compare_digest(sent, who.session.csrf):
                raise _forbidden(f"missing or wrong CSRF token (send the {CSRF_HEADER} header)")

    # ----- dependencies ------------------------------------------------------------------

    async def reader(self, request: Request) -> Principal:
        """Read API and /metrics: open when reads are public, else any credential."""
        who = self.principal(request)
        if not who.known and not self.settings.reads_open:
            raise _unauthorized(
                "this controller needs a token to read (Authorization: Bearer <token>)"
            )
        return who

    async def page_reader(self, request: Request) -> Principal:
        """Dashboard pages: like ``reader``, but a browser is sent to the login page."""
        try:
            who = self.principal(request)
        except ApiError:
            who = ANONYMOUS
        if not who.known and not self.settings.reads_open:
            raise LoginRequired()
        return who

    async def client_writer(self, request: Request) -> Principal:
        """Allocations: a user (token, or session + CSRF); anonymous only in open mode."""
        who = self.principal(request)
        if who.kind == "node":
            raise _forbidden("the pool token is for servers; clients use a user token")
        if not who.known:
            if self.settings.auth == "open":
                return who
            raise _unauthorized(
                "this controller requires a user token: set ORION_TOKEN (or [client] token) "
                "to a token from `orion user token NAME`"
            )
        self._csrf_ok(request, who)
        return who

    async def user(self, request: Request) -> Principal:
        """Any signed-in user (token, or session + CSRF for writes)."""
        who = self.principal(request)
        if who.user is None:
            raise _unauthorized("sign in or send a user token (Authorization: Bearer <token>)")
        self._csrf_ok(request, who)
        return who

    async def admin(self, request: Request) -> Principal:
        who = await self.user(request)
        if not who.is_admin:
            raise _forbidden(f"user {who.name} is not an admin")
        return who

    async def node(self, request: Request) -> None:
        """Server routes: only the pool token, checked before the body is looked at."""
        self.service.check_token(request.headers.get("authorization"))

    def write_guards(self) -> set[Callable[..., Any]]:
        return {self.client_writer, self.user, self.admin, self.node}


def _calls(dependant: Dependant) -> set[Any]:
    found = set()
    for dep in dependant.dependencies:
        found.add(dep.call)
        found |= _calls(dep)
    return found


def check_routes(app: FastAPI, guards: set[Callable[..., Any]]) -> None:
    """Refuse to start with a write route that authenticates nobody (a programming error)."""
    for route in app.routes:
        if not isinstance(route, APIRoute) or not (route.methods & UNSAFE):
            continue
        if not (_calls(route.dependant) & guards) and not getattr(
            route.endpoint, "_orion_guarded", False
        ):
            raise RuntimeError(f"write route {route.path} has no auth dependency")


def guarded(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an endpoint that checks credentials itself (login, dashboard forms)."""
    endpoint._orion_guarded = True  # type: ignore[attr-defined]
    return endpoint
