"""Host buffers (client.hostpool, server.hostbuffers): what the client maps is what the worker
maps; a buffer is reused only once nothing uses it; a stranger's buffer is refused."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from orion_vgpu.client.hostpool import MAX_BUFFERS, HostPool
from orion_vgpu.server.executor import SessionError
from orion_vgpu.server.hostbuffers import HostBuffers, release

NONCE = "0123456789abcdef0123456789abcdef"
MIB = 1 << 20


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORION_SHM_DIR", str(tmp_path))
    return tmp_path


def test_download_lands_in_the_buffer_and_is_reused_only_when_dropped(shm_dir: Path) -> None:
    pool, worker = HostPool(64 * MIB, NONCE), HostBuffers(NONCE)
    src = torch.arange(MIB, dtype=torch.float32)
    buf = pool.take(4 * MIB)
    assert buf is not None
    mm = worker.get(pool.destination(buf))
    assert list(shm_dir.iterdir()) == []  # mapped by both: the file is gone
    HostBuffers.data(mm, 4 * MIB).copy_(src.view(torch.uint8))
    kept = pool.wrap(buf, torch.float32, [1024, 1024], 4 * MIB)
    view = kept[3]
    del kept
    gc.collect()
    other = pool.take(4 * MIB)
    assert other is not None and other is not buf  # a view still uses the first one
    assert torch.equal(view, src.view(1024, 1024)[3])
    del view
    gc.collect()
    pool.give_back(other)
    assert {pool.take(4 * MIB), pool.take(4 * MIB)} == {buf, other}


def test_upload_buffer_comes_back_when_the_worker_frees_its_tensor(shm_dir: Path) -> None:
    pool, worker = HostPool(64 * MIB, NONCE), HostBuffers(NONCE)
    buf = pool.take(8 * MIB)
    assert buf is not None
    src = torch.randn(2 * MIB)
    buf.data(8 * MIB)[:] = src.view(torch.uint8).numpy()
    pool.lend(buf)
    t = HostBuffers.adopt(worker.get(pool.destination(buf)), 8 * MIB, torch.float32, [2 * MIB])
    assert torch.equal(t, src)
    t.mul_(2)  # the worker's memory now: the client must not reuse it
    assert pool.take(8 * MIB) is not buf
    alias = t[10:]
    del t
    gc.collect()
    assert buf.lent()
    del alias
    gc.collect()
    assert not buf.lent()
    assert pool.take(8 * MIB) is buf


def test_cuda_style_upload_releases_at_once(shm_dir: Path) -> None:
    pool, worker = HostPool(64 * MIB, NONCE), HostBuffers(NONCE)
    buf = pool.take(MIB)
    assert buf is not None
    pool.lend(buf)
    mm = worker.get(pool.destination(buf))
    release(mm)
    assert pool.take(MIB) is buf


def test_a_buffer_without_the_session_nonce_is_refused_and_left_alone(shm_dir: Path) -> None:
    stranger = HostPool(64 * MIB, "f" * 32)
    buf = stranger.take(MIB)
    assert buf is not None
    with pytest.raises(SessionError, match="not this session's"):
        HostBuffers(NONCE).get([buf.name, buf.size, []])
    assert (shm_dir / buf.name).exists()
    for bad in (["../etc/passwd", MIB, []], [buf.name, buf.size + 4096, []], "x", [1, 2, 3]):
        with pytest.raises(SessionError):
            HostBuffers("f" * 32).get(bad)
    stranger.close()
    assert list(shm_dir.iterdir()) == []


def test_cache_limit_drops_free_buffers_and_tells_the_worker(shm_dir: Path) -> None:
    pool, worker = HostPool(4 * MIB, NONCE), HostBuffers(NONCE)
    a, b = pool.take(4 * MIB), pool.take(4 * MIB)
    assert a is not None and b is not None
    for buf in (a, b):
        worker.get(pool.destination(buf))
        pool.give_back(buf)
    c = pool.take(16 * MIB)  # collecting keeps 4 MiB of free buffers: one is dropped
    assert c is not None
    dest = pool.destination(c)
    assert len(dest[2]) == 1 and dest[2][0] in (a.name, b.name)
    worker.get(dest)
    assert dest[2][0] not in worker.maps and c.name in worker.maps


def test_sweep_removes_only_the_sessions_unmapped_files(shm_dir: Path) -> None:
    pool, other = HostPool(64 * MIB, NONCE), HostPool(64 * MIB, "e" * 32)
    mine, theirs = pool.take(MIB), other.take(MIB)
    assert mine is not None and theirs is not None
    # A file with the session's prefix but another nonce is not the session's; one with an
    # empty header is (its program was killed right after creating it).
    (shm_dir / (pool.prefix + "00" * 8)).write_bytes(b"\1" * 8192)
    (shm_dir / (pool.prefix + "11" * 8)).write_bytes(b"")
    assert HostBuffers(NONCE).sweep() == 2
    assert sorted(p.name for p in shm_dir.iterdir()) == sorted([theirs.name,
                                                                pool.prefix + "00" * 8])


def test_pool_stops_at_its_buffer_limit(shm_dir: Path) -> None:
    pool = HostPool(1 << 40, NONCE)
    held = [pool.take(MIB) for _ in range(MAX_BUFFERS)]
    assert all(held)
    assert pool.take(MIB) is None  # the caller falls back to the arena
    pool.close()
    assert list(shm_dir.iterdir()) == []
