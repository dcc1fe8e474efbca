"""`orion shm` / `orion-shm`: DIR/orionsock<N>, 0600, sized; the docker -v directory pitfall."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from orion_vgpu.cli import main, shm_main


def test_creates_default_size_0600(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shm_main(["-d", str(tmp_path)]) == 0
    path = tmp_path / "orionsock0"
    info = path.stat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 128 * 1024 * 1024
    out = capsys.readouterr().out
    assert f"Shared memory {path} (128 MiB) is created." in out
    assert f"docker run -v {path}:{path}:rw" in out


def test_index_and_size(tmp_path: Path) -> None:
    assert main(["shm", "-i", "3", "-s", "4", "-d", str(tmp_path)]) == 0
    assert (tmp_path / "orionsock3").stat().st_size == 4 * 1024 * 1024


def test_existing_same_size_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shm_main(["-s", "2", "-d", str(tmp_path)]) == 0
    assert shm_main(["-s", "2", "-d", str(tmp_path)]) == 0
    assert "already exists (2 MiB); nothing to do." in capsys.readouterr().out


def test_existing_other_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shm_main(["-s", "2", "-d", str(tmp_path)]) == 0
    assert shm_main(["-s", "4", "-d", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already exists with 2 MiB, not 4 MiB" in err
    assert (tmp_path / "orionsock0").stat().st_size == 2 * 1024 * 1024  # untouched


def test_directory_in_the_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "orionsock0").mkdir()  # what `docker run -v` leaves when the file was missing
    assert shm_main(["-d", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    path = tmp_path / "orionsock0"
    assert err.startswith(f"orion-shm: error: {path} is a directory, not shared memory")
    assert f"`rmdir {path}`, run `orion-shm -i 0` again" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["-i", "10000"], "-i 10000: expected an index 0..9999"),
    (["-s", "100000"], "-s 100000: expected a size in MiB 1..65536"),
])  # fmt: skip
def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert shm_main([*args, "-d", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shm_main(["-d", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
