"""Controller settings, default paths and the pool token."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from orion_vgpu.controller.scheduler import POLICIES

log = logging.getLogger("orion.controller")

TOKEN_FILE = "pool_token"
TOKEN_ENV = "ORION_POOL_TOKEN"


class SettingsError(Exception):
    """A setting the operator gave is unusable (message is one line for the user)."""


AUTH_MODES = ("required", "open")
ADMIN_PASSWORD_ENV = "ORION_ADMIN_PASSWORD"


@dataclass(frozen=True)
class ControllerSettings:
    data_dir: Path
    db_url: str | None = None  # None: SQLite <data_dir>/controller.db
    pool_token: str | None = None  # None: env ORION_POOL_TOKEN, else <data_dir>/pool_token
    lease_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    policy: str = "binpack"
    # "required": allocations need a user token; "open": without one they are recorded
    # as the OS user the client reports (all-in-one pools, tests).
    auth: str = "required"
    # Pool summary, pages and /metrics readable without logging in; None: only when open.
    public_read: bool | None = None
    # None: env ORION_ADMIN_PASSWORD, else generated at first start and printed once.
    admin_password: str | None = field(default=None, repr=False)
    session_ttl_s: float = 12 * 3600.0
    login_max_failures: int = 5  # per user name and window; 4x that per client address
    login_window_s: float = 300.0
    sample_interval_s: float = 60.0  # usage history for the dashboard charts
    history_keep_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise SettingsError(f"unknown auth mode {self.auth!r}; use required or open")
        for name in ("session_ttl_s", "login_window_s", "sample_interval_s", "history_keep_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if self.login_max_failures < 1:
            raise SettingsError("login_max_failures must be at least 1")
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
    def reads_open(self) -> bool:
        return self.public_read if self.public_read is not None else self.auth == "open"

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


def resolve_admin_password(given: str | None) -> tuple[str | None, str]:
    """(password or None, where it came from) for the first/forced admin password."""
    if given:
        return given, "--admin-password"
    env = os.environ.get(ADMIN_PASSWORD_ENV)
    if env:
        return env, ADMIN_PASSWORD_ENV
    return None, "generated"


def _read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("pool token file %s is readable by others; chmod 600 it", path)
    token = path.read_text().strip()
    if not token:
        raise SettingsError(f"pool token file {path} is empty; delete it to make a new one")
    return token
