"""Streamed transfers through the arena: both sides agree on chunk positions, bytes arrive
intact across wrap-arounds in both directions, and a gone or stuck peer ends the wait."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol import shm
from orion_vgpu.protocol.shm import HEADER_SIZE, Arena, ShmError, ShmPeerGone, chunks

RING = 64 * 1024
SIZE = HEADER_SIZE + 2 * RING  # ring and download area of 64 KiB each


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Arena, Arena]:
    monkeypatch.setenv("ORION_SHM_DIR", str(tmp_path))
    path = str(tmp_path / "orion-0123456789abcdef")
    client = Arena(path, SIZE, create=True)
    return client, Arena(path)


@settings(max_examples=300, deadline=None)
@given(ring_pages=st.integers(4, 64), before=st.integers(0, 10 * 4096 * 64),
       nbytes=st.integers(1, 4096 * 200), chunk_pages=st.integers(1, 16))
def test_chunk_positions_are_what_the_client_reserves(ring_pages: int, before: int,
                                                      nbytes: int, chunk_pages: int) -> None:
    """The worker recomputes positions with ``chunks``; the client gets them from
    ``place``: they must be the same, and no chunk may straddle the ring's end."""
    ring = ring_pages * 4096
    chunk = min(chunk_pages * 4096, ring)
    produced = before
    start = _place(produced, min(chunk, nbytes), ring)
    total = 0
    for pos, c in chunks(start, nbytes, chunk, ring):
        assert pos == _place(produced, c, ring)
        assert pos % ring + c <= ring
        produced = pos + c
        total += c
    assert total == nbytes


def _place(produced: int, n: int, ring: int) -> int:
    pos = produced
    if pos % ring + n > ring:
        pos += ring - pos % ring
    return pos


def _payload(n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))


def test_upload_stream_wraps_the_ring(pair: tuple[Arena, Arena]) -> None:
    client, server = pair
    client.reserve(3000)  # an earlier whole upload, consumed: the stream starts mid-ring
    server.set_consumed(3000)
    data, out, chunk = _payload(1 << 20), torch.zeros(1 << 20, dtype=torch.uint8), 16 * 1024
    start = client.place(chunk)[0]

    def worker() -> None:
        done = 0
        for pos, c in chunks(start, data.numel(), chunk, server.ring_size):
            server.wait_published(pos + c)
            shm.copy_bytes(out[done:done + c], server.ring_region(pos, c))
            server.set_consumed(pos + c)
            done += c

    t = threading.Thread(target=worker)
    t.start()
    done = 0
    for pos, c in chunks(start, data.numel(), chunk, client.ring_size):
        assert client.reserve_chunk(c) == pos
        shm.copy_bytes(client.ring_region(pos, c), data[done:done + c])
        client.set_published(pos + c)
        done += c
    t.join(30)
    assert torch.equal(out, data)


def test_download_stream_wraps_the_area(pair: tuple[Arena, Arena]) -> None:
    client, server = pair
    data, out, chunk = _payload(700_001), torch.zeros(700_001, dtype=torch.uint8), 12 * 1024
    area, base = server.download_size, server.download_off
    server.reset_download()

    def worker() -> None:
        done = 0
        for pos, c in chunks(0, data.numel(), chunk, area):
            server.wait_dl_consumed(pos + c - area)
            shm.copy_bytes(server.region(base + pos % area, c), data[done:done + c])
            server.set_dl_published(pos + c)
            done += c

    t = threading.Thread(target=worker)
    t.start()
    done = 0
    for pos, c in chunks(0, data.numel(), chunk, area):
        client.wait_dl_published(pos + c)
        shm.copy_bytes(out[done:done + c], client.region(base + pos % area, c))
        client.set_dl_consumed(pos + c)
        done += c
    t.join(30)
    assert torch.equal(out, data)


def test_a_closed_peer_ends_the_wait(pair: tuple[Arena, Arena]) -> None:
    _client, server = pair
    with pytest.raises(ShmPeerGone, match="connection closed"):
        server.wait_published(4096, alive=lambda: False)


def test_a_stuck_peer_ends_the_wait(pair: tuple[Arena, Arena],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "STALL_S", 0.2)
    _client, server = pair
    with pytest.raises(ShmError, match="stopped writing a streamed upload"):
        server.wait_published(4096, alive=lambda: True)


def test_stream_chunk_needs_room_for_four_chunks() -> None:
    assert shm.stream_chunk(128 << 20) == shm.STREAM_CHUNK
    assert shm.stream_chunk(1 << 20) == 256 * 1024
    assert shm.stream_chunk(200 * 1024) == 0  # too small: whole copies or the socket
