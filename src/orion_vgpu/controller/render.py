"""Jinja2 environment of the dashboard: templates, filters, and the page response.

A page is rendered whole on first load; its self-refresh asks for the same URL with
``X-Orion-Partial: 1`` and gets only the ``live`` block, rendered from the same data.
"""

from __future__ import annotations

import datetime as dt
import functools
import zlib
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse

from orion_vgpu import __version__
from orion_vgpu.controller import charts

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PARTIAL_HEADER = "x-orion-partial"
USER_COLOURS = 10

# Everything from our own origin; style attributes carry bar widths, nothing else inline.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; style-src-attr 'unsafe-inline'; "
       "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")  # fmt: skip
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Vary": "Cookie, X-Orion-Partial",
}


def mib(value: float | None) -> str:
    v = float(value or 0)
    if abs(v) >= 1024:
        return f"{v / 1024:.1f} GiB"
    return f"{v:.0f} MiB"


def human_bytes(value: float | None) -> str:
    v = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def pct(value: float | None, digits: int = 0) -> str:
    return f"{float(value or 0):.{digits}f}%"


def share(part: float | None, whole: float | None) -> float:
    """Percentage of part in whole, 0..100 (0 when whole is 0)."""
    return 100.0 * float(part or 0) / float(whole) if whole else 0.0


def timestamp(value: float | None) -> Markup:
    """UTC text the browser's script turns into local time."""
    if value is None:
        return Markup("–")
    t = dt.datetime.fromtimestamp(float(value), dt.UTC)
    return Markup(
        f'<time class="local" datetime="{t.isoformat(timespec="seconds")}">'
        f"{t.strftime('%Y-%m-%d %H:%M:%S')} UTC</time>"
    )


def duration(seconds: float | None) -> str:
    s = max(0, int(seconds or 0))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


@functools.lru_cache(maxsize=4096)
def user_class(name: str | None) -> str:
    """A stable colour class per user name (same colour on every page and chart)."""
    return f"u{zlib.crc32((name or '').encode()) % USER_COLOURS}"


def short(ident: str | None) -> str:
    return (ident or "")[:8]


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"], default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(mib=mib, bytes=human_bytes, pct=pct, ts=timestamp, dur=duration,
                       ucls=user_class, short=short)  # fmt: skip
    env.globals.update(share=share, charts=charts, version=__version__, ucls=user_class)
    return env


ENV = _environment()


def is_partial(request: Request) -> bool:
    return request.headers.get(PARTIAL_HEADER) == "1"


def render_page(
    request: Request, template: str, context: dict[str, Any], status: int = 200
) -> HTMLResponse:
    tmpl = ENV.get_template(template)
    if is_partial(request) and "live" in tmpl.blocks:
        ctx = tmpl.new_context({**context, "partial": True})
        html = "".join(tmpl.blocks["live"](ctx))
    else:
        html = tmpl.render(**context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
