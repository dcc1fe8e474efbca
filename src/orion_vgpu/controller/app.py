"""FastAPI app of the controller: REST API (/api/v1), dashboard pages, /metrics."""

# No `from __future__ import annotations`: FastAPI must see the dependency types
# (local Annotated aliases) as objects, not strings.

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from orion_vgpu import __version__
from orion_vgpu.controller.accounts import Principal
from orion_vgpu.controller.api import API_PREFIX, client_routes, dashboard_routes, server_routes
from orion_vgpu.controller.auth import Gate, LoginRequired, check_routes
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.forms import PageError
from orion_vgpu.controller.pages import page_routes
from orion_vgpu.controller.render import STATIC, is_partial, render_page
from orion_vgpu.controller.service import ControllerService
from orion_vgpu.controller.settings import (
    ControllerSettings,
    SettingsError,
    prepare_data_dir,
    resolve_admin_password,
    resolve_pool_token,
)
from orion_vgpu.controller.users_api import login_routes, user_routes

log = logging.getLogger("orion.controller")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_request",
}


def announce_password(password: str) -> None:
    """Stdout only, once: never through logging, so it is in no log file."""
    print(
        f"orion controller: created user admin with password {password} (shown only this "
        "once; sign in to the dashboard and change it, or restart with ORION_ADMIN_PASSWORD)",
        file=sys.stdout,
        flush=True,
    )


def create_app(
    settings: ControllerSettings, announce: Callable[[str], None] = announce_password
) -> FastAPI:
    """Build the app; opens the store and loads state now so errors surface at startup."""
    prepare_data_dir(settings.data_dir)
    token, token_source = resolve_pool_token(settings.data_dir, settings.pool_token)
    service = ControllerService(settings, token)
    password, password_source = resolve_admin_password(settings.admin_password)
    try:
        generated = service.accounts.bootstrap_admin(password)
    except ApiError as exc:
        service.close()
        raise SettingsError(f"{password_source}: {exc.detail}") from None
    if generated:
        announce(generated)
    gate = Gate(service)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_every(settings.reap_interval_s, service.reap, "reaper"),
                                name="orion-reaper"),
            asyncio.create_task(_every(settings.sample_interval_s, service.sample, "usage sample",
                                       first=True), name="orion-sampler"),
            asyncio.create_task(_every(60.0, service.accounts.expire_sessions, "session expiry"),
                                name="orion-sessions"),
        ]  # fmt: skip
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            service.close()

    app = FastAPI(
        title="orion-vgpu controller",
        version=__version__,
        lifespan=lifespan,
        docs_url=f"{API_PREFIX}/docs",
        openapi_url=f"{API_PREFIX}/openapi.json",
        redoc_url=None,
    )
    app.state.service = service
    app.state.gate = gate
    app.state.token_source = token_source
    app.state.admin_password_source = password_source
    _install_error_handlers(app, service)
    client_routes(app, gate)
    dashboard_routes(app, gate)
    user_routes(app, gate, API_PREFIX)
    login_routes(app, gate, API_PREFIX)
    server_routes(app, gate)
    page_routes(app, gate)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(_who: Annotated[Principal, Depends(gate.reader)]) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    check_routes(app, gate.write_guards())
    return app


async def _every(interval: float, job: Callable[[], object], what: str, first: bool = False) -> None:
    if first:
        _run(job, what)
    while True:
        await asyncio.sleep(interval)
        _run(job, what)


def _run(job: Callable[[], object], what: str) -> None:
    try:
        job()
    except Exception:  # keep going: one bad row must not stop lease enforcement
        log.exception("%s pass failed", what)


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, service: ControllerService) -> None:
    """Every API error, including FastAPI's own 404/405/422, is {"error", "detail"};
    dashboard pages answer with an HTML page or a redirect to sign in."""
    failure = service.metrics.failure

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, exc: ApiError) -> JSONResponse:
        failure(exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.detail, headers)

    @app.exception_handler(LoginRequired)
    async def login_required(req: Request, _exc: LoginRequired) -> Response:
        failure("unauthorized")
        if is_partial(req):
            return _error(401, "unauthorized", "sign in again")
        target = req.url.path + (f"?{req.url.query}" if req.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", 303)

    @app.exception_handler(PageError)
    async def page_error(req: Request, exc: PageError) -> Response:
        failure(_STATUS_CODES.get(exc.status, "error"))
        return render_page(req, "error.html", {"title": "Error", "status": exc.status,
                                               "message": exc.message, "me": None, "page": "",
                                               "refresh": 0}, exc.status)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        failure(code)
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        failure("invalid_request")
        return _error(422, "invalid_request", _validation_text(exc))

    @app.exception_handler(Exception)
    async def internal(req: Request, exc: Exception) -> JSONResponse:
        failure("internal_error")
        log.exception("internal error on %s %s", req.method, req.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _validation_text(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"
