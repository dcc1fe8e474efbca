"""Controller settings, default paths and the pool token."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from orion_vgpu.controller.scheduler import POLICIES

log = logging.getLogger("orion.controller")

TOKEN_FILE = "pool_token"
TOKEN_ENV = "ORION_POOL_TOKEN"


class SettingsError(Exception):
    """A setting the operator gave is unusable (message is one line for the user)."""


@dataclass(frozen=True)
class ControllerSettings:
    data_dir: Path
    db_url: str | None = None  # None: SQLite <data_dir>/controller.db
    pool_token: str | None = None  # None: env ORION_POOL_TOKEN, else <data_dir>/pool_token
    lease_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    policy: str = "binpack"

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise SettingsError(f"lease must be positive seconds, got {self.lease_s}")
        if self.heartbeat_interval_s <= 0:
            raise SettingsError(
                f"heartbeat interval must be positive seconds, got {self.heartbeat_interval_s}"
            )
        if self.policy not in POLICIES:
            raise SettingsError(f"unknown policy {self.policy!r}; use binpack or spread")

    @property
    def heartbeat_timeout_s(self) -> float:
        # Three missed heartbeats: one lost packet or a slow GC pause is not a dead node.
        return 3 * self.heartbeat_interval_s

    @property
    def reap_interval_s(self) -> float:
        # Often enough that short leases/intervals (tests) lapse promptly, never a busy loop.
        return max(0.05, min(0.5, self.lease_s / 4, self.heartbeat_interval_s / 2))


def orion_home() -> Path:
    """``$ORION_HOME`` or ``~/.orion``: per-user state when not root."""
    env = os.environ.get("ORION_HOME")
    return Path(env).expanduser() if env else Path.home() / ".orion"


def default_data_dir() -> Path:
    """``/var/lib/orion/controller`` when we may write there, else ``<orion home>/controller``.

    An explicit ORION_HOME wins, so tests and per-user pools never touch /var/lib.
    """
    if os.environ.get("ORION_HOME"):
        return orion_home() / "controller"
    system = Path("/var/lib/orion/controller")
    if _writable(system):
        return system
    return orion_home() / "controller"


def _writable(path: Path) -> bool:
    for p in (path, *path.parents):
        if p.exists():
            return os.access(p, os.W_OK)
    return False


def prepare_data_dir(data_dir: Path) -> Path:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create data dir {data_dir}: {exc.strerror}") from exc
    if not os.access(data_dir, os.W_OK):
        raise SettingsError(f"data dir {data_dir} is not writable")
    return data_dir


def resolve_pool_token(data_dir: Path, given: str | None) -> tuple[str, str]:
    """Return (token, where it came from). Creates ``<data_dir>/pool_token`` (0600) once."""
    if given:
        return given, "--pool-token"
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env, TOKEN_ENV
    path = data_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path), str(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, str(path)


def _read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("pool token file %s is readable by others; chmod 600 it", path)
    token = path.read_text().strip()
    if not token:
        raise SettingsError(f"pool token file {path} is empty; delete it to make a new one")
    return token
