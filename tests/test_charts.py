"""The report's charts (matplotlib to inline SVG): well-formed, self-contained, deterministic, and faithful to the
data they draw."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest

from server.report.charts import MAX_MARKERS, PALETTE, Series, histogram, line_chart

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    assert svg.startswith("<svg")  # no XML prolog or DOCTYPE: the element can be pasted into HTML
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    return root


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{NS}g") if g.get("class") == cls]


def labels(root: ET.Element, cls: str = "series") -> Counter:
    return Counter(g.get("data-series") for g in groups(root, cls))


def series_group(root: ET.Element, label: str) -> ET.Element:
    (group,) = [g for g in groups(root, "series") if g.get("data-series") == label]
    return group


def line_path(group: ET.Element) -> ET.Element:
    return next(p for p in group.iter(f"{NS}path") if p.get("id") is None)  # the line, not the marker definition


def subpaths(path: ET.Element) -> list[int]:
    """Number of points in each piece of a path ("M x y L x y ..." pieces)."""
    return [len(re.findall(r"[-\d.]+ [-\d.]+", piece)) for piece in path.get("d").split("M")[1:]]


def markers(group: ET.Element) -> int:
    return len(list(group.iter(f"{NS}use")))


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{NS}text")]


def tick_labels(root: ET.Element, axis: str) -> list[str]:
    ticks = [g for g in root.iter(f"{NS}g") if re.search(rf"-{axis}tick_\d+$", g.get("id", ""))]
    return [t.text for g in ticks for t in g.iter(f"{NS}text")]


def chart(**kw) -> str:
    series = kw.pop("series", [Series("a", [0, 1, 2, 3], [0.2, 0.4, 0.5, 0.7]), Series("b", [0, 1, 2], [1, 3, 2])])
    return line_chart(series, **{"title": "t", "x_label": "x", "y_label": "y", **kw})


def test_root_element_is_an_accessible_chart_of_the_given_size():
    root = parse(chart(width=600, height=300))
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == ("600", "300", "0 0 600 300")
    assert root.get("class") == "chart" and root.get("role") == "img" and root.get("aria-label") == "t"
    assert root.find(f"{NS}title").text == "t"
    assert {"t", "x", "y"} <= set(texts(root))


def test_one_group_per_series_with_its_label_colour_and_markers():
    root = parse(chart(series=[Series("a", [0, 1, 2, 3], [0.2, 0.4, 0.5, 0.7]),
                               Series("b", [0, 1, 2], [1, 3, 2], dashed=True)]))
    assert labels(root) == {"a": 1, "b": 1}
    a, b = series_group(root, "a"), series_group(root, "b")
    assert a.find(f"{NS}title").text == "a" and b.find(f"{NS}title").text == "b"
    assert subpaths(line_path(a)) == [4] and subpaths(line_path(b)) == [3]
    assert markers(a) == 4 and markers(b) == 3
    colours = [re.search(r"stroke: (#[0-9a-f]{6})", line_path(g).get("style")).group(1) for g in (a, b)]
    assert colours == [c.lower() for c in PALETTE[:2]]  # Okabe–Ito, in order
    assert "stroke-dasharray" in line_path(b).get("style") and "stroke-dasharray" not in line_path(a).get("style")
    assert sum(1 for t in texts(root) if t in ("a", "b")) == 2  # the legend names both


def test_non_finite_values_break_the_line_and_never_crash():
    root = parse(chart(series=[Series("a", [0, 1, 2, 3, 4, 5], [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0])]))
    assert subpaths(line_path(series_group(root, "a"))) == [2, 3]
    with_none = Series("b", [0, 1, 2, 3, 4], [1.0, None, 2.0, 3.0, float("inf")],  # type: ignore[list-item]
                       markers=False)
    group = series_group(parse(chart(series=[with_none])), "b")
    assert subpaths(line_path(group)) == [1, 2]
    assert markers(group) == 1  # the lone point keeps a marker, or it would not show at all
    parse(chart(series=[Series("c", [float("nan"), 1, "x"], [float("-inf"), 2, 3])]))  # type: ignore[list-item]


def test_markers_turn_off_for_long_series():
    n = MAX_MARKERS + 40
    root = parse(chart(series=[Series("long", np.arange(n), np.sin(np.arange(n))), Series("short", [0, 1], [0, 1])]))
    assert markers(series_group(root, "long")) == 0 and markers(series_group(root, "short")) == 2
    assert subpaths(line_path(series_group(root, "long"))) == [n]


def test_log_axis_drops_non_positive_values():
    roc = Series("roc", [0.0, 1e-3, 1e-2, 0.1, 1.0], [0.0, 0.2, 0.5, 0.8, 1.0])
    root = parse(chart(series=[roc], x_log=True, x_range=(1e-3, 1.0), y_range=(0.0, 1.0), diagonal=True))
    assert subpaths(line_path(series_group(root, "roc"))) == [4]
    assert tick_labels(root, "x") == ["0.001", "0.01", "0.1", "1"]
    (diagonal,) = groups(root, "reference")
    assert subpaths(next(diagonal.iter(f"{NS}path")))[0] > 10  # y = x is a curve on a log x axis
    root = parse(chart(series=[Series("e", [1, 2, 3, 4], [-1.0, 0.0, 0.5, 30.0])], y_log=True))
    assert subpaths(line_path(series_group(root, "e"))) == [2]


def test_integer_x_ticks_are_whole_rounds():
    rounds = [0, 1, 2]
    root = parse(chart(series=[Series("acc", rounds, [0.1, 0.2, 0.3])], integer_x=True))
    assert tick_labels(root, "x") == ["0", "1", "2"]
    without = parse(chart(series=[Series("acc", rounds, [0.1, 0.2, 0.3])]))
    assert any("." in t for t in tick_labels(without, "x"))  # the flag is what makes them integers


def test_reference_lines_are_drawn_and_labelled():
    root = parse(chart(hlines=[("budget ε=8", 8.0), ("nan", float("nan"))]))
    assert len(groups(root, "reference")) == 1 and "budget ε=8" in texts(root)
    assert max(float(t.replace("−", "-")) for t in tick_labels(root, "y")) >= 8.0  # the axis reaches the budget


@pytest.mark.parametrize("svg", [
    line_chart([], title="e", x_label="x", y_label="y"),
    line_chart([Series("a", [], [])], title="e", x_label="x", y_label="y"),
    line_chart([Series("a", [1, 2], [float("nan"), float("inf")])], title="e", x_label="x", y_label="y"),
    line_chart([Series("a", [0, 1], [-1, 0])], title="e", x_label="x", y_label="y", y_log=True),
    histogram([], title="e", x_label="x"),
    histogram([("g", [float("nan")]), ("h", [])], title="e", x_label="x"),
])
def test_no_data_still_gives_a_full_size_chart(svg):
    root = parse(svg)
    assert (root.get("width"), root.get("height")) == ("560", "320")
    (note,) = groups(root, "no-data")
    assert [t.text for t in note.iter(f"{NS}text")] == ["no data"]
    assert "no data" not in texts(parse(chart()))


def test_histogram_of_two_groups_draws_fractions():
    rng = np.random.default_rng(3)
    svg = histogram([("same person", rng.normal(0.3, 0.1, 200)), ("different people", rng.normal(0.8, 0.1, 50))],
                    title="Pair distances", x_label="cosine distance", vlines=[("threshold 0.550", 0.55)])
    root = parse(svg)
    assert labels(root, "hist") == {"same person": 1, "different people": 1}
    assert labels(root) == {}
    assert {"same person", "different people", "threshold 0.550"} <= set(texts(root))
    assert len(groups(root, "reference")) == 1
    # bins=2 over [0, 1]: 3 of the 4 values in range fall in the first bin, so its step is three times as high
    root = parse(histogram([("g", [0.1, 0.1, 0.1, 0.9, 5.0, float("nan")])], title="h", x_label="x", bins=2,
                           x_range=(0.0, 1.0)))
    (group,) = groups(root, "hist")
    ys = [float(y) for y in re.findall(r"[-\d.]+ ([-\d.]+)", next(group.iter(f"{NS}path")).get("d"))]
    base, levels = max(ys), sorted({round(y, 3) for y in ys} - {round(max(ys), 3)})
    assert len(levels) == 2 and (base - levels[0]) / (base - levels[1]) == pytest.approx(3.0, rel=1e-3)


def test_output_is_deterministic():
    def make() -> tuple[str, str]:
        s = [Series("a", np.arange(5), np.linspace(0, 1, 5)), Series("b", [0, 1], [0.3, 0.1], dashed=True)]
        return chart(series=s), histogram([("g", np.linspace(0, 1, 40))], title="h", x_label="x")

    assert make() == make()


def test_charts_on_one_page_share_no_id_and_refer_only_inside_themselves():
    svgs = [chart(), chart(title="other"), chart(series=[Series("z", [0, 1], [1, 2])]),
            histogram([("g", [1, 2, 3])], title="t", x_label="x")]
    seen: set[str] = set()
    for svg in svgs:
        root = parse(svg)
        ids = [e.get("id") for e in root.iter() if e.get("id")]
        assert len(ids) == len(set(ids)) and not seen & set(ids)
        seen |= set(ids)
        refs = re.findall(r'url\(#([^)]+)\)', svg) + re.findall(r'href="#([^"]+)"', svg)
        assert refs and set(refs) <= set(ids)


def test_self_contained():
    for svg in (chart(hlines=[("h", 1.0)], diagonal=True), chart(x_log=True, x_range=(1e-3, 1), diagonal=True),
                histogram([("g", [1, 2, 3]), ("h", [2, 3, 4])], title="t", x_label="x", vlines=[("v", 2.5)]),
                line_chart([], title="e", x_label="x", y_label="y")):
        assert svg.count("http") == 1 and svg.count('xmlns="http://www.w3.org/2000/svg"') == 1
        for bad in ("<script", "<image", "@import", "xlink", "<foreignObject", "<metadata", "<!DOCTYPE", "<?xml"):
            assert bad not in svg, bad
        assert all(v.startswith("#") for v in re.findall(r'href="([^"]*)"', svg))
        assert re.findall(r"url\((?!#)", svg) == []


def test_text_is_escaped_and_round_trips():
    title, label, other = 'a<b & "c" ε', "<script>alert(1)</script>", "_a & b $x$"
    svg = line_chart([Series(label, [0, 1], [0, 1]), Series(other, [0, 1], [1, 0])], title=title, x_label="<x>",
                     y_label="&y")
    for raw in ("<script>", "a & b", "<b", "<x>", "&y"):
        assert raw not in svg, raw
    root = parse(svg)
    assert root.get("aria-label") == title and root.find(f"{NS}title").text == title
    assert {title, label, other, "<x>", "&y"} <= set(texts(root))  # "$x$" is not mathtext, "_a" is in the legend
    assert labels(root) == {label: 1, other: 1}
    hist = parse(histogram([(label, [1, 2, 3])], title=title, x_label="x", vlines=[("t<1", 2.0)]))
    assert labels(hist, "hist") == {label: 1} and "t<1" in texts(hist)


def test_invalid_input_raises():
    with pytest.raises(ValueError, match="2 y values"):
        chart(series=[Series("a", [0, 1, 2], [1, 2])])
    with pytest.raises(ValueError, match="positive on a log axis"):
        chart(x_log=True, x_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="at least one bin"):
        histogram([("g", [1, 2])], title="h", x_label="x", bins=0)
