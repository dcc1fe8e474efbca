"""Small SVG charts drawn on the server (no JavaScript, no third-party code).

Each chart is a fixed 640x170 viewBox that scales with the page; colours come from
CSS classes (``s0``…``s7`` for series, ``u0``…``u9`` for users), so the stylesheet owns
the palette and the markup stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

W, H = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 66, 8, 10, 22
PLOT_W, PLOT_H = W - LEFT - RIGHT, H - TOP - BOTTOM
MIN_SPAN_S = 60.0


@dataclass(frozen=True)
class Series:
    label: str
    css: str  # class of the line/area
    values: Sequence[float]


def _x(t: float, t0: float, t1: float) -> float:
    return LEFT + (PLOT_W * (t - t0) / (t1 - t0) if t1 > t0 else PLOT_W)


def _y(v: float, top: float) -> float:
    return TOP + PLOT_H - (PLOT_H * v / top if top > 0 else 0)


def _nice(top: float) -> float:
    """A round axis maximum at or above ``top``."""
    if top <= 0:
        return 1.0
    scale = 10 ** len(str(int(top))) / 10
    for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * scale >= top:
            return step * scale
    return top


def _ago(seconds: float) -> str:
    if seconds >= 3600:
        return f"-{seconds / 3600:.2g}h"
    if seconds >= 60:
        return f"-{seconds / 60:.2g}m"
    return f"-{seconds:.0f}s"


def _window(times: Sequence[float], hours: int) -> tuple[float, float]:
    """The x range: the last ``hours``, or less while the history is younger than that
    (a new pool's first minutes fill the chart instead of a sliver at its right edge)."""
    t1 = times[-1]
    return max(t1 - hours * 3600, min(times[0], t1 - MIN_SPAN_S)), t1


def _frame(t0: float, t1: float, top: float, fmt: Callable[[float], str]) -> list[str]:
    out = []
    for frac in (0.0, 0.5, 1.0):
        y = _y(top * frac, top)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="ylab" x="{LEFT - 6}" y="{y + 4:.1f}">{escape(fmt(top * frac))}</text>')
    span = t1 - t0
    for frac, label in ((0.0, _ago(span)), (0.5, _ago(span / 2)), (1.0, "now")):
        x = LEFT + PLOT_W * frac
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        out.append(f'<text class="xlab" x="{x:.1f}" y="{H - 6}" text-anchor="{anchor}">{label}</text>')
    return out


def _svg(title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def line_chart(
    title: str,
    times: Sequence[float],
    series: Sequence[Series],
    hours: int,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    top: float | None = None,
) -> Markup:
    """Lines over the last ``hours`` (see ``_window``); the last sample is now."""
    if not times:
        return _svg(title, ['<text class="empty" x="320" y="85">no data yet</text>'])
    t0, t1 = _window(times, hours)
    peak = max((max(s.values, default=0) for s in series), default=0)
    top = top if top is not None else _nice(peak)
    body = _frame(t0, t1, top, fmt)
    for s in series:
        pts = " ".join(
            f"{_x(t, t0, t1):.1f},{_y(v, top):.1f}" for t, v in zip(times, s.values, strict=True)
        )
        if len(times) == 1:
            x, y = _x(times[0], t0, t1), _y(s.values[0], top)
            body.append(f'<circle class="{s.css}" cx="{x:.1f}" cy="{y:.1f}" r="3"/>')
        else:
            body.append(f'<polyline class="line {s.css}" points="{pts}"/>')
    return _svg(title, body)


def stacked_chart(
    title: str,
    times: Sequence[float],
    layers: Sequence[Series],
    hours: int,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    top: float | None = None,
) -> Markup:
    """Stacked areas (e.g. GPU memory per user); the stack's top is the pool total."""
    if not times or not layers:
        return _svg(title, ['<text class="empty" x="320" y="85">nothing allocated yet</text>'])
    t0, t1 = _window(times, hours)
    sums = [0.0] * len(times)
    for layer in layers:
        sums = [a + b for a, b in zip(sums, layer.values, strict=True)]
    top = top if top is not None else _nice(max(sums, default=0))
    body = _frame(t0, t1, top, fmt)
    base = [0.0] * len(times)
    xs = [_x(t, t0, t1) for t in times]
    if len(xs) == 1:  # one sample: draw it as a thin bar at "now"
        xs = [xs[0] - 4, xs[0]]
        base = [0.0, 0.0]
        layers = [Series(s.label, s.css, [s.values[0]] * 2) for s in layers]
    for layer in layers:
        upper = [b + v for b, v in zip(base, layer.values, strict=True)]
        pts = [f"{x:.1f},{_y(v, top):.1f}" for x, v in zip(xs, upper, strict=True)]
        pts += [f"{x:.1f},{_y(v, top):.1f}" for x, v in reversed(list(zip(xs, base, strict=True)))]
        points = " ".join(pts)
        body.append(f'<polygon class="area {layer.css}" points="{points}">'
                    f"<title>{escape(layer.label)}</title></polygon>")
        base = upper
    return _svg(title, body)


def _mib_axis(v: float) -> str:
    if v == 0:
        return "0"
    if v >= 1024 * 1024:
        return f"{v / 1024 / 1024:.3g} TiB"
    return f"{v / 1024:.3g} GiB" if v >= 1024 else f"{v:.3g} MiB"


def _mib_top(peak: float) -> float:
    """A round axis top in the unit the axis shows (GiB/TiB), expressed in MiB."""
    for unit in (1024 * 1024, 1024, 1):
        if peak >= unit:
            return _nice(peak / unit) * unit
    return _nice(peak)


def summary_charts(
    history: dict[str, Any], hours: int, user_class: Callable[[str], str]
) -> list[tuple[str, Markup, list[tuple[str, str]]]]:
    """(title, svg, legend) of the summary page's four charts from its JSON history."""
    h = history
    t = h["t"]

    def lines(
        title: str, spec: list[tuple[str, str, str]], mib: bool = False
    ) -> tuple[str, Markup, list[tuple[str, str]]]:
        series = [Series(label, css, h[key]) for label, css, key in spec]
        peak = max((max(s.values, default=0) for s in series), default=0)
        fmt = _mib_axis if mib else (lambda v: f"{v:g}")
        svg = line_chart(title, t, series, hours, fmt, _mib_top(peak) if mib else None)
        return title, svg, [(s.label, s.css) for s in series]

    per_user = h["per_user_gmem_mib"]
    layers = [Series(u, "s7" if u == "others" else user_class(u), v) for u, v in per_user.items()]
    total = _mib_top(max(h["mem_total_mib"], default=0)) or None
    return [
        lines("Allocations and vGPUs", [("vGPUs placed", "s0", "vgpu_used"),
                                        ("allocations", "s1", "allocations"),
                                        ("vGPU slots", "s7", "vgpu_total")]),
        lines("GPU memory", [("allocated", "s0", "mem_alloc_mib"), ("in use", "s2", "mem_used_mib"),
                             ("total", "s7", "mem_total_mib")], mib=True),
        lines("Compute (GPU-%)", [("allocated", "s0", "compute_alloc"), ("busy", "s3", "busy"),
                                  ("total", "s7", "compute_total")]),
        ("GPU memory per user",
         stacked_chart("GPU memory per user", t, layers, hours, _mib_axis, total),
         [(s.label, s.css) for s in layers]),
    ]  # fmt: skip


def node_map(cells: Sequence[dict[str, Any]]) -> Markup:
    """Every node as a small square, shaded by GPU memory allocated; down nodes outlined.

    Built here rather than in the template: 1,000 squares are 1,000 template loop turns
    with a dozen escapes each, about 5x slower than this.
    """
    out = []
    for n in cells:
        name = escape(n["name"])
        level = min(5, int(n["mem_alloc_pct"]) // 20)
        down = "" if n["state"] == "up" else " down"
        out.append(
            f'<a href="/nodes?q={quote(n["name"])}" class="cell l{level}{down}" title="{name} · '
            f'{n["state"]} · {n["vgpus"]}/{n["vgpu_slots"]} vGPU · {n["mem_alloc_pct"]}% memory '
            f'allocated"></a>'
        )
    return Markup("".join(out))
