"""Users, roles, API tokens, dashboard sessions and per-user limits.

Everything lives in memory (looked up on every request) and is written through to the
store. Runs on the event loop like the rest of the controller state; the only slow step,
scrypt, is pure and callers run it in a thread (``check_password``).
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from orion_vgpu.controller.accounts_store import AccountStore
from orion_vgpu.controller.errors import ApiError
from orion_vgpu.controller.passwords import (
    check_password_policy,
    digest,
    hash_password,
    new_password,
    new_secret,
    new_token,
    new_token_id,
    verify_password,
)
from orion_vgpu.controller.scheduler import Limits

log = logging.getLogger("orion.controller")

ROLES = ("admin", "user")
ADMIN = "admin"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_TOUCH_S = 60.0  # persist "last used" at most this often per token


@dataclass(slots=True)
class User:
    id: int
    name: str
    role: str
    password_hash: str | None
    created_at: float
    max_vgpus: int | None = None
    max_gmem_mib: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def limits(self) -> Limits | None:
        if self.max_vgpus is None and self.max_gmem_mib is None:
            return None
        return Limits(self.max_vgpus, self.max_gmem_mib)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "created_at": self.created_at,
            "max_vgpus": self.max_vgpus, "max_gmem_mib": self.max_gmem_mib,
            "has_password": self.password_hash is not None,
        }  # fmt: skip


@dataclass(slots=True)
class ApiToken:
    id: str
    user_id: int
    label: str
    digest: str
    created_at: float
    last_used_at: float | None = None
    persisted_used_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "label": self.label, "created_at": self.created_at,
            "last_used_at": self.last_used_at, "prefix": f"orion_{self.id}_…",
        }  # fmt: skip


@dataclass(slots=True)
class WebSession:
    digest: str
    user_id: int
    csrf: str
    created_at: float
    expires_at: float
    ip: str = ""
    flash: list[dict[str, str]] = field(default_factory=list)  # messages, memory only


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (by token or session), a node (pool token) or nobody."""

    kind: Literal["user", "node", "anonymous"]
    name: str
    via: Literal["token", "session", "pool_token", "password", "none"]
    user: User | None = None
    session: WebSession | None = None

    @property
    def is_admin(self) -> bool:
        return self.user is not None and self.user.is_admin

    @property
    def known(self) -> bool:
        return self.kind != "anonymous"


ANONYMOUS = Principal("anonymous", "anonymous", "none")


