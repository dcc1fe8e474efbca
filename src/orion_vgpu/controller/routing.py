"""Routes registered straight on the app, so ``app.routes`` lists every route as an
``APIRoute`` (newer FastAPI versions keep included routers as opaque wrappers, which
would hide routes from ``auth.check_routes`` and the route-enumeration test)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Routes:
    def __init__(self, app: FastAPI, prefix: str = "", **defaults: Any) -> None:
        self.app = app
        self.prefix = prefix
        self.defaults = defaults

    def _add(self, method: str, path: str, kw: dict[str, Any]) -> Decorator:
        options = {**self.defaults, **kw}
        return self.app.api_route(self.prefix + path, methods=[method], **options)

    def get(self, path: str, **kw: Any) -> Decorator:
        return self._add("GET", path, kw)

    def post(self, path: str, **kw: Any) -> Decorator:
        return self._add("POST", path, kw)

    def patch(self, path: str, **kw: Any) -> Decorator:
        return self._add("PATCH", path, kw)

    def delete(self, path: str, **kw: Any) -> Decorator:
        return self._add("DELETE", path, kw)
