"""Dashboard form posts: parse ``application/x-www-form-urlencoded`` (no extra
dependency) and check the session and its CSRF token before a handler runs."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from starlette.requests import Request

from orion_vgpu.controller.accounts import Principal

MAX_FORM_BYTES = 64 * 1024


class PageError(Exception):
    """Answered with the HTML error page (status and one sentence for a person)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise PageError(415, "Send this form from the dashboard (URL-encoded form data).")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PageError(413, "Form too large.")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in fields.items()}


def require_session(who: Principal) -> None:
    """Checked before the body is read: strangers learn nothing about the form."""
    if who.via != "session" or who.session is None:
        raise PageError(401, "Sign in first: this form needs a dashboard session.")


def check_csrf(who: Principal, form: dict[str, str]) -> None:
    require_session(who)
    assert who.session is not None
    if not hmac.compare_digest(form.get("csrf", ""), who.session.csrf):
        raise PageError(403, "This form has expired or did not come from the dashboard; "
                             "reload the page and try again.")  # fmt: skip


def optional_int(form: dict[str, str], key: str) -> int | None:
    """Blank means "no limit"; anything else must be a whole number >= 0."""
    text = form.get(key, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise PageError(400, f"{key} must be a whole number or blank (no limit).") from None
    if not 0 <= value <= 2**31 - 1:
        raise PageError(400, f"{key} must be 0 .. 2147483647, or blank (no limit).")
    return value


def safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect a login to another origin."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
