"""Find running `oriond` processes through /proc: who runs them, how, with which config."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from orion_vgpu.config import server_config_path


@dataclass(frozen=True)
class Process:
    pid: int
    user: str
    argv: list[str]
    config: Path | None  # the server.conf it reads (None: defaults)

    @property
    def command_line(self) -> str:
        return " ".join(self.argv)


def _program(argv: list[str]) -> tuple[str, list[str]]:
    """(program or `-m` module, its arguments), seeing through `python [opts] script`."""
    if not argv:
        return "", []
    if not os.path.basename(argv[0]).startswith("python"):
        return os.path.basename(argv[0]), argv[1:]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2 :]
        if arg in ("-X", "-W", "-c"):
            i += 2
            continue
        if not arg.startswith("-"):
            return os.path.basename(arg), argv[i + 1 :]
        i += 1
    return "", []


def is_oriond(argv: list[str]) -> bool:
    program, rest = _program(argv)
    if program in ("oriond", "orion_vgpu.server", "orion_vgpu.server.__main__"):
        return True
    return program in ("orion", "orion_vgpu.cli") and bool(rest) and rest[0] == "server"


def _read_argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _user(pid: int) -> str:
    uid = Path(f"/proc/{pid}").stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _config_of(pid: int, argv: list[str]) -> Path | None:
    _, rest = _program(argv)
    for i, arg in enumerate(rest):
        if arg == "--config" and i + 1 < len(rest):
            given = rest[i + 1]
        elif arg.startswith("--config="):
            given = arg.split("=", 1)[1]
        else:
            continue
        path = Path(given).expanduser()
        if not path.is_absolute():
            try:
                path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
            except OSError:
                pass
        return path
    return server_config_path(_environ(pid) or os.environ)


def find_oriond() -> list[Process]:
    """Every running oriond, oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            argv = _read_argv(pid)
            if is_oriond(argv):
                found.append(Process(pid, _user(pid), argv, _config_of(pid, argv)))
        except OSError:
            continue  # exited while we looked, or not ours to read
    return sorted(found, key=lambda p: p.pid)


def pick(processes: list[Process], config: Path | None) -> Process | None:
    """The oriond reading `config`; without one, the one reading the default config
    file, else the oldest."""
    wanted = config or server_config_path()
    if wanted is not None:
        for process in processes:
            if process.config is not None and process.config.resolve() == wanted.resolve():
                return process
    if config is not None:
        return None
    return processes[0] if processes else None
