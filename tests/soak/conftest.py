"""Fixtures for the soak tests (sizes: soak/sizes.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.procs import Cluster
from soak.sizes import SoakSize, soak_size_from_env


@pytest.fixture(scope="module")
def soak_size() -> SoakSize:
    return soak_size_from_env()


@pytest.fixture(scope="module")
def soak_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("soak")))
    try:
        yield c
    finally:
        c.close()
