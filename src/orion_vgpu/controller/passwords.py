"""Password hashes (scrypt, stdlib) and API/session secrets (random, stored as SHA-256).

Passwords are low-entropy, so they get a slow salted KDF. Tokens and session ids are
256-bit random strings: a fast digest is enough and lets every request look one up in
a dict without a KDF on the hot path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# 16 MiB of memory and ~50 ms per hash: slow for a guesser, fine for a rate-limited login.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_DKLEN = 32
MIN_PASSWORD_LEN = 8
TOKEN_PREFIX = "orion_"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash``: parameters travel with the hash so they can grow later."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=_DKLEN
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; False for a missing or malformed hash."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        got = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(expected), maxmem=256 * 1024 * 1024,
        )  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def new_password() -> str:
    """A password to show once: 16 URL-safe characters (~96 bits)."""
    return secrets.token_urlsafe(12)


def check_password_policy(password: str) -> str | None:
    """Why this password is refused, or None."""
    if len(password) < MIN_PASSWORD_LEN:
        return f"password must have at least {MIN_PASSWORD_LEN} characters"
    if len(password) > 1024:
        return "password must have at most 1024 characters"
    return None


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_token(token_id: str) -> str:
    """``orion_<id>_<secret>``: the id lets people tell tokens apart without the secret."""
    return f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def new_token_id() -> str:
    return secrets.token_hex(4)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
