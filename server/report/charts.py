"""The report's charts, drawn with matplotlib and returned as inline SVG (line charts and histograms).

Each function returns one ``<svg class="chart" role="img" aria-label=TITLE>`` element as a string, ready to be pasted
into an HTML page opened offline: no XML prolog or DOCTYPE, no scripts, no external references (the only URL is the
SVG namespace; markers refer to ``href="#..."`` inside the chart), text kept as text (``svg.fonttype: none``).

Matplotlib is used through :class:`matplotlib.figure.Figure` (never pyplot: no global figure state) and its rcParams
only inside :func:`matplotlib.rc_context`. Output is deterministic: no date in the metadata, and ``svg.hashsalt``
is a hash of the chart's title and data. Every id in a chart is prefixed with that hash, so charts on one page never
share an id.

Every drawn series is a ``<g class="series" data-series=LABEL>`` with a ``<title>`` (a histogram's groups have
``class="hist"``), so tests and readers can find each series. Colours follow the Okabe–Ito colour-blind-safe
palette; dashed series are alternate runs. NaN, inf and None break a line; on a log axis non-positive values are
dropped; a chart without any finite value says "no data".
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.dom import minidom

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MAX_MARKERS = 60  # series with more points are drawn without markers (isolated points keep theirs)
REFERENCE = "#555555"  # colour of reference lines (budgets, thresholds, the diagonal)
_DASHED = (0, (6, 4))
_DOTTED = (0, (2, 3))  # series beyond the palette's eight colours
_LONG_LABEL = 18  # legends with a label longer than this go below the plot instead of beside it
_RC = {
    "svg.fonttype": "none",  # text stays text: small, selectable, escaped like any XML text
    "text.parse_math": False,  # a "$" in a run name is a dollar sign, not mathtext
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
}
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no <metadata>: deterministic, no URLs


@dataclass(frozen=True)
class Series:
    """One line of a line chart: ``x``/``y`` pairs; NaN, inf or None break the line into segments."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False
    markers: bool = True  # small circles at the points (off automatically above MAX_MARKERS points)


def _floats(values: Sequence) -> np.ndarray:
    """``values`` as floats, with anything that is not a finite number (None, NaN, inf, text) as NaN."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[i] = f
    return out


def _finite_refs(refs: Sequence[tuple[str, float]], log: bool = False) -> list[tuple[str, float]]:
    """Reference lines with a finite value (a positive one on a log axis)."""
    out = []
    for label, value in refs:
        v = _floats([value])[0]
        if math.isfinite(v) and (v > 0 or not log):
            out.append((str(label), float(v)))
    return out


def _check_range(given: tuple[float, float] | None, log: bool, axis: str) -> None:
    if given is None:
        return
    lo, hi = float(given[0]), float(given[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and (lo > 0 or not log)):
        raise ValueError(f"The {axis} range {given!r} is not valid: it needs two finite numbers, low < high"
                         + (", both positive on a log axis." if log else "."))


def _key(kind: str, title: str, content: object) -> str:
    """A short hash of the chart: its salt for matplotlib's ids and the prefix of every id in it."""
    return "c" + hashlib.sha1(f"{kind}\0{title}\0{content!r}".encode()).hexdigest()[:10]


def _style(i: int, dashed: bool) -> tuple[str, object]:
    """Colour and line style of the i-th series; repeats of the palette are dotted."""
    return PALETTE[i % len(PALETTE)], _DASHED if dashed else (_DOTTED if i >= len(PALETTE) else "solid")


def _figure(width: int, height: int) -> tuple[Figure, Axes]:
    # At 72 dpi one SVG user unit is one point, and the root's size is rewritten in pixels by _finish.
    fig = Figure(figsize=(width / 72, height / 72), dpi=72, layout="constrained")
    return fig, fig.add_subplot()


def _labels(ax: Axes, title: str, x_label: str, y_label: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)


def _no_data(ax: Axes) -> None:
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#777777",
            gid="no-data-0")


def _legend(fig: Figure, handles: list, labels: Sequence[str]) -> None:
    """Beside the plot, or below it when a label is long. Handles are given, so that every label is shown (even
    one starting with "_", which matplotlib would otherwise hide)."""
    if not labels:
        return
    if max(len(s) for s in labels) > _LONG_LABEL:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)


