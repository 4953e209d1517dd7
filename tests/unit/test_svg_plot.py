"""hub/svg_plot.py: server-side SVG bar charts, as tables (no browser, no network)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from sovereign_portal.hub.svg_plot import (
    MAX_POINTS,
    PlotError,
    axis_ticks,
    bar_chart,
    format_value,
    nice_step,
)

pytestmark = pytest.mark.unit
NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 - the module's own output, not untrusted input


def bars(svg: str) -> list[ET.Element]:
    root = parse(svg)  # well-formed XML, or this raises
    assert root.tag == f"{NS}svg"
    return [e for e in root.iter(f"{NS}rect") if e.get("class") == "sp-bar"]


@pytest.mark.parametrize(
    ("span", "step"),
    [(1, 0.5), (4, 1), (10, 5), (7, 2), (100, 50), (0.3, 0.1), (0, 1.0)],
)
def test_nice_step(span: float, step: float) -> None:
    assert nice_step(span) == pytest.approx(step)


@pytest.mark.parametrize(
    ("lo", "hi", "first", "last"),
    [(0, 3.2, 0, 4), (0, 0, 0, 1), (-1.5, 2, -2, 2), (2, 9, 0, 10)],
)
def test_ticks_cover_the_range_and_zero(lo: float, hi: float, first: float, last: float) -> None:
    t = axis_ticks(lo, hi)
    assert t[0] == pytest.approx(first) and t[-1] == pytest.approx(last)
    assert 0 in t
    assert t == sorted(t)


@pytest.mark.parametrize(
    ("v", "text"), [(0, "0"), (12, "12"), (1.5, "1.5"), (0.25, "0.25"), (12345, "12.3k"),
                    (3.4e6, "3.4M"), (250.4, "250")]
)  # fmt: skip
def test_format_value(v: float, text: str) -> None:
    assert format_value(v) == text


def test_bar_heights_follow_the_values() -> None:
    svg = bar_chart([("2026-11-01", 1.0), ("2026-11-02", 4.0), ("2026-11-03", 0.0)],
                    title="GPU-hours per day", unit="GPU-h")  # fmt: skip
    rects = bars(svg)
    assert [r.get("data-value") for r in rects] == ["1", "4", "0"]
    h = [float(r.get("height") or "nan") for r in rects]
    assert h[1] == pytest.approx(4 * h[0], rel=0.02) and h[2] == 0
    tips = [r.find(f"{NS}title") for r in rects]
    assert [t.text for t in tips if t is not None] == [
        "2026-11-01: 1 GPU-h",
        "2026-11-02: 4 GPU-h",
        "2026-11-03: 0 GPU-h",
    ]
    root = parse(svg)
    assert root.get("role") == "img"
    assert root.get("aria-label") == "GPU-hours per day (GPU-h)"


def test_negative_values_hang_below_the_zero_line() -> None:
    rects = bars(bar_chart([("a", 2.0), ("b", -1.0)], title="net"))
    (ya, ha), (yb, hb) = [(float(r.get("y") or 0), float(r.get("height") or 0)) for r in rects]
    zero = ya + ha  # the positive bar ends on the zero line
    assert yb == pytest.approx(zero) and hb == pytest.approx(ha / 2, rel=0.05)


def test_labels_are_escaped_and_nothing_executes() -> None:
    evil = '<script>alert(1)</script>&"'
    svg = bar_chart([(evil, 1.0)], title=f"t {evil}", unit="€")
    assert "<script>" not in svg
    root = parse(svg)
    assert not list(root.iter(f"{NS}script"))
    texts = [e.text for e in root.iter(f"{NS}text")]
    assert evil in texts  # shown as text, intact


def test_empty_chart_says_so() -> None:
    svg = bar_chart([], title="GPU-hours")
    assert bars(svg) == [] and "no usage in this range" in svg


def test_many_points_thin_the_labels() -> None:
    pts = [(f"d{i}", float(i)) for i in range(120)]
    root = parse(bar_chart(pts, title="x"))
    labels = [e.text for e in root.iter(f"{NS}text") if (e.text or "").startswith("d")]
    assert len(bars(bar_chart(pts, title="x"))) == 120
    assert 8 <= len(labels) <= 13 and labels[0] == "d0"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"points": [("a", math.nan)]}, "points[0]"),
        ({"points": [("a", math.inf)]}, "points[0]"),
        ({"points": [("a", True)]}, "points[0]"),
        ({"points": [("a", "1")]}, "points[0]"),
        ({"points": [(1, 1.0)]}, "points[0]"),
        ({"points": [("a", 1.0, 2)]}, "points[0]"),
        ({"points": [("a", 1.0)] * (MAX_POINTS + 1)}, "points"),
        ({"points": [], "title": " "}, "title"),
        ({"points": [], "width": 10}, "width"),
    ],
)
def test_bad_points_name_the_field(kw: dict, field: str) -> None:
    kw.setdefault("title", "t")
    with pytest.raises(PlotError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        bar_chart(**kw)