class Accounts:
    def __init__(
        self, store: AccountStore, session_ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.session_ttl_s = session_ttl_s
        self.clock = clock
        self.by_name: dict[str, User] = {}
        self.by_id: dict[int, User] = {}
        self.tokens: dict[str, ApiToken] = {}  # digest -> token
        self.sessions: dict[str, WebSession] = {}  # digest -> session
        self._load()

    def _load(self) -> None:
        users, tokens, sessions = self.store.load()
        for row in users:
            self._remember(User(**row))
        for row in tokens:
            t = ApiToken(**row)
            self.tokens[t.digest] = t
        now = self.clock()
        stale = []
        for row in sessions:
            s = WebSession(**row)
            if s.expires_at > now and s.user_id in self.by_id:
                self.sessions[s.digest] = s
            else:
                stale.append(s.digest)
        self.store.delete_sessions(stale)

    def _remember(self, user: User) -> None:
        self.by_name[user.name] = user
        self.by_id[user.id] = user

    # ----- first start -------------------------------------------------------------------

    def bootstrap_admin(self, password: str | None) -> str | None:
        """Make sure an admin exists. Returns a generated password to show once, or None.

        A configured password (flag/env) is applied on every start, so an operator who
        lost the printed one sets ORION_ADMIN_PASSWORD and restarts.
        """
        admin = self.by_name.get(ADMIN)
        if admin is None and any(u.is_admin for u in self.by_id.values()):
            return None  # the first admin was renamed or deleted, another one exists
        if password is not None:
            reason = check_password_policy(password)
            if reason:
                raise ApiError(400, "bad_request", f"admin password refused: {reason}")
        if admin is None:
            shown = password or new_password()
            self._insert_user(ADMIN, ADMIN, hash_password(shown))
            log.info("created user %s (role admin) on first start", ADMIN)
            return None if password else shown
        if password is not None and not verify_password(password, admin.password_hash):
            admin.password_hash = hash_password(password)
            self.store.update_user(admin.id, password_hash=admin.password_hash)
            self._drop_sessions(admin.id)
            log.info("password of user %s set from configuration", ADMIN)
        return None

    # ----- users -------------------------------------------------------------------------

    def user(self, name: str) -> User:
        user = self.by_name.get(name)
        if user is None:
            raise ApiError(404, "not_found", f"no user {name!r}")
        return user

    def users(self) -> list[User]:
        return sorted(self.by_id.values(), key=lambda u: u.name)

    def add_user(self, name: str, role: str, password: str | None) -> tuple[User, str | None]:
        """Create a user; without a password one is generated and returned (show once)."""
        if not NAME_RE.match(name):
            raise ApiError(
                400, "bad_request",
                "user name must be 1-64 characters: letters, digits, . _ @ - (not first)",
            )  # fmt: skip
        if role not in ROLES:
            raise ApiError(400, "bad_request", f"role must be one of {', '.join(ROLES)}")
        if name in self.by_name or name == "anonymous":
            raise ApiError(409, "conflict", f"user {name!r} already exists")
        shown = None
        if password is None:
            password = shown = new_password()
        self._policy(password)
        user = self._insert_user(name, role, hash_password(password))
        log.info("created user %s (role %s)", name, role)
        return user, shown

    def _insert_user(self, name: str, role: str, password_hash: str | None) -> User:
        row = {"name": name, "role": role, "password_hash": password_hash,
               "created_at": self.clock(), "max_vgpus": None, "max_gmem_mib": None}  # fmt: skip
        user = User(id=self.store.insert_user(row), **row)
        self._remember(user)
        return user

    def delete_user(self, name: str, actor: Principal) -> None:
        user = self.user(name)
        if actor.user is not None and actor.user.id == user.id:
            raise ApiError(409, "conflict", "you cannot delete yourself")
        self._keep_an_admin(user, "delete")
        self.store.delete_user(user.id)
        del self.by_name[user.name], self.by_id[user.id]
        for d in [d for d, t in self.tokens.items() if t.user_id == user.id]:
            del self.tokens[d]
        for d in [d for d, s in self.sessions.items() if s.user_id == user.id]:
            del self.sessions[d]
        log.info("deleted user %s (by %s)", name, actor.name)

    def set_role(self, name: str, role: str, actor: Principal) -> User:
        user = self.user(name)
        if role not in ROLES:
            raise ApiError(400, "bad_request", f"role must be one of {', '.join(ROLES)}")
        if role != ADMIN:
            self._keep_an_admin(user, "demote")
        user.role = role
        self.store.update_user(user.id, role=role)
        log.info("user %s now has role %s (by %s)", name, role, actor.name)
        return user

    def set_limits(
        self, name: str, max_vgpus: int | None, max_gmem_mib: int | None, actor: Principal
    ) -> User:
        user = self.user(name)
        for what, value in (("max_vgpus", max_vgpus), ("max_gmem_mib", max_gmem_mib)):
            if value is not None and not 0 <= value <= 2**31 - 1:
                raise ApiError(400, "bad_request", f"{what} must be 0 .. 2147483647 (or null: no limit)")
        user.max_vgpus, user.max_gmem_mib = max_vgpus, max_gmem_mib
        self.store.update_user(user.id, max_vgpus=max_vgpus, max_gmem_mib=max_gmem_mib)
        log.info("limits of user %s: max_vgpus=%s max_gmem_mib=%s (by %s)",
                 name, _cap(max_vgpus), _cap(max_gmem_mib), actor.name)  # fmt: skip
        return user

    def set_password(self, name: str, password: str | None, actor: Principal) -> str | None:
        """Set (or generate, returned once) a user's password; ends their sessions."""
        user = self.user(name)
        shown = None
        if password is None:
            password = shown = new_password()
        self._policy(password)
        user.password_hash = hash_password(password)
        self.store.update_user(user.id, password_hash=user.password_hash)
        self._drop_sessions(user.id, keep=actor.session)
        log.info("password of user %s changed (by %s)", name, actor.name)
        return shown

    def _keep_an_admin(self, user: User, what: str) -> None:
        if user.is_admin and sum(1 for u in self.by_id.values() if u.is_admin) == 1:
            raise ApiError(409, "conflict", f"cannot {what} the last admin")

    @staticmethod
    def _policy(password: str) -> None:
        reason = check_password_policy(password)
        if reason:
            raise ApiError(400, "bad_request", reason)

    # ----- tokens ------------------------------------------------------------------------

    def tokens_of(self, user: User) -> list[ApiToken]:
        mine = [t for t in self.tokens.values() if t.user_id == user.id]
        return sorted(mine, key=lambda t: t.created_at)

    def create_token(self, name: str, label: str, actor: Principal) -> tuple[ApiToken, str]:
        """A new token for ``name``; the secret is returned once and never stored."""
        user = self.user(name)
        token_id = new_token_id()
        while any(t.id == token_id for t in self.tokens.values()):
            token_id = new_token_id()
        secret = new_token(token_id)
        t = ApiToken(token_id, user.id, label[:128], digest(secret), self.clock())
        self.store.insert_token({"id": t.id, "user_id": t.user_id, "label": t.label,
                                 "digest": t.digest, "created_at": t.created_at,
                                 "last_used_at": None})  # fmt: skip
        self.tokens[t.digest] = t
        log.info("token %s (%s) created for user %s (by %s)", t.id, t.label or "no label",
                 name, actor.name)  # fmt: skip
        return t, secret

    def revoke_token(self, name: str, token_id: str, actor: Principal) -> None:
        user = self.user(name)
        found = [d for d, t in self.tokens.items() if t.id == token_id and t.user_id == user.id]
        if not found:
            raise ApiError(404, "not_found", f"user {name} has no token {token_id!r}")
        self.store.delete_token(token_id)
        del self.tokens[found[0]]
        log.info("token %s of user %s revoked (by %s)", token_id, name, actor.name)

    def by_token(self, secret: str) -> User | None:
        t = self.tokens.get(digest(secret))
        if t is None:
            return None
        now = self.clock()
        t.last_used_at = now
        if now - t.persisted_used_at >= TOKEN_TOUCH_S:
            t.persisted_used_at = now
            self.store.touch_tokens({t.id: now})
        return self.by_id.get(t.user_id)

    # ----- passwords and sessions --------------------------------------------------------

    def password_hash_of(self, name: str) -> str | None:
        user = self.by_name.get(name)
        return user.password_hash if user else None

    def open_session(self, user: User, ip: str) -> tuple[str, WebSession]:
        """Returns (cookie value, session); only the cookie's digest is stored."""
        cookie = new_secret()
        now = self.clock()
        s = WebSession(digest(cookie), user.id, secrets.token_urlsafe(24), now,
                       now + self.session_ttl_s, ip[:64])  # fmt: skip
        self.store.insert_session({"digest": s.digest, "user_id": s.user_id, "csrf": s.csrf,
                                   "created_at": s.created_at, "expires_at": s.expires_at,
                                   "ip": s.ip})  # fmt: skip
        self.sessions[s.digest] = s
        return cookie, s

    def session(self, cookie: str) -> tuple[WebSession, User] | None:
        s = self.sessions.get(digest(cookie))
        if s is None:
            return None
        user = self.by_id.get(s.user_id)
        if user is None or s.expires_at <= self.clock():
            self.close_session(s)
            return None
        return s, user

    def close_session(self, s: WebSession) -> None:
        self.sessions.pop(s.digest, None)
        self.store.delete_sessions([s.digest])

    def _drop_sessions(self, user_id: int, keep: WebSession | None = None) -> None:
        gone = [d for d, s in self.sessions.items() if s.user_id == user_id and s is not keep]
        for d in gone:
            del self.sessions[d]
        self.store.delete_sessions(gone)

    def expire_sessions(self) -> None:
        now = self.clock()
        gone = [d for d, s in self.sessions.items() if s.expires_at <= now]
        for d in gone:
            del self.sessions[d]
        self.store.delete_sessions(gone)


def check_password(password: str, stored: str | None) -> bool:
    """scrypt verification (slow: run it in a thread). A dummy hash keeps the time the
    same for unknown users, so timing does not tell which names exist."""
    return verify_password(password, stored or _dummy_hash()) and stored is not None


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def _cap(value: int | None) -> str:
    return "none" if value is None else str(value)
