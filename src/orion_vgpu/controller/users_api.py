"""REST API for people: ``/api/v1/users`` (admins; a user may manage their own tokens and
password). Secrets (generated passwords, tokens) appear once, in the creating response."""

# No `from __future__ import annotations`: FastAPI must see the dependency types
# (local Annotated aliases) as objects, not strings.

from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from orion_vgpu.controller.accounts import Principal
from orion_vgpu.controller.auth import Gate, LoginRefused, guarded
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.routing import Routes

MAX_LIMIT = 2**31 - 1  # stored as a SQL integer


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "user"] = "user"
    password: str | None = Field(None, max_length=1024)  # None: generated, returned once
    max_vgpus: int | None = Field(None, ge=0, le=MAX_LIMIT)
    max_gmem_mib: int | None = Field(None, ge=0, le=MAX_LIMIT)


class UserPatch(BaseModel):
    """Only the fields present change; ``null`` limits mean "no limit"."""

    role: Literal["admin", "user"] | None = None
    password: str | None = Field(None, max_length=1024)
    new_password: bool = False  # true: generate one and return it once
    max_vgpus: int | None = Field(None, ge=0, le=MAX_LIMIT)
    max_gmem_mib: int | None = Field(None, ge=0, le=MAX_LIMIT)


class TokenIn(BaseModel):
    label: str = Field("", max_length=128)


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    label: str = Field("", max_length=128)


def login_routes(app: FastAPI, gate: Gate, prefix: str) -> None:
    """``POST /api/v1/login``: trade a name and password for a new API token, so people
    without a browser (``orion user login``) can get one. Rate-limited like the form."""
    accounts = gate.service.accounts
    r = Routes(app, prefix)

    @r.post("/login", status_code=201)
    @guarded
    async def login(request: Request) -> JSONResponse:
        try:
            body = LoginIn.model_validate_json(await request.body())
        except ValidationError:
            raise ApiError(401, "unauthorized", "send {\"username\", \"password\"}") from None
        ip = request.client.host if request.client else "?"
        try:
            user = await gate.sign_in(body.username, body.password, ip)
        except LoginRefused as refused:
            code = "rate_limited" if refused.status == 429 else "unauthorized"
            headers = {"Retry-After": str(int(refused.retry_after) + 1)} if refused.retry_after else None
            return JSONResponse({"error": code, "detail": refused.message},
                                status_code=refused.status, headers=headers)  # fmt: skip
        principal = Principal("user", user.name, "password", user)
        token, secret = accounts.create_token(user.name, body.label or "orion user login", principal)
        return JSONResponse({**token.public(), "user": user.name, "token": secret}, status_code=201)



def user_routes(app: FastAPI, gate: Gate, prefix: str) -> None:
    accounts = gate.service.accounts
    scheduler = gate.service.scheduler
    r = Routes(app, prefix + "/users")
    Admin = Annotated[Principal, Depends(gate.admin)]
    User = Annotated[Principal, Depends(gate.user)]

    def mine(who: Principal, name: str) -> None:
        if not who.is_admin and who.name != name:
            raise ApiError(403, "forbidden", "only admins manage other users")

    def user_json(name: str) -> dict[str, object]:
        u = accounts.user(name)
        held = scheduler.holding(u.name)
        return {**u.public(), "holding": {"vgpus": held.vgpus, "gmem_mib": held.gmem_mib,
                                          "allocations": held.allocations},
                "tokens": [t.public() for t in accounts.tokens_of(u)]}  # fmt: skip

    @r.get("")
    async def list_users(who: User) -> JSONResponse:
        names = [u.name for u in accounts.users()] if who.is_admin else [who.name]
        return JSONResponse([user_json(n) for n in names])

    @r.post("", status_code=201)
    async def add_user(body: UserIn, who: Admin) -> JSONResponse:
        user, shown = accounts.add_user(body.name, body.role, body.password)
        if body.max_vgpus is not None or body.max_gmem_mib is not None:
            accounts.set_limits(user.name, body.max_vgpus, body.max_gmem_mib, who)
        out = user_json(user.name)
        if shown:
            out["password"] = shown
        return JSONResponse(out, status_code=201)

    @r.get("/{name}")
    async def get_user(name: str, who: User) -> JSONResponse:
        mine(who, name)
        return JSONResponse(user_json(name))

    @r.patch("/{name}")
    async def patch_user(name: str, body: UserPatch, who: User) -> JSONResponse:
        given = body.model_fields_set
        if given & {"role", "max_vgpus", "max_gmem_mib"} and not who.is_admin:
            raise ApiError(403, "forbidden", "only admins change roles and limits")
        mine(who, name)
        u = accounts.user(name)
        if "role" in given and body.role is not None:
            accounts.set_role(name, body.role, who)
        if given & {"max_vgpus", "max_gmem_mib"}:
            accounts.set_limits(
                name,
                body.max_vgpus if "max_vgpus" in given else u.max_vgpus,
                body.max_gmem_mib if "max_gmem_mib" in given else u.max_gmem_mib,
                who,
            )
        out = user_json(name)
        if body.password is not None or body.new_password:
            shown = accounts.set_password(name, body.password, who)
            if shown:
                out["password"] = shown
        return JSONResponse(out)

    @r.delete("/{name}")
    async def delete_user(name: str, who: Admin) -> JSONResponse:
        accounts.delete_user(name, who)
        return JSONResponse({"ok": True})

    @r.get("/{name}/tokens")
    async def list_tokens(name: str, who: User) -> JSONResponse:
        mine(who, name)
        return JSONResponse([t.public() for t in accounts.tokens_of(accounts.user(name))])

    @r.post("/{name}/tokens", status_code=201)
    async def create_token(name: str, body: TokenIn, who: User) -> JSONResponse:
        mine(who, name)
        token, secret = accounts.create_token(name, body.label, who)
        return JSONResponse({**token.public(), "user": name, "token": secret}, status_code=201)

    @r.delete("/{name}/tokens/{token_id}")
    async def revoke_token(name: str, token_id: str, who: User) -> JSONResponse:
        mine(who, name)
        accounts.revoke_token(name, token_id, who)
        return JSONResponse({"ok": True})

