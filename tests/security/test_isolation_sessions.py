"""Isolation between sessions on one server, and quotas no sequence of ops can exceed,
through real session workers. (Forged, expired, replayed and other-node grants are
refused in tests/sessions/test_sessions_handshake.py.)"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from security_support import H, RawClient, error_of, open_client, peak_rss_bytes, rss_bytes
from sessions_support import Server, make_grant, make_hello, open_session

from orion_vgpu.protocol import messages as m
from orion_vgpu.protocol.shm import HEADER_SIZE, Arena

MIB = 1 << 20


def _not_held(reply: list[Any], handle: int) -> None:
    kind, message = error_of(reply)
    assert kind == "RuntimeError" and f"{handle}" in message and "not held" in message, reply


def test_a_session_cannot_read_or_free_another_sessions_tensors(
        start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=2)
    a = open_client(server)
    b = open_client(server, vgpu=1)
    secret = torch.arange(1000, dtype=torch.float32) * 3.5
    for h in (1, 2, 3):
        assert a.upload(h, secret + h) == [m.REPLY_OK]
    # B names A's handle numbers every way a command can name a tensor.
    for h in (1, 2, 3):
        _not_held(b.fetch(h), h)
        _not_held(b.op("aten::add.Tensor", [H(h), 1.0], outs=[10]), h)
        b.send([m.CMD_COPY, 10, h])
        _not_held(b.sync(), 10)
        _not_held(b.call("aten::nonzero.default", [H(h)], [11]), h)
    b.send([m.CMD_FREE, [1, 2, 3]])
    assert b.stats()["allocated"] == 0
    # B's own handle 1 is B's: A's stays A's.
    assert b.upload(1, torch.zeros(4)) == [m.REPLY_OK]
    assert torch.equal(b.fetch(1), torch.zeros(4))
    for h in (1, 2, 3):
        assert torch.equal(a.fetch(h), secret + h)
    assert a.stats()["allocated"] == 3 * 4000
    a.close()
    b.close()


def _ok(reply: list[Any], what: str) -> None:
    assert reply == [m.REPLY_OK], (what, reply)


def _oom(reply: list[Any], what: str) -> None:
    kind, message = error_of(reply)
    assert kind == "OutOfMemoryError" and "out of memory" in message, (what, reply)


def _within(c: RawClient, expected: int) -> None:
    stats = c.stats()
    assert stats["allocated"] == expected <= stats["limit"], stats


def test_no_sequence_of_ops_exceeds_the_quota(start_server: Callable[..., Server]) -> None:
    server = start_server(warm_workers=1)
    c = open_client(server, gmem_mib=16)
    rss0 = rss_bytes(c.worker_pid)
    _ok(c.op("aten::ones.default", [[MIB]], outs=[1]), "4 MiB base")          # 4 MiB
    _ok(c.op("aten::slice.Tensor", [H(1), 0, 0, 1000], outs=[2]), "view")      # views: free
    _ok(c.op("aten::t.default", [H(1)], outs=[3]), "view")
    _ok(c.op("aten::expand.default", [H(2), [1 << 30, 1000]], outs=[4]), "expand")
    _within(c, 4 * MIB)
    # resize_ growing a tensor in place, directly or through a view of it.
    _oom(c.op("aten::resize_.default", [H(1), [8 * MIB]], outs=[0]), "resize_")
    _oom(c.op("aten::resize_.default", [H(2), [8 * MIB]], outs=[0]), "resize_ view")
    _within(c, 4 * MIB)
    # out= ops into a small tensor that they would resize.
    _ok(c.op("aten::empty.memory_format", [[4]], outs=[5]), "small")
    _oom(c.op("aten::cat.out", [[H(1)] * 4], {"out": H(5)}), "cat.out")
    _ok(c.op("aten::ones.default", [[8]], outs=[9]), "small base")
    _ok(c.op("aten::slice.Tensor", [H(9), 0, 4, 8], outs=[10]), "view at an offset")
    _oom(c.op("aten::cat.out", [[H(1)] * 4], {"out": H(10)}), "cat.out into a view")
    _oom(c.op("aten::empty.out", [[8 * MIB]], {"out": H(5)}), "empty.out")
    _within(c, 4 * MIB + 16 + 32)
    # The rollback left both the view and its base as they were, inside their storage.
    assert torch.equal(c.fetch(9), torch.ones(8))
    assert c.fetch(10).shape == (4,)
    c.send([m.CMD_FREE, [9, 10]])
    # set_: adopt another tensor's storage with a larger size (grows that storage).
    _oom(c.op("aten::set_.source_Tensor_storage_offset", [H(5), H(1), 0, [8 * MIB], [1]],
              outs=[0]), "set_")
    _ok(c.op("aten::set_.source_Tensor", [H(5), H(1)], outs=[0]), "set_ same size")
    _within(c, 4 * MIB)  # both name one storage now: counted once
    # Views past the storage are refused by torch's own checks.
    kind, msg = error_of(c.op("aten::as_strided.default", [H(1), [8 * MIB], [1]], outs=[6]))
    assert "out of bounds" in msg, msg
    # Writing through an expanded view (many elements, one memory location).
    kind, msg = error_of(c.op("aten::add_.Tensor", [H(4), 1.0], outs=[0]))
    assert "single memory location" in msg, msg
    # Fresh allocations: one too many, and a concatenation of many.
    _ok(c.op("aten::clone.default", [H(1)], outs=[7]), "clone")                # 8 MiB
    _oom(c.op("aten::cat.default", [[H(1)] * 64], outs=[8]), "cat of many")
    _oom(c.op("aten::cat.default", [[H(1), H(7), H(2)]], outs=[8]), "just over")
    _within(c, 8 * MIB)
    c.send([m.CMD_FREE, [7]])
    _within(c, 4 * MIB)
    grew = peak_rss_bytes(c.worker_pid) - rss0
    assert grew < 3 * 16 * MIB + 128 * MIB, f"peak RSS grew {grew >> 20} MiB"
    assert c.alive()
    c.close()


@pytest.fixture
def shm_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Workers inherit the environment: they look for arenas here.
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"orion-shm-{secrets.token_hex(4)}"
    d.mkdir()
    monkeypatch.setenv("ORION_SHM_DIR", str(d))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _hello_with_shm(shm: dict[str, Any]) -> dict[str, Any]:
    return make_hello(make_grant()[0], shm=shm)


def test_a_session_cannot_attach_another_sessions_shared_memory(
        start_server: Callable[..., Server], shm_dir: Path) -> None:
    size = HEADER_SIZE * 16
    theirs = Arena(str(shm_dir / "orion-0123456789abcdef"), size, create=True)
    theirs.write_nonce(secrets.token_hex(16))
    unused = Arena(str(shm_dir / "orionsock0"), size, create=True)  # `orion shm`, no nonce yet
    server = start_server(warm_workers=2)
    cases = {
        "wrong nonce": {"path": theirs.path, "nonce": secrets.token_hex(16), "size": size},
        "empty nonce on an unused file": {"path": unused.path, "nonce": "", "size": size},
        "traversal": {"path": f"{shm_dir}/../{shm_dir.name}/orion-0123456789abcdef",
                      "nonce": theirs.read_nonce(), "size": size},
        "other file": {"path": "/etc/passwd", "nonce": "", "size": size},
    }
    for case, shm in cases.items():
        sock, welcome = open_session(server.tcp, _hello_with_shm(shm))
        # Not refused: the session falls back to the socket, and works.
        assert welcome["kind"] == m.WELCOME and welcome["shm"] is False, (case, welcome)
        sock.settimeout(30)
        assert RawClient(sock, welcome, server).alive(), case
        sock.close()
    assert theirs.consumed() == 0 and unused.consumed() == 0  # nobody wrote to them
    theirs.close()
    unused.close()
