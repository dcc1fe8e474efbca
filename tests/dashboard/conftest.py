"""Fixtures for the dashboard, access-control and metrics tests.

In-process apps (``app_client``) drive the real FastAPI app through Starlette's test
client, with the real SQLite store in tmp_path; browser and CLI tests use real processes
(tests/pool.py, tests/e2e/cluster.py).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
from fastapi.testclient import TestClient  # noqa: E402

from orion_vgpu.controller.app import create_app  # noqa: E402
from orion_vgpu.controller.settings import ControllerSettings  # noqa: E402
from pool import node_body  # noqa: E402

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
SECRET_RE = re.compile(r'id="new-secret">([^<]+)<')


class AppClient:
    """A TestClient on a fresh controller app, plus the admin password it printed."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.announced: list[str] = []
        self.settings = ControllerSettings(data_dir=tmp, **settings)
        self.app = create_app(self.settings, announce=self.announced.append)
        self.client = TestClient(self.app)
        self.service = self.app.state.service
        self.pool_token = (tmp / "pool_token").read_text().strip()

    @property
    def admin_password(self) -> str:
        return self.settings.admin_password or self.announced[0]

    @property
    def node_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.pool_token}"}

    def register(self, name: str, gpus: int = 2, memory_mib: int = 16384, vgpu_count: int = 4) -> str:
        r = self.client.post("/api/v1/nodes/register", json=node_body(name, gpus, memory_mib, vgpu_count),
                             headers=self.node_auth)  # fmt: skip
        r.raise_for_status()
        return str(r.json()["node_id"])

    def login(self, name: str = "admin", password: str | None = None) -> str:
        """Sign in through the form; returns the session's CSRF token for later forms."""
        page = self.client.get("/login")
        csrf = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
        r = self.client.post("/login", data={"csrf": csrf, "username": name,
                                             "password": password or self.admin_password,
                                             "next": "/"}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 303, r.text
        return CSRF_RE.search(self.client.get("/").text).group(1)  # type: ignore[union-attr]

    def api_token(self, name: str = "admin", password: str | None = None) -> str:
        r = self.client.post("/api/v1/login", json={"username": name,
                                                    "password": password or self.admin_password})  # fmt: skip
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def add_user(self, admin_token: str, name: str, **extra: Any) -> dict[str, Any]:
        r = self.client.post("/api/v1/users", json={"name": name, **extra},
                             headers=bearer(admin_token))  # fmt: skip
        assert r.status_code == 201, r.text
        return dict(r.json())

    def user_token(self, admin_token: str, name: str) -> str:
        r = self.client.post(f"/api/v1/users/{name}/tokens", json={"label": "test"},
                             headers=bearer(admin_token))  # fmt: skip
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(autouse=True)
def _no_admin_password_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests read the generated password; a developer's ORION_ADMIN_PASSWORD would hide it."""
    monkeypatch.delenv("ORION_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("ORION_TOKEN", raising=False)


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Callable[..., AppClient]]:
    made: list[AppClient] = []

    def make(**settings: Any) -> AppClient:
        c = AppClient(tmp_path / f"ctl{len(made)}", **settings)
        c.client.__enter__()  # run the lifespan (reaper, sampler)
        made.append(c)
        return c

    yield make
    for c in made:
        c.client.__exit__(None, None, None)
