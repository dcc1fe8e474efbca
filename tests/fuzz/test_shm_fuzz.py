"""Shared-memory names from a hello: no traversal, no other files, no symlinks, owner-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.protocol.shm import HEADER_SIZE, NAME_RE, Arena, ShmError, shm_dir, validate_path

pieces = st.sampled_from(["..", ".", "/", "//", "orion-", "orionsock", "0123abcd", "7", "\x00",
                          "dev", "shm", "etc", "passwd", "orion-0123456789abcdef", "\n", " "])
paths = st.one_of(
    st.text(max_size=60),
    st.lists(pieces, max_size=8).map("".join),
    st.lists(pieces, max_size=6).map(lambda p: "/dev/shm/" + "".join(p)),
)


@settings(max_examples=1000, deadline=None)
@given(path=paths)
def test_only_plain_arena_names_in_the_shm_dir_pass(path: str) -> None:
    os.environ.pop("ORION_SHM_DIR", None)
    try:
        got = validate_path(path)
    except ShmError:
        return
    assert got == path
    assert os.path.dirname(path) == shm_dir() == "/dev/shm"
    assert NAME_RE.match(os.path.basename(path))
    assert ".." not in path and "\x00" not in path


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORION_SHM_DIR", str(tmp_path))
    return tmp_path


def test_symlinked_arena_is_refused(shm: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A client cannot point the worker at another file through a symlink of a valid name."""
    target = tmp_path_factory.mktemp("victim") / "secret"
    target.write_bytes(b"s" * (HEADER_SIZE * 8))
    link = shm / "orion-0123456789abcdef"
    link.symlink_to(target)
    with pytest.raises(OSError):
        Arena(str(link))
    assert target.read_bytes() == b"s" * (HEADER_SIZE * 8)


def test_arena_is_owner_only_whatever_the_umask(shm: Path) -> None:
    old = os.umask(0)
    try:
        arena = Arena(str(shm / "orion-00000000deadbeef"), HEADER_SIZE * 8, create=True)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(arena.path).st_mode)
    arena.close()
    assert mode == 0o600, oct(mode)


def test_existing_file_is_not_taken_over_by_create(shm: Path) -> None:
    path = shm / "orion-00000000cafecafe"
    path.write_bytes(b"x" * (HEADER_SIZE * 8))
    with pytest.raises(FileExistsError):
        Arena(str(path), HEADER_SIZE * 8, create=True)


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(-(2**64), 2**64), nbytes=st.integers(0, 2**40))
def test_regions_stay_inside_the_mapping(offset: int, nbytes: int,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ring positions come from the client: any value either maps inside or is refused."""
    d = tmp_path_factory.mktemp("shm")
    os.environ["ORION_SHM_DIR"] = str(d)
    try:
        arena = Arena(str(d / "orion-0123456789abcdef"), HEADER_SIZE * 8, create=True)
        for fn in (arena.region, arena.ring_region):
            try:
                view = fn(offset, nbytes)
            except ShmError:
                continue
            assert view.numel() == nbytes <= arena.size
        arena.close()
    finally:
        del os.environ["ORION_SHM_DIR"]
