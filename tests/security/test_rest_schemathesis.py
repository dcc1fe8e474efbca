"""The controller's REST API under schemathesis (property-based requests generated from its
own OpenAPI document), against a real controller process: no request makes it answer
5xx, and every successful response matches the schema it declares.

Error bodies are not checked against the schema: they use the project's
``{"error", "detail"}`` shape (docs/architecture.md), which the OpenAPI document does not
declare yet (see docs/reliability.md, "REST API")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from pool import ControllerProc

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import (  # noqa: E402 - only once schemathesis is known installed
    content_type_conformance,
    response_schema_conformance,
)


@pytest.fixture(scope="module")
def controller_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProc]:
    ctl = ControllerProc(Path(tmp_path_factory.mktemp("controller")), {"lease_s": 10})
    ctl.start()
    yield ctl
    ctl.stop()


@pytest.fixture(scope="module")
def api_schema(controller_api: ControllerProc) -> Any:
    return schemathesis.openapi.from_url(controller_api.api + "/openapi.json")


# 500s schemathesis found that are reported to the controller's owner, not fixed here; each
# is pinned by a strict xfail below, which starts failing once it is fixed.
KNOWN_500 = {
    "OverflowError: Python int too large to convert to SQLite INTEGER":
        "POST /nodes/register with an integer beyond 64 bits in gpus[].index or memory_mib",
    "invalid literal for int() with base 10":
        "GET /dashboard/nodes once a node is named with a non-ASCII digit such as '²'",
}


def _known(text: str) -> bool:
    return any(sig in text for sig in KNOWN_500)


def _check(case: Any, ctl: ControllerProc, failures: list[str]) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("wait_s"), (int, float)):
        # A valid wait_s (up to a day) makes the request wait that long for resources.
        case.body["wait_s"] = min(case.body["wait_s"], 0.2)
    # Node endpoints get past authentication so their bodies are exercised too.
    headers = ctl.auth if case.path.startswith("/api/v1/nodes") else {}
    response = case.call(base_url=ctl.url, headers=headers, timeout=10)
    if response.status_code >= 500 and not _known(response.text):
        failures.append(f"{case.method} {case.formatted_path} query={case.query} "
                        f"body={case.body!r:.300} -> {response.status_code}: "
                        f"{response.text[:300]}")
    elif 200 <= response.status_code < 300:
        case.validate_response(response, checks=[response_schema_conformance,
                                                  content_type_conformance])


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_controller_api_never_fails_on_any_request(api_schema: Any,
                                                   controller_api: ControllerProc,
                                                   mode: str) -> None:
    """Every operation, 30 generated requests each (valid ones, then invalid ones); the
    pytest plugin of schemathesis does not load under this pytest, so hypothesis drives
    each operation's strategy directly."""
    failures: list[str] = []
    generation = schemathesis.GenerationMode(mode)
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 8, operations
    for op in operations:
        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=generation))
        def run(case: Any) -> None:
            _check(case, controller_api, failures)

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative", op.label  # nothing of it can be made invalid
    assert not failures, "\n".join(failures[:20])


def _register(ctl: ControllerProc, name: str, index: int = 0, memory_mib: int = 1024
              ) -> httpx.Response:
    return httpx.post(ctl.api + "/nodes/register", headers=ctl.auth, timeout=10, json={
        "name": name, "addr": "127.0.0.1:1", "unix_socket": None, "version": "0.1.0",
        "protocol_version": 1, "vgpu_count": 1,
        "gpus": [{"index": index, "uuid": f"GPU-{name}", "name": "g", "memory_mib": memory_mib,
                  "emulated": True}]})


def _must(r: httpx.Response) -> None:
    """A precondition of a pinned bug: pytest.fail is not the AssertionError xfail expects."""
    if r.status_code != 200:
        pytest.fail(f"precondition: {r.status_code} {r.text}")


# Fixed in the controller (schemas bound every stored integer; views sort ASCII digits only).
@pytest.mark.parametrize("field", ["index", "memory_mib"])
def test_register_with_huge_integers_is_a_client_error(controller_api: ControllerProc,
                                                       field: str) -> None:
    _must(_register(controller_api, f"fine-{field}"))
    r = _register(controller_api, f"huge-{field}", **{field: 2**63})
    assert r.status_code < 500, r.text


def test_node_named_with_unicode_digit_does_not_break_the_dashboard(
        controller_api: ControllerProc) -> None:
    _must(_register(controller_api, "node\u00b2"))
    r = httpx.get(controller_api.api + "/dashboard/nodes", timeout=10)
    assert r.status_code < 500, r.text
