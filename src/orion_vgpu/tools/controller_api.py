"""Read-only calls to the controller's REST API for the tools (`check`, `smi`, `up`)."""

from __future__ import annotations

from typing import Any

import httpx

from orion_vgpu.config import UserError


class ControllerUnreachable(UserError):
    """No answer from the controller address."""


class ControllerApi:
    def __init__(self, addr: str, token: str | None = None, timeout: float = 3.0) -> None:
        self.addr = addr
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=f"http://{addr}/api/v1", headers=headers, timeout=timeout
        )

    def __enter__(self) -> ControllerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def get(self, path: str, **params: Any) -> Any:
        try:
            response = self._client.get(path, params=params or None)
        except httpx.TransportError as exc:
            raise ControllerUnreachable(
                f"cannot reach Orion Controller at {self.addr} ({describe_transport_error(exc)}); "
                "start it (`orion controller` or `orion up`) or point ORION_CONTROLLER / "
                "[controller] controller_addr at it"
            ) from None
        if response.status_code in (401, 403):
            raise UserError(
                f"Orion Controller at {self.addr} refused GET {path} (HTTP {response.status_code}); "
                "export ORION_TOKEN (user token) or ORION_POOL_TOKEN"
            )
        if response.status_code >= 400:
            raise UserError(
                f"Orion Controller at {self.addr} answered GET {path} with HTTP "
                f"{response.status_code}: {_detail(response)}"
            )
        try:
            return response.json()
        except ValueError:
            raise UserError(
                f"{self.addr} answered GET {path} with something that is not JSON; "
                "is it an Orion Controller?"
            ) from None

    def info(self) -> dict[str, Any]:
        return dict(self.get("/info"))

    def pool(self) -> dict[str, Any]:
        return dict(self.get("/pool"))

    def allocations(self, state: str = "active") -> list[dict[str, Any]]:
        reply = self.get("/allocations", state=state)
        if isinstance(reply, dict):  # tolerate {"allocations": [...]}
            reply = reply.get("allocations", [])
        return list(reply)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return str(body)[:200]


def describe_transport_error(exc: httpx.TransportError) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return text.splitlines()[0] if text else type(exc).__name__
