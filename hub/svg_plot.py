"""Bar charts as SVG text, drawn on the server: no JavaScript, no library, no CDN.

:func:`bar_chart` turns ``(label, value)`` points into one self-contained ``<svg>`` element
that a hub page embeds as it is. Pure: the same points give the same text, so it is tested
as a table. Every label is XML-escaped (labels may come from the ledger); values must be
finite numbers. Values may be negative (a correction row can make a day's net usage fall
below zero): the zero line is then drawn inside the plot.

The chart carries ``role="img"``, an ``aria-label`` and a ``<title>``, plus one ``<title>``
per bar (``label: value unit``), which browsers show as a tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

#: The most bars one chart draws (a day-by-day year and a bit).
MAX_POINTS = 400


class PlotError(ValueError):
    """Points a chart cannot be drawn from; the message names the field."""


def nice_step(span: float, ticks: int = 4) -> float:
    """A round step (1, 2 or 5 × 10^n) that cuts ``span`` into about ``ticks`` parts."""
    if not math.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(1, ticks)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag + 1e-12:
            return float(m * mag)
    return float(10 * mag)  # pragma: no cover - the loop always returns


def axis_ticks(lo: float, hi: float, ticks: int = 4) -> list[float]:
    """Tick values from below ``lo`` to above ``hi`` (both included in the range), on a
    round step; 0 is always one of them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        hi = lo + 1.0
    step = nice_step(hi - lo, ticks)
    start = math.floor(lo / step + 1e-9) * step
    out: list[float] = []
    v = start
    while v < hi + step - 1e-9 and len(out) < 50:
        out.append(round(v, 10))
        if v >= hi - 1e-9:
            break
        v += step
    return out


def format_value(v: float) -> str:
    """A short number for an axis or a tooltip: 0, 12, 1.5, 0.25, 1.2k, 3.4M."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def bar_chart(
    points: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str = "",
    width: int = 720,
    height: int = 260,
    label_every: int | None = None,
) -> str:
    """An SVG bar chart of ``points`` (label, value), ``title`` as its accessible name.

    ``label_every`` writes every n-th label under the bars (default: about 12 labels).
    An empty ``points`` gives a chart that says there is nothing to show.
    """
    if not isinstance(title, str) or not title.strip():
        raise PlotError("title: must not be empty")
    if not 200 <= width <= 4000 or not 120 <= height <= 2000:
        raise PlotError(f"width, height: {width}×{height} is outside 200..4000 × 120..2000")
    if len(points) > MAX_POINTS:
        raise PlotError(f"points: at most {MAX_POINTS} bars, got {len(points)}")
    values: list[float] = []
    for i, p in enumerate(points):
        if not isinstance(p, tuple | list) or len(p) != 2 or not isinstance(p[0], str):
            raise PlotError(f"points[{i}]: must be a (label, value) pair")
        v = p[1]
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise PlotError(f"points[{i}]: value must be a finite number, got {v!r}")
        values.append(float(v))

    left, right, top, bottom = 56, 12, 28, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    name = f"{title} ({unit})" if unit else title
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="sp-plot" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f"aria-label={quoteattr(name)}>",
        f"<title>{escape(name)}</title>",
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(name)}</text>',
    ]
    if not values:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" '
            'text-anchor="middle" font-size="13" fill="#666">no usage in this range</text>'
        )
        out.append("</svg>")
        return "\n".join(out)

    ticks = axis_ticks(min(values), max(values))
    lo, hi = ticks[0], ticks[-1]

    def y(v: float) -> float:
        return top + plot_h - (v - lo) / (hi - lo) * plot_h

    for t in ticks:
        yy = y(t)
        colour = "#888" if t == 0 else "#ddd"
        out.append(
            f'<line x1="{left}" y1="{yy:.1f}" x2="{left + plot_w}" y2="{yy:.1f}" '
            f'stroke="{colour}" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="11">'
            f"{escape(format_value(t))}</text>"
        )
    n = len(values)
    slot = plot_w / n
    bar = max(1.0, slot * 0.8)
    every = label_every if label_every and label_every > 0 else max(1, math.ceil(n / 12))
    zero = y(0.0)
    for i, ((label, _), v) in enumerate(zip(points, values, strict=True)):
        x = left + i * slot + (slot - bar) / 2
        y0, y1 = sorted((zero, y(v)))
        tip = f"{label}: {format_value(v)}{' ' + unit if unit else ''}"
        out.append(
            f'<rect class="sp-bar" x="{x:.1f}" y="{y0:.1f}" width="{bar:.1f}" '
            f'height="{max(0.0, y1 - y0):.1f}" fill="#3b73b9" data-value="{v:g}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if i % every == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                f'font-size="10">{escape(label)}</text>'
            )
    out.append("</svg>")
    return "\n".join(out)
