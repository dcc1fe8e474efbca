"""The upload ring never hands out space that holds bytes the server has not consumed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol.shm import HEADER_SIZE, Arena, ShmError, validate_path

SIZE = HEADER_SIZE + 2 * 64 * 1024  # ring of 64 KiB


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORION_SHM_DIR", str(tmp_path))
    return tmp_path


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(1, 64 * 1024), st.integers(0, 3)), max_size=60))
def test_ring_never_overwrites_unconsumed(ops: list[tuple[int, int]], tmp_path_factory) -> None:  # noqa: ANN001
    d = tmp_path_factory.mktemp("shm")
    os.environ["ORION_SHM_DIR"] = str(d)
    try:
        client = Arena(str(d / "orion-0123456789abcdef"), SIZE, create=True)
        server = Arena(str(d / "orion-0123456789abcdef"))
        pending: list[tuple[int, int]] = []  # (pos, n) uploaded, not yet consumed
        for n, consume in ops:
            for _ in range(consume):  # the server catches up, in order
                if pending:
                    pos, k = pending.pop(0)
                    server.set_consumed(pos + k)
            if not client.fits(n):
                while pending:  # what flush + wait does in the transport
                    pos, k = pending.pop(0)
                    server.set_consumed(pos + k)
            pos = client.reserve(n, timeout=0.01)
            off = pos % client.ring_size
            assert off + n <= client.ring_size  # never straddles the end
            for p, k in pending:  # no overlap with unconsumed uploads
                o = p % client.ring_size
                assert off + n <= o or o + k <= off
            pending.append((pos, n))
    finally:
        del os.environ["ORION_SHM_DIR"]


def test_an_empty_ring_starts_over_at_its_first_pages(shm_dir: Path) -> None:
    """Once the server has consumed everything, the next upload goes to the ring's start
    (pages already mapped) instead of walking on into pages never touched."""
    client = Arena(str(shm_dir / "orion-00000000bbbbbbbb"), SIZE, create=True)
    server = Arena(str(shm_dir / "orion-00000000bbbbbbbb"))
    first = client.reserve(5000)
    second = client.reserve(7000)  # the first is not consumed yet: it goes after it
    assert second % client.ring_size == first % client.ring_size + 5000
    server.set_consumed(second + 7000)
    third = client.reserve(3000)
    assert third % client.ring_size == 0 and third > second  # positions stay monotonic
    server.set_consumed(third + 1000)  # partly consumed: no restart while bytes are pending
    assert client.reserve(100) == third + 3000


def test_ring_full_times_out(shm_dir: Path) -> None:
    a = Arena(str(shm_dir / "orion-00000000aaaaaaaa"), SIZE, create=True)
    a.reserve(60 * 1024)
    with pytest.raises(ShmError, match="stayed full"):
        a.reserve(60 * 1024, timeout=0.05)


@pytest.mark.parametrize("bad", ["/dev/shm/../etc/passwd", "/dev/shm/orion-xyz", "/tmp/orionsock0",
                                 "/dev/shm/sub/orionsock1", "orionsock1", "/dev/shm/orionsock0/.."])
def test_shm_names_are_validated(bad: str) -> None:
    os.environ.pop("ORION_SHM_DIR", None)
    with pytest.raises(ShmError):
        validate_path(bad)


def test_good_names_pass() -> None:
    os.environ.pop("ORION_SHM_DIR", None)
    assert validate_path("/dev/shm/orionsock0") == "/dev/shm/orionsock0"
    assert validate_path("/dev/shm/orion-0123abcd")


def test_the_server_sees_when_the_client_waits(shm_dir: Path) -> None:
    """The client marks its waits for a reply in the arena; the server's mapping sees it."""
    path = str(shm_dir / "orion-00112233445566778899")
    client = Arena(path, SIZE, create=True)
    server = Arena(path)
    assert server.client_running()
    client.set_waiting(True)
    assert not server.client_running()
    client.set_waiting(False)
    assert server.client_running()
    client.close()
    server.close()
