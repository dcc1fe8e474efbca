"""FastAPI app of the controller: the REST API of docs/architecture.md under /api/v1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orion_vgpu import __version__
from orion_vgpu.controller import schemas
from orion_vgpu.controller.service import ApiError, ControllerService
from orion_vgpu.controller.settings import (
    ControllerSettings,
    prepare_data_dir,
    resolve_pool_token,
)

log = logging.getLogger("orion.controller")

API_PREFIX = "/api/v1"
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_request",
}


def create_app(settings: ControllerSettings) -> FastAPI:
    """Build the app; opens the store and loads state now so errors surface at startup."""
    prepare_data_dir(settings.data_dir)
    token, token_source = resolve_pool_token(settings.data_dir, settings.pool_token)
    service = ControllerService(settings, token)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(_reap_forever(service), name="orion-reaper")
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
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
    app.state.token_source = token_source
    _install_error_handlers(app)
    app.include_router(_client_routes(service), prefix=API_PREFIX)
    app.include_router(_server_routes(service), prefix=API_PREFIX)
    return app


async def _reap_forever(service: ControllerService) -> None:
    interval = service.settings.reap_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            service.reap()
        except Exception:  # keep reaping: one bad row must not stop lease enforcement
            log.exception("reaper pass failed")


def _client_routes(service: ControllerService) -> APIRouter:
    r = APIRouter()

    @r.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse(service.info())

    @r.get("/pool")
    async def pool() -> JSONResponse:
        return JSONResponse(service.pool())

    @r.post("/allocations", status_code=201)
    async def allocate(body: schemas.AllocationIn, request: Request) -> JSONResponse:
        result = await service.allocate(body, request.is_disconnected)
        return JSONResponse(result, status_code=201)

    @r.get("/allocations")
    async def list_allocations(
        state: Literal["active", "ended", "all"] = "active",
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> JSONResponse:
        return JSONResponse(service.list_allocations(state, limit))

    @r.get("/allocations/{alloc_id}")
    async def get_allocation(alloc_id: str) -> JSONResponse:
        return JSONResponse(service.get(alloc_id))

    @r.delete("/allocations/{alloc_id}")
    async def release(alloc_id: str) -> JSONResponse:
        return JSONResponse(service.release(alloc_id))

    return r


def _server_routes(service: ControllerService) -> APIRouter:
    async def pool_token(authorization: Annotated[str | None, Header()] = None) -> None:
        service.check_token(authorization)

    r = APIRouter(prefix="/nodes", dependencies=[Depends(pool_token)])

    @r.post("/register")
    async def register(body: schemas.RegisterIn) -> JSONResponse:
        return JSONResponse(service.register(body))

    @r.post("/{node_id}/heartbeat")
    async def heartbeat(node_id: str, body: schemas.HeartbeatIn) -> JSONResponse:
        return JSONResponse(service.heartbeat(node_id, body))

    @r.post("/{node_id}/events")
    async def events(node_id: str, body: schemas.EventIn) -> JSONResponse:
        return JSONResponse(service.event(node_id, body))

    return r


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, including FastAPI's own 404/405/422, is {"error", "detail"}."""

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_text(exc))

    @app.exception_handler(Exception)
    async def internal(req: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", req.method, req.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _validation_text(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"
