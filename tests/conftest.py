"""Shared fixtures: real controller processes (see tests/pool.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pool import ControllerProc, controller_proc


@pytest.fixture
def controller_factory(tmp_path: Path) -> Iterator[Callable[..., ControllerProc]]:
    """Start controllers with flags, e.g. ``controller_factory(lease_s=1)``; all are
    killed at test end. Each gets its own data dir under tmp_path."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(**opts: Any) -> ControllerProc:
            nonlocal count
            count += 1
            return stack.enter_context(controller_proc(tmp_path / f"c{count}", **opts))

        yield start


@pytest.fixture
def controller(controller_factory: Callable[..., ControllerProc]) -> ControllerProc:
    """A controller with default settings on a free port."""
    return controller_factory()
