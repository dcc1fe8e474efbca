"""REST API under /api/v1 (docs/architecture.md): clients, servers, dashboard data.

Every route declares who may call it (``auth.Gate``): reads follow the read policy,
allocations need a user token unless the controller runs with ``--auth open``, server
routes need the pool token.
"""

# No `from __future__ import annotations`: FastAPI must see the dependency types
# (local Annotated aliases) as objects, not strings.

from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from orion_vgpu.controller import schemas, views
from orion_vgpu.controller.accounts import Principal
from orion_vgpu.controller.auth import Gate
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.routing import Routes
from orion_vgpu.controller.service import Owner

API_PREFIX = "/api/v1"


def client_routes(app: FastAPI, gate: Gate) -> None:
    service = gate.service
    r = Routes(app, API_PREFIX)
    Reader = Annotated[Principal, Depends(gate.reader)]
    Writer = Annotated[Principal, Depends(gate.client_writer)]

    @r.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse({**service.info(), "auth": service.settings.auth})

    @r.get("/pool")
    async def pool(_who: Reader) -> JSONResponse:
        return JSONResponse(service.pool())

    @r.post("/allocations", status_code=201)
    async def allocate(body: schemas.AllocationIn, request: Request, who: Writer) -> JSONResponse:
        owner = None
        if who.user is not None:
            owner = Owner(who.user.name, who.via, who.user.limits)
        result = await service.allocate(body, request.is_disconnected, owner)
        return JSONResponse(result, status_code=201)

    @r.get("/allocations")
    async def list_allocations(
        _who: Reader,
        state: Literal["active", "ended", "all"] = "active",
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> JSONResponse:
        return JSONResponse(service.list_allocations(state, limit))

    @r.get("/allocations/{alloc_id}")
    async def get_allocation(alloc_id: str, _who: Reader) -> JSONResponse:
        return JSONResponse(service.get(alloc_id))

    @r.delete("/allocations/{alloc_id}")
    async def release(alloc_id: str, who: Writer) -> JSONResponse:
        a = service.find(alloc_id)
        # With user tokens required, an allocation is its user's (or an admin's) to end.
        if service.settings.auth == "required" and not who.is_admin and a.user != who.name:
            raise ApiError(403, "forbidden", f"allocation {alloc_id} belongs to {a.user}")
        reason = "released by client" if who.name in (a.user, "anonymous") else f"released by {who.name}"
        return JSONResponse(service.release(alloc_id, reason))

    @r.get("/whoami")
    async def whoami(who: Reader) -> JSONResponse:
        user = who.user.public() if who.user else None
        return JSONResponse({"name": who.name, "kind": who.kind, "via": who.via, "user": user,
                             "auth": service.settings.auth})  # fmt: skip



def dashboard_routes(app: FastAPI, gate: Gate) -> None:
    """The data behind each page (the page renders exactly this dict)."""
    service = gate.service
    r = Routes(app, API_PREFIX + "/dashboard")
    Reader = Annotated[Principal, Depends(gate.reader)]

    @r.get("/summary")
    async def summary(_who: Reader, hours: int = 6) -> JSONResponse:
        return JSONResponse(views.summary(service, hours))

    @r.get("/tasks")
    async def tasks(
        _who: Reader, page: Annotated[int, Query(ge=1)] = 1,
        fpage: Annotated[int, Query(ge=1)] = 1, user: str = "",
    ) -> JSONResponse:  # fmt: skip
        return JSONResponse(views.tasks(service, page, fpage, user=user or None))

    @r.get("/nodes")
    async def nodes(
        _who: Reader, q: str = "", state: str = "", page: Annotated[int, Query(ge=1)] = 1,
        per_page: Annotated[int, Query(ge=1, le=views.MAX_PER_PAGE)] = 20,
    ) -> JSONResponse:  # fmt: skip
        state = state if state in ("up", "down") else ""
        return JSONResponse(views.nodes(service, q, state, page, per_page))

    @r.get("/users")
    async def users(who: Annotated[Principal, Depends(gate.user)], period: str = "24h") -> JSONResponse:
        return JSONResponse(views.users(service, who, period))



def server_routes(app: FastAPI, gate: Gate) -> None:
    service = gate.service
    # The pool token is checked before the body is even parsed.
    r = Routes(app, API_PREFIX + "/nodes", dependencies=[Depends(gate.node)])

    @r.post("/register")
    async def register(body: schemas.RegisterIn) -> JSONResponse:
        return JSONResponse(service.register(body))

    @r.post("/{node_id}/heartbeat")
    async def heartbeat(node_id: str, body: schemas.HeartbeatIn) -> JSONResponse:
        return JSONResponse(service.heartbeat(node_id, body))

    @r.post("/{node_id}/events")
    async def events(node_id: str, body: schemas.EventIn) -> JSONResponse:
        return JSONResponse(service.event(node_id, body))

