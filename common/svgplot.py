"""Inline SVG charts for the HTML evaluation report: line charts and histograms, no plotting library needed.

Each function returns one self-contained ``<svg>`` element as a string, to paste into an HTML page that is
opened offline: no scripts, links, images, external fonts or stylesheets (the only URL is the SVG namespace).
Output is deterministic: numbers are written with fixed precision, and the one id (the clip path of the plot
area) is a hash of the chart's title and content, so several charts can share a page without id collisions.

Colours cycle through the Okabe–Ito colour-blind-safe palette; dashed series add a stroke-dasharray. Every
data element carries ``data-series="LABEL"`` (histogram bars also ``data-bin`` and ``data-fraction``), so the
report's tests can find each series in the markup.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
FONT = "system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"
MAX_MARKERS = 60  # series with more points are drawn without markers
_NS = "http://www.w3.org/2000/svg"
_CLIP = "<clip-id>"  # placeholder for the clip id; escaped user text can never contain a literal "<"
_DASH = "6 4"
_REF = 'stroke="#555555" stroke-width="1" stroke-dasharray="4 3"'


@dataclass(frozen=True)
class Series:
    """One line of a line chart: ``x``/``y`` pairs; NaN, inf or None break the line into segments."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False
    markers: bool = True  # small circles at the points (off automatically above MAX_MARKERS points)


def _esc(text: object) -> str:
    """XML-escape text for element content and double-quoted attributes (control characters dropped)."""
    s = "".join(c for c in str(text) if c >= " " or c in "\t\n\r")
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _f(v: float) -> str:
    return f"{v:.2f}"


