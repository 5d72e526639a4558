"""Inline SVG charts: well-formed, self-contained, deterministic, and faithful to the data they draw."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest

from common.svgplot import Series, histogram, line_chart

NS = "{http://www.w3.org/2000/svg}"
XMLNS = 'xmlns="http://www.w3.org/2000/svg"'


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    return root


def elements(root: ET.Element, tag: str, cls: str | None = None) -> list[ET.Element]:
    found = root.iter(f"{NS}{tag}")
    return [e for e in found if cls is None or cls in (e.get("class") or "").split()]


def tick_labels(root: ET.Element, axis: str) -> list[str]:
    return [e.text or "" for e in root.iter(f"{NS}text") if (e.get("class") or "").split() == ["tick", axis]]


def points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points", "").split()]  # type: ignore[misc]


def frame(root: ET.Element) -> tuple[float, float, float, float]:
    (rect,) = elements(root, "rect", "frame")
    x, y, w, h = (float(rect.get(k)) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def chart(**kw) -> str:
    series = kw.pop("series", [Series("a", [0, 1, 2, 3], [0.2, 0.4, 0.5, 0.7]), Series("b", [0, 1, 2], [1, 3, 2])])
    return line_chart(series, **{"title": "t", "x_label": "x", "y_label": "y", **kw})


def test_root_element_and_one_polyline_per_series():
    svg = chart(width=600, height=300)
    root = parse(svg)
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == ("600", "300", "0 0 600 300")
    assert root.get("role") == "img" and root.get("class") == "chart" and root.get("aria-label") == "t"
    assert root.find(f"{NS}title").text == "t"
    assert Counter(p.get("data-series") for p in elements(root, "polyline", "series")) == {"a": 1, "b": 1}
    legend = [g.get("data-series") for g in elements(root, "g", "legend-entry")]
    assert legend == ["a", "b"]
    colours = {p.get("data-series"): p.get("stroke") for p in elements(root, "polyline", "series")}
    assert colours["a"] != colours["b"]
    assert len(elements(root, "circle", "marker")) == 7


def test_points_map_monotonically_into_the_frame():
    root = parse(chart())
    left, top, right, bottom = frame(root)
    (line,) = [p for p in elements(root, "polyline", "series") if p.get("data-series") == "a"]
    pts = points(line)
    assert len(pts) == 4
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    assert xs == sorted(xs) and len(set(xs)) == 4
    assert ys == sorted(ys, reverse=True)  # larger y values are higher up (smaller pixel y)
    assert all(left - 1e-6 <= x <= right + 1e-6 and top - 1e-6 <= y <= bottom + 1e-6 for x, y in pts)


def test_non_finite_points_split_the_line():
    s = Series("a", [0, 1, 2, 3, 4, 5], [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0])
    root = parse(chart(series=[s]))
    lines = elements(root, "polyline", "series")
    assert [len(points(p)) for p in lines] == [2, 3]
    with_none = Series("b", [0, 1, 2, 3, 4], [1.0, None, 2.0, 3.0, float("inf")])  # type: ignore[list-item]
    root = parse(chart(series=[with_none]))
    assert [len(points(p)) for p in elements(root, "polyline", "series")] == [2]
    assert len(elements(root, "circle", "marker")) == 3


def test_single_point_draws_a_marker_only():
    root = parse(chart(series=[Series("one", [1], [0.5], markers=False)], integer_x=True))
    assert elements(root, "polyline", "series") == []
    assert [c.get("data-series") for c in elements(root, "circle", "marker")] == ["one"]
    ticks = tick_labels(root, "x")
    assert len(ticks) >= 2 and all(re.fullmatch(r"-?\d+", t) for t in ticks) and "1" in ticks


@pytest.mark.parametrize(
    "svg",
    [
        line_chart([], title="e", x_label="x", y_label="y"),
        line_chart([Series("a", [], [])], title="e", x_label="x", y_label="y"),
        line_chart([Series("a", [1, 2], [float("nan"), float("inf")])], title="e", x_label="x", y_label="y"),
        line_chart([Series("a", [0, 1], [-1, 0])], title="e", x_label="x", y_label="y", y_log=True),
        histogram([], title="e", x_label="x"),
        histogram([("g", [float("nan")]), ("h", [])], title="e", x_label="x"),
    ],
)
def test_no_data_still_gives_a_full_size_svg(svg):
    root = parse(svg)
    assert (root.get("width"), root.get("height")) == ("560", "320")
    assert [t.text for t in elements(root, "text", "no-data")] == ["no data"]
    assert len(elements(root, "rect", "frame")) == 1
    assert elements(root, "polyline", "series") == [] and elements(root, "rect", "hist") == []


def test_data_charts_have_no_no_data_text():
    assert elements(parse(chart()), "text", "no-data") == []


def test_constant_data_is_padded():
    root = parse(chart(series=[Series("c", [0, 1, 2], [5.0, 5.0, 5.0])]))
    left, top, right, bottom = frame(root)
    (line,) = elements(root, "polyline", "series")
    ys = {y for _, y in points(line)}
    assert len(ys) == 1 and top < ys.pop() < bottom  # drawn inside, not on an edge or at NaN
    labels = [float(t) for t in tick_labels(root, "y")]
    assert min(labels) < 5.0 < max(labels)
    hist = parse(histogram([("g", [2.0, 2.0, 2.0])], title="h", x_label="x"))
    assert [float(r.get("data-fraction")) for r in elements(hist, "rect", "hist")] == [1.0]


def test_linear_ticks_are_nice():
    root = parse(chart(series=[Series("a", [0, 10], [0.013, 0.871])]))
    values = [float(t) for t in tick_labels(root, "y")]
    assert 4 <= len(values) <= 8
    steps = {round(b - a, 9) for a, b in zip(values, values[1:])}
    assert len(steps) == 1
    step = steps.pop()
    assert round(step / 10 ** math.floor(math.log10(step)), 6) in (1.0, 2.0, 5.0)
    assert values[0] <= 0.013 and values[-1] >= 0.871


def test_log_axis_drops_non_positive_values_and_labels_decades():
    s = Series("roc", [0.0, 1e-3, 1e-2, 0.1, 1.0], [0.0, 0.2, 0.5, 0.8, 1.0])
    root = parse(chart(series=[s], x_log=True, x_range=(1e-3, 1.0), y_range=(0.0, 1.0), diagonal=True))
    (line,) = elements(root, "polyline", "series")
    pts = points(line)
    assert len(pts) == 4
    assert tick_labels(root, "x") == ["1e-3", "1e-2", "1e-1", "1"]
    xs = [x for x, _ in pts]
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    assert max(gaps) - min(gaps) < 0.05  # decades are equally spaced
    root = parse(chart(series=[Series("e", [1, 2, 3, 4], [-1.0, 0.05, 0.5, 30.0])], y_log=True))
    (line,) = elements(root, "polyline", "series")
    assert len(points(line)) == 3
    assert tick_labels(root, "y") == ["1e-2", "1e-1", "1", "10", "1e2"]


def test_diagonal_on_log_x_is_the_curve_y_equals_x():
    root = parse(chart(x_log=True, x_range=(1e-3, 1.0), y_range=(0.0, 1.0), diagonal=True))
    left, top, right, bottom = frame(root)
    (diag,) = elements(root, "polyline", "diagonal")
    pts = points(diag)
    assert len(pts) > 10
    assert pts[-1] == pytest.approx((right, top), abs=0.01)  # y = x = 1
    # at x = 0.1 (two thirds of the way across three decades) y = 0.1
    x01 = left + (right - left) * 2 / 3
    near = min(pts, key=lambda p: abs(p[0] - x01))
    assert abs(near[0] - x01) < 5 and near[1] == pytest.approx(bottom - 0.1 * (bottom - top), abs=2)
    lin = parse(chart(x_range=(0, 1), y_range=(0, 1), diagonal=True))
    l2, t2, r2, b2 = frame(lin)
    assert points(elements(lin, "polyline", "diagonal")[0]) == [(l2, b2), (r2, t2)]
    assert elements(parse(chart()), "polyline", "diagonal") == []


def test_hlines_are_drawn_labelled_and_in_range():
    root = parse(chart(hlines=[("budget ε=8", 8.0)]))
    assert len(elements(root, "line", "hline")) == 1
    assert "budget ε=8" in [t.text for t in elements(root, "text", "ref-label")]
    assert max(float(t) for t in tick_labels(root, "y")) >= 8.0


def test_text_is_escaped_and_round_trips():
    title, label = 'a<b & "c" ε', 'x<&"y\'ε'
    svg = line_chart([Series(label, [0, 1], [0, 1])], title=title, x_label="<x>", y_label="&y")
    root = parse(svg)
    assert root.get("aria-label") == title and root.find(f"{NS}title").text == title
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert title in texts and label in texts and "<x>" in texts and "&y" in texts
    assert {p.get("data-series") for p in elements(root, "polyline", "series")} == {label}
    hist = parse(histogram([(label, [1, 2, 3])], title=title, x_label="x", vlines=[("t<1", 2.0)]))
    assert {r.get("data-series") for r in elements(hist, "rect", "hist")} == {label}
    assert "t<1" in [t.text for t in hist.iter(f"{NS}text")]


def test_histogram_fractions_follow_counts():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, 200), rng.normal(2.0, 0.5, 50)
    svg = histogram([("a", a), ("b", list(b) + [float("nan")])], title="h", x_label="d", bins=12)
    root = parse(svg)
    edges = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 13)
    for name, values in (("a", a), ("b", b)):
        bars = {int(r.get("data-bin")): float(r.get("data-fraction"))
                for r in elements(root, "rect", "hist") if r.get("data-series") == name}
        counts = np.histogram(values, bins=edges)[0]
        assert bars == pytest.approx({i: c / len(values) for i, c in enumerate(counts) if c}, abs=1e-6)
        assert sum(bars.values()) == pytest.approx(1.0, abs=1e-5)
    assert {p.get("data-series") for p in elements(root, "path", "hist-outline")} == {"a", "b"}
    heights = {(r.get("data-series"), float(r.get("data-fraction"))): float(r.get("height"))
               for r in elements(root, "rect", "hist")}
    ratios = {round(h / f, 1) for (_, f), h in heights.items()}
    assert len(ratios) == 1  # bar height proportional to fraction, same scale for both groups


def test_histogram_range_and_vlines():
    root = parse(histogram([("g", [0.1, 0.1, 0.1, 0.9, 5.0])], title="h", x_label="x", bins=2,
                           x_range=(0.0, 1.0), vlines=[("threshold", 0.5)]))
    fracs = {int(r.get("data-bin")): float(r.get("data-fraction")) for r in elements(root, "rect", "hist")}
    assert fracs == pytest.approx({0: 0.75, 1: 0.25})  # 5.0 lies outside the range
    left, _, right, _ = frame(root)
    (vline,) = elements(root, "line", "vline")
    assert float(vline.get("x1")) == pytest.approx((left + right) / 2, abs=0.01)
    assert [t.text for t in elements(root, "text", "ref-label")] == ["threshold"]


def test_output_is_deterministic():
    def make() -> tuple[str, str]:
        s = [Series("a", np.arange(5), np.linspace(0, 1, 5)), Series("b", [0, 1], [0.3, 0.1], dashed=True)]
        return chart(series=s), histogram([("g", np.linspace(0, 1, 40))], title="h", x_label="x")

    assert make() == make()


def test_clip_ids_are_unique_and_local():
    svgs = [chart(), chart(title="other"), chart(series=[Series("z", [0, 1], [1, 2])]),
            histogram([("g", [1, 2, 3])], title="t", x_label="x")]
    ids = []
    for svg in svgs:
        root = parse(svg)
        (clip,) = root.iter(f"{NS}clipPath")
        ids.append(clip.get("id"))
        refs = {e.get("clip-path") for e in root.iter() if e.get("clip-path")}
        assert refs == {f"url(#{clip.get('id')})"}
    assert len(set(ids)) == len(ids)


def test_self_contained():
    svgs = [
        chart(hlines=[("h", 1.0)], diagonal=True),
        chart(x_log=True, x_range=(1e-3, 1), diagonal=True),
        histogram([("g", [1, 2, 3]), ("h", [2, 3, 4])], title="t", x_label="x", vlines=[("v", 2.5)]),
        line_chart([], title="e", x_label="x", y_label="y"),
    ]
    for svg in svgs:
        assert svg.count("http") == 1 and svg.count(XMLNS) == 1
        for bad in ("<script", "<image", "@import", "href", "<style", "<foreignObject"):
            assert bad not in svg
        assert re.findall(r"url\((?!#)", svg) == []
        assert 'font-family="' in svg


def test_integer_x_ticks_are_integers():
    rounds = list(range(8))
    root = parse(chart(series=[Series("acc", rounds, [0.1 * r for r in rounds])], integer_x=True))
    ticks = tick_labels(root, "x")
    assert len(ticks) >= 3 and all(re.fullmatch(r"\d+", t) for t in ticks)
    root = parse(chart(series=[Series("acc", [0, 1, 2], [0.1, 0.2, 0.3])], integer_x=True))
    assert tick_labels(root, "x") == ["0", "1", "2"]
    without = parse(chart(series=[Series("acc", [0, 1, 2], [0.1, 0.2, 0.3])]))
    assert any("." in t for t in tick_labels(without, "x"))  # the flag is what makes them integers


def test_markers_turn_off_for_long_series_and_dashes():
    long = Series("long", np.arange(100), np.sin(np.arange(100)))
    short = Series("short", [0, 1, 2], [0, 1, 0], dashed=True)
    root = parse(chart(series=[long, short]))
    assert Counter(c.get("data-series") for c in elements(root, "circle", "marker")) == {"short": 3}
    dashes = {p.get("data-series"): p.get("stroke-dasharray") for p in elements(root, "polyline", "series")}
    assert dashes["long"] is None and dashes["short"]


def test_legend_for_ten_series_stays_right_of_the_plot():
    series = [Series(f"site {i} with a rather long label", [0, 1], [i, i + 1]) for i in range(10)]
    root = parse(chart(series=series))
    _, top, right, bottom = frame(root)
    entries = elements(root, "g", "legend-entry")
    assert len(entries) == 10
    for g in entries:
        (text,) = g.iter(f"{NS}text")
        assert float(text.get("x")) > right and top <= float(text.get("y")) <= bottom
    assert len({p.get("stroke") + str(p.get("stroke-dasharray")) for p in elements(root, "polyline", "series")}) == 10


def test_invalid_input_raises():
    with pytest.raises(ValueError):
        chart(series=[Series("a", [0, 1, 2], [1, 2])])
    with pytest.raises(ValueError):
        chart(x_log=True, x_range=(0.0, 1.0))
    with pytest.raises(ValueError):
        histogram([("g", [1, 2])], title="h", x_label="x", bins=0)