def _log_formatter(axis) -> None:
    """Decade ticks as plain numbers (0.001, 0.01, ...) rather than mathtext."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _svg(fig: Figure) -> str:
    """The figure as SVG text (inside the chart's rc_context, which holds the font type and the id salt)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=_METADATA)
    return buf.getvalue()


def _finish(svg: str, key: str, title: str, labels: dict[str, str]) -> str:
    """Make matplotlib's SVG inlinable: no prolog or DOCTYPE, size in pixels, ids prefixed with ``key`` (and the
    references to them), ``href`` for ``xlink:href``; ``labels`` maps a gid such as ``series-0`` to the series label,
    which becomes the group's ``data-series`` and ``<title>``; the gid's role (``series``) becomes its class."""
    doc = minidom.parseString(svg)
    root = doc.documentElement
    for dim in ("width", "height"):
        root.setAttribute(dim, root.getAttribute(dim).removesuffix("pt"))
    if root.hasAttribute("xmlns:xlink"):
        root.removeAttribute("xmlns:xlink")
    root.setAttribute("class", "chart")
    root.setAttribute("role", "img")
    root.setAttribute("aria-label", title)
    heading = doc.createElement("title")
    heading.appendChild(doc.createTextNode(title))
    root.insertBefore(heading, root.firstChild)
    for el in root.getElementsByTagName("*"):
        if el.hasAttribute("xlink:href"):
            el.setAttribute("href", el.getAttribute("xlink:href"))
            el.removeAttribute("xlink:href")
        for name, value in list(el.attributes.items()):
            if name == "href" and value.startswith("#"):
                el.setAttribute(name, f"#{key}-{value[1:]}")
            elif "url(#" in value:
                el.setAttribute(name, value.replace("url(#", f"url(#{key}-"))
        gid = el.getAttribute("id")
        if not gid:
            continue
        el.setAttribute("id", f"{key}-{gid}")
        role = gid.rsplit("-", 1)[0]
        if role in ("series", "hist", "reference", "no-data"):
            el.setAttribute("class", role)
        if gid in labels:
            el.setAttribute("data-series", labels[gid])
            tip = doc.createElement("title")
            tip.appendChild(doc.createTextNode(labels[gid]))
            el.insertBefore(tip, el.firstChild)
    return root.toxml()


def _reference_labels(ax: Axes, hlines: Sequence[tuple[str, float]], vlines: Sequence[tuple[str, float]]) -> None:
    """Dashed grey reference lines, each labelled: horizontal at the right end, vertical near the top."""
    style = {"color": REFERENCE, "linewidth": 1.0, "linestyle": (0, (4, 3))}
    n = 0
    for i, (label, v) in enumerate(hlines):  # labels alternately above and below their lines, so equal ones differ
        ax.axhline(v, gid=f"reference-{n}", **style)
        ax.annotate(label, (1.0, v), xycoords=ax.get_yaxis_transform(), xytext=(-4, 3 if i % 2 == 0 else -3),
                    textcoords="offset points", ha="right", va="bottom" if i % 2 == 0 else "top", fontsize=8,
                    color="#333333")
        n += 1
    for i, (label, v) in enumerate(vlines):
        ax.axvline(v, gid=f"reference-{n}", **style)
        ax.annotate(label, (v, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(3, -12 - 11 * (i % 4)),
                    textcoords="offset points", ha="left", va="bottom", fontsize=8, color="#333333")
        n += 1


def _points(s: Series, x_log: bool, y_log: bool) -> tuple[np.ndarray, np.ndarray]:
    """The series as float arrays: non-finite values NaN (breaking the line), non-positive ones on a log axis
    dropped."""
    if len(s.x) != len(s.y):
        raise ValueError(f"Series {s.label!r} has {len(s.x)} x values but {len(s.y)} y values; give one y per x.")
    x, y = _floats(s.x), _floats(s.y)
    keep = ~((x_log & (x <= 0)) | (y_log & (y <= 0)))  # NaN compares False: kept, and breaks the line
    return x[keep], y[keep]


def _marker_indices(x: np.ndarray, y: np.ndarray, markers: bool) -> list[int] | None:
    """All points (None) when markers are on and few enough, else only the isolated ones (a lone point between
    gaps is otherwise invisible)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if markers and int(ok.sum()) <= MAX_MARKERS:
        return None
    before, after = np.r_[False, ok[:-1]], np.r_[ok[1:], False]
    return [int(i) for i in np.flatnonzero(ok & ~before & ~after)]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               width: int = 560, height: int = 320, x_log: bool = False, y_log: bool = False,
               x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
               integer_x: bool = False, diagonal: bool = False,
               hlines: Sequence[tuple[str, float]] = ()) -> str:
    """Lines (with markers) of several series on shared axes, optionally log, with labelled horizontal reference
    lines (``hlines``: ``(label, y)``) and the diagonal y = x (``diagonal``); ``width``/``height`` in pixels."""
    _check_range(x_range, x_log, "x")
    _check_range(y_range, y_log, "y")
    prepared = [(s, *_points(s, x_log, y_log)) for s in series]
    refs = _finite_refs(hlines, y_log)
    key = _key("line", title, ([(s.label, x.tolist(), y.tolist(), s.dashed, s.markers) for s, x, y in prepared],
                               x_label, y_label, width, height, x_log, y_log, x_range, y_range, integer_x, diagonal,
                               refs))
    has_data = any(np.any(np.isfinite(x) & np.isfinite(y)) for _, x, y in prepared)
    with matplotlib.rc_context({**_RC, "svg.hashsalt": key}):
        fig, ax = _figure(width, height)
        _labels(ax, title, x_label, y_label)
        handles = []
        for i, (s, x, y) in enumerate(prepared):
            colour, linestyle = _style(i, s.dashed)
            every = _marker_indices(x, y, s.markers)
            handles += ax.plot(x, y, color=colour, linestyle=linestyle, linewidth=1.8, gid=f"series-{i}",
                               marker="o" if every is None or every else None, markersize=4, markevery=every or None)
        if not has_data:
            _no_data(ax)
        else:
            if x_log:
                ax.set_xscale("log")
                _log_formatter(ax.xaxis)
            if y_log:
                ax.set_yscale("log")
                _log_formatter(ax.yaxis)
            _reference_labels(ax, refs, ())
            if x_range is not None:
                ax.set_xlim(*x_range)
            if y_range is not None:
                ax.set_ylim(*y_range)
            if integer_x and not x_log:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if diagonal:
                (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
                lo, hi = max(x0, y0), min(x1, y1)
                if lo < hi and (lo > 0 or not (x_log or y_log)):
                    t = np.geomspace(lo, hi, 65) if x_log or y_log else np.array([lo, hi])
                    ax.plot(t, t, color="#999999", linewidth=1.0, linestyle=(0, (4, 4)), scalex=False, scaley=False,
                            gid=f"reference-{len(refs)}")
        _legend(fig, handles, [s.label for s in series])
        svg = _svg(fig)
    return _finish(svg, key, title, {f"series-{i}": s.label for i, s in enumerate(series)})


def histogram(groups: Sequence[tuple[str, Sequence[float]]], *, title: str, x_label: str,
              y_label: str = "fraction", bins: int = 30, x_range: tuple[float, float] | None = None,
              width: int = 560, height: int = 320, vlines: Sequence[tuple[str, float]] = ()) -> str:
    """Overlaid histograms of ``(label, values)`` groups on shared bins, each normalised to fractions summing to 1
    (non-finite values are left out), with labelled vertical reference lines (``vlines``: ``(label, x)``)."""
    if bins < 1:
        raise ValueError(f"A histogram needs at least one bin; got bins={bins}.")
    _check_range(x_range, False, "x")
    data = [(str(label), _floats(values)) for label, values in groups]
    data = [(label, v[np.isfinite(v)]) for label, v in data]
    refs = _finite_refs(vlines)
    key = _key("hist", title, ([(label, v.tolist()) for label, v in data], x_label, y_label, bins, x_range,
                               width, height, refs))
    every = np.concatenate([v for _, v in data]) if data else np.empty(0)
    with matplotlib.rc_context({**_RC, "svg.hashsalt": key}):
        fig, ax = _figure(width, height)
        _labels(ax, title, x_label, y_label)
        handles = []
        if every.size == 0:
            _no_data(ax)
        else:
            if x_range is not None:
                lo, hi = float(x_range[0]), float(x_range[1])
            else:
                lo, hi = float(every.min()), float(every.max())
                pad = 0.5 if lo == hi == 0 else abs(lo) * 0.05 if lo == hi else 0.0
                lo, hi = lo - pad, hi + pad
            edges = np.linspace(lo, hi, bins + 1)
            for i, (label, v) in enumerate(data):
                counts = np.histogram(v, bins=edges)[0]
                fractions = counts / counts.sum() if counts.sum() else np.zeros(bins)
                colour = PALETTE[i % len(PALETTE)]
                handles.append(ax.stairs(fractions, edges, fill=True, facecolor=to_rgba(colour, 0.25),
                                         edgecolor=colour, linewidth=1.5, gid=f"hist-{i}"))
            _reference_labels(ax, (), refs)
            if x_range is not None:
                ax.set_xlim(lo, hi)
            ax.set_ylim(bottom=0.0)
        _legend(fig, handles, [label for label, _ in data] if handles else [])
        svg = _svg(fig)
    return _finish(svg, key, title, {f"hist-{i}": label for i, (label, _) in enumerate(data)})