def _finite(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _style(i: int, dashed: bool) -> tuple[str, str]:
    """Colour and dasharray ('' for solid) of the i-th series; repeats of the palette are dotted."""
    dash = _DASH if dashed else ("2 3" if i >= len(PALETTE) else "")
    return PALETTE[i % len(PALETTE)], dash


def _nice_step(span: float, integer: bool = False, target: float = 6.0) -> float:
    """A 1/2/5 x 10^k tick step giving about ``target`` intervals over ``span`` (>= 1 when ``integer``)."""
    mag = 10.0 ** math.floor(math.log10(span / target))
    steps = [m * mag * k for k in (1, 10) for m in (1, 2, 5)]
    step = min(steps, key=lambda s: (abs(span / s - target), -s))
    return float(max(1, round(step))) if integer else step


def _linear_ticks(lo: float, hi: float, step: float) -> list[float]:
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(k0, k1 + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Decade ticks inside [lo, hi] (every n-th decade when there are many; the ends if there are none)."""
    k0, k1 = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    every = max(1, math.ceil((k1 - k0 + 1) / 8))
    ticks = [10.0**k for k in range(k0, k1 + 1) if (k - k0) % every == 0]
    return ticks if len(ticks) >= 2 else [lo, hi]


def _tick_label(v: float, step: float | None) -> str:
    """'1e-3' style for decades of a log axis (step None), fixed decimals from the step on a linear one."""
    if step is None:
        k = round(math.log10(v))
        if abs(10.0**k - v) <= 1e-9 * v:
            return {0: "1", 1: "10"}.get(k, f"1e{k}")
        return f"{v:.3g}"
    if abs(v) < step * 1e-6:
        v = 0.0
    if abs(v) >= 1e6:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def _axis_range(
    values: Sequence[float], log: bool, given: tuple[float, float] | None, integer: bool = False
) -> tuple[float, float, list[float], float | None]:
    """(lo, hi, ticks, step): the given range as is, else the data range padded and widened to whole ticks."""
    if given is not None:
        lo, hi = float(given[0]), float(given[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and (lo > 0 or not log)):
            raise ValueError(f"invalid axis range {given!r}")
    else:
        vals = [v for v in values if v > 0 or not log]
        lo, hi = (min(vals), max(vals)) if vals else ((1.0, 10.0) if log else (0.0, 1.0))
        if log:
            lo, hi = 10.0 ** math.floor(math.log10(lo) + 1e-9), 10.0 ** math.ceil(math.log10(hi) - 1e-9)
            lo, hi = (lo / 10, hi * 10) if lo >= hi else (lo, hi)
        elif lo == hi:
            pad = 1.0 if integer or lo == 0 else abs(lo) * 0.1
            lo, hi = (0.0 if integer and 0 <= lo < 1 else lo - pad), hi + pad
    if log:
        return lo, hi, _log_ticks(lo, hi), None
    step = _nice_step(hi - lo, integer)
    if given is None:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return lo, hi, _linear_ticks(lo, hi, step), step


class _Scale:
    """Maps data values on [lo, hi] (log10 when ``log``) to pixels p0..p1."""

    def __init__(self, lo: float, hi: float, log: bool, p0: float, p1: float) -> None:
        self.log, self.p0, self.p1 = log, p0, p1
        self.a, self.b = (math.log10(lo), math.log10(hi)) if log else (lo, hi)

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return min(max(self.p0 + (t - self.a) / (self.b - self.a) * (self.p1 - self.p0), -1e5), 1e5)


def _layout(width: int, height: int, labels: Sequence[str]) -> tuple[float, float, float, float, float]:
    """Plot box (left, top, right, bottom) and the legend's width, the legend sitting right of the plot."""
    longest = max((len(s) for s in labels), default=0)
    legend_w = min(max(60.0, 30.0 + 6.2 * longest), width * 0.3) if labels else 0.0
    left, top, bottom = 58.0, 30.0, height - 40.0
    return left, top, max(width - 14.0 - legend_w, left + 40.0), max(bottom, top + 40.0), legend_w


def _chrome(width: int, height: int, box: tuple[float, ...], title: str, x_label: str, y_label: str) -> list[str]:
    """Background, title and axis labels."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return [
        f'<rect class="background" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text class="chart-title" x="{_f(cx)}" y="19" text-anchor="middle" font-size="13" '
        f'font-weight="bold" fill="#222222">{_esc(title)}</text>',
        f'<text class="axis-label x" x="{_f(cx)}" y="{_f(height - 8.0)}" text-anchor="middle" font-size="12" '
        f'fill="#222222">{_esc(x_label)}</text>',
        f'<text class="axis-label y" x="0" y="0" transform="translate(15 {_f(cy)}) rotate(-90)" '
        f'text-anchor="middle" font-size="12" fill="#222222">{_esc(y_label)}</text>',
    ]


def _legend(entries: Sequence[tuple[str, str, str, bool]], box: tuple[float, ...], legend_w: float) -> list[str]:
    """One entry per (label, colour, dasharray, as_box): swatch and label, full label in a tooltip."""
    left, top, right, bottom = box
    row = min(16.0, (bottom - top) / max(len(entries), 1))
    chars = max(4, int((legend_w - 30.0) / 6.2 + 1e-6))
    x0, out = right + 10.0, ['<g class="legend">']
    for i, (label, colour, dash, as_box) in enumerate(entries):
        y = top + row * (i + 0.5)
        shown = label if len(label) <= chars else label[: chars - 1] + "…"
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        swatch = (
            f'<rect x="{_f(x0)}" y="{_f(y - 5)}" width="16" height="10" fill="{colour}" fill-opacity="0.35" '
            f'stroke="{colour}"/>'
            if as_box
            else f'<line x1="{_f(x0)}" y1="{_f(y)}" x2="{_f(x0 + 16)}" y2="{_f(y)}" stroke="{colour}" '
            f'stroke-width="2"{dash_attr}/>'
        )
        out.append(
            f'<g class="legend-entry" data-series="{_esc(label)}"><title>{_esc(label)}</title>{swatch}'
            f'<text x="{_f(x0 + 21)}" y="{_f(y)}" dy="0.35em" fill="#222222">{_esc(shown)}</text></g>'
        )
    return out + ["</g>"]


def _grid(sx: _Scale, xticks: list[float], xstep: float | None, sy: _Scale, yticks: list[float],
          ystep: float | None, box: tuple[float, ...]) -> list[str]:
    """Light grid lines and tick labels of both axes."""
    left, top, right, bottom = box
    out = ['<g class="grid" stroke="#e6e6e6" stroke-width="1">']
    out += [f'<line x1="{_f(sx(t))}" y1="{_f(top)}" x2="{_f(sx(t))}" y2="{_f(bottom)}"/>' for t in xticks]
    out += [f'<line x1="{_f(left)}" y1="{_f(sy(t))}" x2="{_f(right)}" y2="{_f(sy(t))}"/>' for t in yticks]
    out.append("</g>")
    out += [f'<text class="tick x" x="{_f(sx(t))}" y="{_f(bottom + 15)}" text-anchor="middle" fill="#444444">'
            f"{_tick_label(t, xstep)}</text>" for t in xticks]
    out += [f'<text class="tick y" x="{_f(left - 5)}" y="{_f(sy(t))}" dy="0.35em" text-anchor="end" '
            f'fill="#444444">{_tick_label(t, ystep)}</text>' for t in yticks]
    return out


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    """Wrap the body in the root element; the clip id is a hash of title and content."""
    content = "\n".join(body)
    clip = "clip-" + hashlib.sha1(f"{title}\0{width}x{height}\0{content}".encode()).hexdigest()[:12]
    return (
        f'<svg xmlns="{_NS}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_esc(title)}" class="chart" font-family="{FONT}" font-size="11">\n'
        f"<title>{_esc(title)}</title>\n{content.replace(_CLIP, clip)}\n</svg>"
    )


def _frame(box: tuple[float, ...]) -> str:
    left, top, right, bottom = box
    return (f'<rect class="frame" x="{_f(left)}" y="{_f(top)}" width="{_f(right - left)}" '
            f'height="{_f(bottom - top)}" fill="none" stroke="#333333" stroke-width="1"/>')


def _plot(width: int, height: int, title: str, x_label: str, y_label: str,
          entries: list[tuple[str, str, str, bool]], axes: tuple | None) -> str:
    """Assemble a chart; ``axes`` is None for the 'no data' chart."""
    left, top, right, bottom, legend_w = box5 = _layout(width, height, [e[0] for e in entries])
    box = box5[:4]
    body = _chrome(width, height, box, title, x_label, y_label)
    if axes is None:
        body.append(f'<text class="no-data" x="{_f((left + right) / 2)}" y="{_f((top + bottom) / 2)}" '
                    f'dy="0.35em" text-anchor="middle" font-size="13" fill="#777777">no data</text>')
    else:
        (xlo, xhi, xticks, xstep, xlog), (ylo, yhi, yticks, ystep, ylog), draw = axes
        sx, sy = _Scale(xlo, xhi, xlog, left, right), _Scale(ylo, yhi, ylog, bottom, top)
        body += _grid(sx, xticks, xstep, sy, yticks, ystep, box)
        body.append(f'<defs><clipPath id="{_CLIP}"><rect x="{_f(left - 4)}" y="{_f(top - 4)}" '
                    f'width="{_f(right - left + 8)}" height="{_f(bottom - top + 8)}"/></clipPath></defs>')
        inside, overlay = draw(sx, sy, box)
        body += [f'<g class="plot-area" clip-path="url(#{_CLIP})">', *inside, "</g>", *overlay]
    body.append(_frame(box))
    body += _legend(entries, box, legend_w) if entries else []
    return _svg(width, height, title, body)


def _segments(s: Series, x_log: bool, y_log: bool) -> list[list[tuple[float, float]]]:
    """Runs of finite points; non-finite points break a run, non-positive ones on a log axis are dropped."""
    if len(s.x) != len(s.y):
        raise ValueError(f"series {s.label!r}: {len(s.x)} x values but {len(s.y)} y values")
    segs: list[list[tuple[float, float]]] = [[]]
    for xv, yv in zip(s.x, s.y):
        x, y = _finite(xv), _finite(yv)
        if x is None or y is None:
            segs.append([])
        elif not ((x_log and x <= 0) or (y_log and y <= 0)):
            segs[-1].append((x, y))
    return [seg for seg in segs if seg]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               width: int = 560, height: int = 320, x_log: bool = False, y_log: bool = False,
               x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
               integer_x: bool = False, diagonal: bool = False,
               hlines: Sequence[tuple[str, float]] = ()) -> str:
    """Lines (with markers) of several series on shared axes, optionally log, with reference lines."""
    prepared = [(s, _segments(s, x_log, y_log), *_style(i, s.dashed)) for i, s in enumerate(series)]
    entries = [(s.label, colour, dash, False) for s, _, colour, dash in prepared]
    refs = [(label, v) for label, v in ((lb, _finite(v)) for lb, v in hlines) if v is not None and (v > 0 or not y_log)]
    points = [p for _, segs, _, _ in prepared for seg in segs for p in seg]
    if not points:
        return _plot(width, height, title, x_label, y_label, entries, None)
    xaxis = (*_axis_range([p[0] for p in points], x_log, x_range, integer_x and not x_log), x_log)
    yaxis = (*_axis_range([p[1] for p in points] + [v for _, v in refs], y_log, y_range), y_log)

    def draw(sx: _Scale, sy: _Scale, box: tuple[float, ...]) -> tuple[list[str], list[str]]:
        left, top, right, bottom = box
        out, labels = [], []
        lo, hi = max(xaxis[0], yaxis[0]), min(xaxis[1], yaxis[1])
        if diagonal and lo < hi:
            n = 64 if x_log or y_log else 1
            ts = np.geomspace(lo, hi, n + 1) if x_log or y_log else np.linspace(lo, hi, 2)
            pts = " ".join(f"{_f(sx(t))},{_f(sy(t))}" for t in ts)
            out.append(f'<polyline class="diagonal" points="{pts}" fill="none" stroke="#999999" '
                       f'stroke-width="1" stroke-dasharray="4 4"/>')
        for label, v in refs:
            out.append(f'<line class="hline" x1="{_f(left)}" y1="{_f(sy(v))}" x2="{_f(right)}" '
                       f'y2="{_f(sy(v))}" {_REF}/>')
            y = sy(v) - 4 if sy(v) - 4 > top + 10 else sy(v) + 12  # below the line when at the top edge
            labels.append(f'<text class="ref-label" x="{_f(right - 4)}" y="{_f(y)}" text-anchor="end" '
                          f'fill="#333333">{_esc(label)}</text>')
        for s, segs, colour, dash in prepared:
            name, dash_attr = _esc(s.label), f' stroke-dasharray="{dash}"' if dash else ""
            show_all = s.markers and sum(len(seg) for seg in segs) <= MAX_MARKERS
            for seg in segs:
                if len(seg) > 1:
                    pts = " ".join(f"{_f(sx(x))},{_f(sy(y))}" for x, y in seg)
                    out.append(f'<polyline class="series" data-series="{name}" points="{pts}" fill="none" '
                               f'stroke="{colour}" stroke-width="1.8" stroke-linejoin="round"{dash_attr}/>')
                if show_all or len(seg) == 1:
                    out += [f'<circle class="marker" data-series="{name}" cx="{_f(sx(x))}" cy="{_f(sy(y))}" '
                            f'r="2.5" fill="{colour}"/>' for x, y in seg]
        return out, labels

    return _plot(width, height, title, x_label, y_label, entries, (xaxis, yaxis, draw))


def histogram(groups: Sequence[tuple[str, Sequence[float]]], *, title: str, x_label: str,
              y_label: str = "fraction", bins: int = 30, x_range: tuple[float, float] | None = None,
              width: int = 560, height: int = 320, vlines: Sequence[tuple[str, float]] = ()) -> str:
    """Overlaid histograms on shared bins, each group normalised to fractions summing to 1."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    data = [(label, np.array([f for f in map(_finite, values) if f is not None], dtype=float))
            for label, values in groups]
    entries = [(label, *_style(i, False), True) for i, (label, _) in enumerate(data)]
    every = np.concatenate([v for _, v in data]) if data else np.empty(0)
    refs = [(label, v) for label, v in ((lb, _finite(v)) for lb, v in vlines) if v is not None]
    if every.size == 0:
        return _plot(width, height, title, x_label, y_label, entries, None)
    if x_range is not None:
        lo, hi = _axis_range([], False, x_range)[:2]
    else:
        lo, hi = float(every.min()), float(every.max())
        pad = 0.5 if lo == hi == 0 else abs(lo) * 0.05 if lo == hi else 0.0
        lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    fractions = []
    for _, v in data:
        counts = np.histogram(v, bins=edges)[0]
        fractions.append(counts / counts.sum() if counts.sum() else np.zeros(bins))
    xlo, xhi = (lo, hi) if x_range is not None else (min([lo] + [v for _, v in refs]), max([hi] + [v for _, v in refs]))
    xstep = _nice_step(xhi - xlo)
    top_frac = max(float(fr.max()) for fr in fractions) or 1.0
    xaxis = (xlo, xhi, _linear_ticks(xlo, xhi, xstep), xstep, False)
    yaxis = (*_axis_range([0.0, top_frac], False, None), False)

    def draw(sx: _Scale, sy: _Scale, box: tuple[float, ...]) -> tuple[list[str], list[str]]:
        left, top, right, bottom = box
        out, labels = [], []
        for (label, _), fr, (_, colour, _, _) in zip(data, fractions, entries):
            name, base = _esc(label), sy(0.0)
            for i, f in enumerate(fr):
                if f > 0:
                    x0, x1, y = sx(edges[i]), sx(edges[i + 1]), sy(f)
                    out.append(f'<rect class="hist" data-series="{name}" data-bin="{i}" data-fraction="{f:.6f}" '
                               f'x="{_f(x0)}" y="{_f(y)}" width="{_f(x1 - x0)}" height="{_f(base - y)}" '
                               f'fill="{colour}" fill-opacity="0.25"/>')
            steps = "".join(f" V{_f(sy(f))} H{_f(sx(edges[i + 1]))}" for i, f in enumerate(fr))
            out.append(f'<path class="hist-outline" data-series="{name}" d="M{_f(sx(edges[0]))},{_f(base)}{steps} '
                       f'V{_f(base)}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for i, (label, v) in enumerate(refs):
            out.append(f'<line class="vline" x1="{_f(sx(v))}" y1="{_f(top)}" x2="{_f(sx(v))}" '
                       f'y2="{_f(bottom)}" {_REF}/>')
            labels.append(f'<text class="ref-label" x="{_f(sx(v) + 3)}" y="{_f(top + 12 + 12 * (i % 4))}" '
                          f'fill="#333333">{_esc(label)}</text>')
        return out, labels

    return _plot(width, height, title, x_label, y_label, entries, (xaxis, yaxis, draw))
