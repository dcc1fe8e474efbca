"""Tables for people: users, their API tokens, and dashboard sessions.

Secrets are never stored: passwords as scrypt hashes, tokens and session ids as SHA-256
digests. Shares the allocations store's engine, so one SQLite file holds everything.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    String,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from orion_vgpu.controller.store import Base


class UserRow(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    max_vgpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_gmem_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)


class TokenRow(Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(128), default="")
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SessionRow(Base):
    __tablename__ = "web_sessions"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    ip: Mapped[str] = mapped_column(String(64), default="")


USERS = UserRow.__table__
TOKENS = TokenRow.__table__
SESSIONS = SessionRow.__table__


class AccountStore:
    """One short transaction per call, like the allocations store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        Base.metadata.create_all(engine, tables=[USERS, TOKENS, SESSIONS])

    def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        with self.engine.connect() as conn:
            users = [dict(r._mapping) for r in conn.execute(select(USERS))]
            tokens = [dict(r._mapping) for r in conn.execute(select(TOKENS))]
            sessions = [dict(r._mapping) for r in conn.execute(select(SESSIONS))]
        return users, tokens, sessions

    def insert_user(self, row: dict[str, Any]) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(insert(USERS).values(**row))
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def update_user(self, user_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(USERS).where(USERS.c.id == user_id).values(**values))

    def delete_user(self, user_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(TOKENS).where(TOKENS.c.user_id == user_id))
            conn.execute(delete(SESSIONS).where(SESSIONS.c.user_id == user_id))
            conn.execute(delete(USERS).where(USERS.c.id == user_id))

    def insert_token(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(TOKENS).values(**row))

    def delete_token(self, token_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(TOKENS).where(TOKENS.c.id == token_id))

    def touch_tokens(self, used: dict[str, float]) -> None:
        with self.engine.begin() as conn:
            for token_id, at in used.items():
                conn.execute(update(TOKENS).where(TOKENS.c.id == token_id).values(last_used_at=at))

    def insert_session(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(SESSIONS).values(**row))

    def delete_sessions(self, digests: list[str]) -> None:
        if digests:
            with self.engine.begin() as conn:
                conn.execute(delete(SESSIONS).where(SESSIONS.c.digest.in_(digests)))
