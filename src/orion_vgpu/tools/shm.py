"""`orion shm [-i N] [-s MiB] [-d DIR]` (alias `orion-shm`): the shared-memory file a
container mounts (`docker run -v /dev/shm/orionsock0:/dev/shm/orionsock0:rw`, seed 000).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from orion_vgpu.config import UserError

DEFAULT_SIZE_MIB = 128
MAX_INDEX = 9999  # the data plane accepts orionsock0 .. orionsock9999


def shm_path(directory: Path, index: int) -> Path:
    return directory / f"orionsock{index}"


def create_shm(index: int = 0, size_mib: int = DEFAULT_SIZE_MIB, directory: Path = Path("/dev/shm")) -> Path:
    """Create `DIR/orionsock<index>` (0600, `size_mib` MiB); UserError with the fix otherwise."""
    if not 0 <= index <= MAX_INDEX:
        raise UserError(f"-i {index}: expected an index 0..{MAX_INDEX}")
    if not 1 <= size_mib <= 64 * 1024:
        raise UserError(f"-s {size_mib}: expected a size in MiB 1..65536")
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass -d with the tmpfs to use (default /dev/shm)")
    path = shm_path(directory, index)
    size = size_mib * 1024 * 1024
    try:
        info = path.lstat()
    except FileNotFoundError:
        return _create(path, size)
    if stat.S_ISDIR(info.st_mode):
        raise UserError(
            f"{path} is a directory, not shared memory: `docker run -v {path}:{path}` made it "
            f"because the file did not exist yet. Fix: stop the containers using it, "
            f"`rmdir {path}`, run `orion-shm -i {index}` again, then start the container"
        )
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} exists and is not a regular file; remove it and run `orion-shm -i {index}` again")
    if info.st_size != size:
        raise UserError(
            f"{path} already exists with {info.st_size // (1024 * 1024)} MiB, not {size_mib} MiB; "
            f"if no container uses it, remove it (then restart Orion Server) and run again"
        )
    return path


def _create(path: Path, size: int) -> Path:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask says
        os.ftruncate(fd, size)
    except OSError as exc:
        os.unlink(path)
        raise UserError(f"cannot size {path} to {size // (1024 * 1024)} MiB: {exc.strerror}") from None
    finally:
        os.close(fd)
    return path


def run(index: int, size_mib: int, directory: Path) -> int:
    existed = shm_path(directory, index).exists()
    path = create_shm(index, size_mib, directory)
    size = path.stat().st_size // (1024 * 1024)
    if existed:
        print(f"Shared memory {path} already exists ({size} MiB); nothing to do.")
    else:
        print(f"Shared memory {path} ({size} MiB) is created.")
    print(f"Mount it into the container: docker run -v {path}:{path}:rw ...")
    return 0
