"""Signed grants: the controller's proof that a client may open a session on one vGPU.

A grant is ``base64url(json claims) "." base64url(hmac-sha256)``. Servers verify it
offline with a key derived from the pool token, so the controller stays off the data path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class GrantError(Exception):
    """A grant is malformed, forged or expired."""


def grant_key(pool_token: str) -> bytes:
    """Derive the grant-signing key from the pool token (never use the token itself)."""
    return hmac.new(pool_token.encode(), b"orion-vgpu grant key v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_grant(key: bytes, claims: dict[str, Any]) -> str:
    """Return a grant for ``claims``; claims must hold ``exp`` (unix seconds)."""
    if "exp" not in claims:
        raise ValueError("grant claims need an 'exp' expiry")
    body = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify_grant(key: bytes, grant: str, now: float | None = None) -> dict[str, Any]:
    """Check signature and expiry; return the claims or raise GrantError."""
    if not isinstance(grant, str) or grant.count(".") != 1 or len(grant) > 4096:
        raise GrantError("malformed grant")
    body, sig = grant.split(".")
    try:
        mac = _unb64(sig)
        claims = json.loads(_unb64(body))
    except (ValueError, json.JSONDecodeError) as exc:
        raise GrantError("malformed grant") from exc
    expected = hmac.new(key, body.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise GrantError("grant signature does not match this pool (forged or other pool)")
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), (int, float)):
        raise GrantError("malformed grant claims")
    if (time.time() if now is None else now) > claims["exp"]:
        raise GrantError("grant expired; ask the controller for a new allocation")
    return claims
