"""Fixtures for fault tests: real controller/oriond/client processes, all ended at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.procs import Cluster


def _cluster(root: Path) -> Iterator[Cluster]:
    c = Cluster(root)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(tmp_path)


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for a module whose tests each leave the pool as they found it."""
    yield from _cluster(tmp_path_factory.mktemp("cluster"))

