"""The report's plots, drawn as SVG text: lines, points, histogram bars and labelled
horizontal bars on linear or log axes, with ticks, a title and a legend.

No plotting library: a run's report used to spend ~1.5 s importing matplotlib and
rasterising six PNGs (measured on the 133k-row patches job, 2026-11-25), more than the
rest of a small job's report. SVG is also sharp at any zoom and is text in the page.

``svg(panels)`` draws one or more ``Panel``s side by side; each coordinate maps data
linearly (log10 first on a log axis) into the panel's plotting box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

# matplotlib's "tab10": distinguishable, and readable on white.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
GREY = "#bbbbbb"
FONT = "font-family='system-ui,sans-serif' font-size='11'"
CHAR_WIDTH = 6.2  # px per character at FONT's size, for the room a label needs
TICKS = 5  # at most about this many ticks an axis


@dataclass
class Series:
    """What to draw. ``kind``:
    - "line": y against x, a point marker each where ``markers``;
    - "points": a dot per (x, y);
    - "bars": a histogram, x the len(y) + 1 bin edges;
    - "hbars": one horizontal bar per category (``Panel.categories``), y its length;
    - "hline": a horizontal line at y[0] across the panel.
    """

    kind: str
    x: np.ndarray | None
    y: np.ndarray
    label: str | None = None
    colour: str | None = None  # default: the next colour of PALETTE
    markers: bool = False
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str = ""
    series: list[Series] = field(default_factory=list)
    log_y: bool = False
    integer_x: bool = False
    categories: list[str] | None = None  # hbars' names, first drawn at the top

    def add(self, kind: str, x, y, **style) -> Panel:
        x = None if x is None else np.asarray(x, np.float64)
        self.series.append(Series(kind, x, np.atleast_1d(np.asarray(y, np.float64)), **style))
        return self


def nice_ticks(lo: float, hi: float, count: int = TICKS, integer: bool = False) -> list[float]:
    """Round values covering [lo, hi], about ``count`` of them: the step is the range over
    ``count`` rounded to 1, 2 or 5 times a power of ten (Heckbert, "Nice numbers for
    graph labels", Graphics Gems, 1990)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    fraction = raw / power
    step = power * (1 if fraction < 1.5 else 2 if fraction < 3 else 5 if fraction < 7 else 10)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    count = int((hi - first) / step + 1e-9) + 1
    return [float(f"{first + i * step:.12g}") for i in range(count)]  # 0.6, not 0.6000000001


def tick_texts(values: list[float]) -> list[str]:
    """Short tick labels (0.5, 250, 1.25e+05): the fewest significant digits that keep
    the labels apart and read back as their values to a millionth of the step."""
    gaps = np.diff(np.asarray(values, np.float64))
    step = float(gaps.min()) if gaps.size and gaps.min() > 0 else max(abs(values[0]), 1.0)
    for digits in range(2, 13):
        texts = [_number(v, digits) for v in values]
        if len(set(texts)) == len(texts) and all(
            abs(float(t) - v) <= 1e-6 * step for t, v in zip(texts, values, strict=True)
        ):
            return texts
    return [repr(v) for v in values]


def _number(v: float, digits: int) -> str:
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5 and v == round(v):
        return str(round(v))
    return f"{v:.{digits}g}"


class _Scale:
    """Data to pixels along one axis: [lo, hi] onto [a, b] (``place``), log10 first when
    ``log``."""

    a, b = 0.0, 1.0

    def __init__(self, lo: float, hi: float, log: bool = False):
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        if self.hi <= self.lo:  # one value: centre it, widened by 5% of it (or by 0.5)
            margin = 0.5 if log else max(0.05 * abs(self.lo), 0.5)
            self.lo, self.hi = self.lo - margin, self.hi + margin

    def place(self, a: float, b: float) -> None:
        """Map onto pixels [a, b] (b < a for a y axis: pixels grow downwards)."""
        self.a, self.b = a, b

    def __call__(self, v: np.ndarray | float) -> np.ndarray:
        v = np.log10(v) if self.log else np.asarray(v, np.float64)
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self, integer: bool = False) -> list[float]:
        if not self.log:
            return nice_ticks(self.lo, self.hi, integer=integer)
        # Powers of ten; 2 and 5 times them too where the axis spans under three decades,
        # every few decades where it spans many.
        span = self.hi - self.lo
        steps = (1, 2, 5) if span < 3 else (1,)
        every = max(1, math.ceil(span / 2 / TICKS))
        decades = range(math.floor(self.lo), math.ceil(self.hi) + 1, every)
        ticks = [m * 10.0**e for e in decades for m in steps]
        ticks = [t for t in ticks if self.lo - 1e-9 <= math.log10(t) <= self.hi + 1e-9]
        if len(ticks) < 3:  # a fraction of a decade: round values, as on a linear axis
            ticks = [t for t in nice_ticks(10**self.lo, 10**self.hi) if t > 0]
        return ticks


def _extent(values: list[np.ndarray], log: bool, pad: float) -> tuple[float, float]:
    v = np.concatenate([np.ravel(a) for a in values]) if values else np.zeros(1)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if v.size == 0:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if log:
        return lo / 10**pad, hi * 10**pad
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _panel(p: Panel, left: float, width: float, height: float) -> list[str]:
    """One panel's elements, its box starting at x = ``left``."""
    out: list[str] = []
    plotted = [s for s in p.series if s.kind != "hline"]
    hist = any(s.kind == "bars" for s in plotted)
    if hist and p.log_y:
        raise ValueError("histogram bars start at 0: they need a linear y axis")
    if p.categories is not None:
        values = np.concatenate([s.y for s in plotted]) if plotted else np.zeros(0)
        top = float(np.max(values[np.isfinite(values)], initial=0.0))
        xs = _Scale(0.0, (top if top > 0 else 1.0) * 1.05)
        ys = _Scale(-0.5, len(p.categories) - 0.5)
        names = p.categories
    else:
        xs = _Scale(*_extent([s.x for s in plotted], False, 0 if hist else 0.03))
        lo, hi = _extent([s.y for s in p.series], p.log_y, 0.05)
        ys = _Scale(0.0, max(hi, 1.0), False) if hist else _Scale(lo, hi, p.log_y)
        yticks = ys.ticks()
        names = tick_texts(yticks)
    # Room on the left for the longest tick label or category, and the axis label.
    margin_l = (22 if p.ylabel else 6) + 8 + CHAR_WIDTH * max(map(len, names), default=1)
    x0, y0, x1, y1 = left + margin_l, 26.0, left + width - 14, height - 40
    xs.place(x0, x1)
    if p.categories is None:
        ys.place(y1, y0)
    else:
        ys.place(y0, y1)
    out.append(f"<rect x='{x0:.1f}' y='{y0:.1f}' width='{x1 - x0:.1f}' height='{y1 - y0:.1f}' "
               "fill='none' stroke='#888'/>")  # fmt: skip
    xticks = xs.ticks(p.integer_x)
    for t, text in zip(xticks, tick_texts(xticks), strict=True):
        x = float(xs(t))
        out.append(f"<line x1='{x:.1f}' y1='{y0}' x2='{x:.1f}' y2='{y1}' stroke='#eee'/>")
        out.append(f"<text x='{x:.1f}' y='{y1 + 14}' text-anchor='middle'>{text}</text>")
    if p.categories is not None:
        for i, name in enumerate(p.categories):
            out.append(f"<text x='{x0 - 6}' y='{float(ys(i)) + 4:.1f}' text-anchor='end'>"
                       f"{escape(name)}</text>")  # fmt: skip
    else:
        for t, text in zip(yticks, names, strict=True):
            y = float(ys(t))
            out.append(f"<line x1='{x0}' y1='{y:.1f}' x2='{x1}' y2='{y:.1f}' stroke='#eee'/>")
            out.append(f"<text x='{x0 - 5}' y='{y + 4:.1f}' text-anchor='end'>{text}</text>")
    legend = []
    for i, s in enumerate(p.series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        dash = " stroke-dasharray='5 3'" if s.dashed else ""
        marks = _marks(s, colour, dash, xs, ys, (x0, y0, x1, y1), p.log_y)
        if s.kind == "hline" and not marks:
            continue  # a line with no place on this axis has no legend entry either
        out += marks
        if s.label:
            legend.append((s.label, colour, dash))
    out += _legend(legend, x1)
    out.append(f"<text x='{(x0 + x1) / 2:.1f}' y='16' text-anchor='middle' font-weight='bold'>"
               f"{escape(p.title)}</text>")  # fmt: skip
    out.append(f"<text x='{(x0 + x1) / 2:.1f}' y='{height - 8}' text-anchor='middle'>"
               f"{escape(p.xlabel)}</text>")  # fmt: skip
    if p.ylabel:
        cy = (y0 + y1) / 2
        out.append(f"<text transform='translate({left + 12},{cy:.1f}) rotate(-90)' "
                   f"text-anchor='middle'>{escape(p.ylabel)}</text>")  # fmt: skip
    return out


def _marks(
    s: Series, colour: str, dash: str, xs: _Scale, ys: _Scale, box: tuple, log_y: bool
) -> list[str]:
    """One series' elements in the plotting box (x0, y0, x1, y1)."""
    x0, _, x1, y1 = box
    if s.kind in ("line", "points"):  # a point without a place on the axes is left out
        shown = np.isfinite(s.x) & np.isfinite(s.y) & ((s.y > 0) if log_y else True)
        px, py = xs(s.x[shown]), ys(s.y[shown])
        if s.kind == "points":
            return [f"<circle class='point' cx='{a:.1f}' cy='{b:.1f}' r='1.6' fill='{colour}'/>"
                    for a, b in zip(px, py, strict=True)]  # fmt: skip
        xy = list(zip(*_thin(px, py), strict=True))
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
        out = [f"<polyline class='line' points='{pts}' fill='none' stroke='{colour}' "
               f"stroke-width='1.5'{dash}/>"]  # fmt: skip
        if s.markers:
            out += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='{colour}'/>"
                    for a, b in xy]  # fmt: skip
        return out
    if s.kind == "bars":
        left_px, right_px, top = xs(s.x[:-1]), xs(s.x[1:]), ys(s.y)
        return [f"<rect class='bar' x='{a:.1f}' y='{t:.1f}' width='{max(b - a, 0.5):.1f}' "
                f"height='{y1 - t:.1f}' fill='{colour}'/>"
                for a, b, t in zip(left_px, right_px, top, strict=True)]  # fmt: skip
    if s.kind == "hbars":
        half = 0.35 * (float(ys(1)) - float(ys(0)))
        return [f"<rect class='bar' x='{x0}' y='{float(ys(j)) - half:.1f}' "
                f"width='{max(float(xs(v)) - x0, 0.0):.1f}' height='{2 * half:.1f}' "
                f"fill='{colour}'/>"
                for j, v in enumerate(s.y) if np.isfinite(v)]  # fmt: skip
    if s.kind == "hline":
        if not np.isfinite(s.y[0]) or (log_y and s.y[0] <= 0):
            return []  # no place on this axis
        y = float(ys(s.y[0]))
        return [f"<line x1='{x0}' y1='{y:.1f}' x2='{x1}' y2='{y:.1f}' stroke='{colour}'{dash}/>"]
    raise ValueError(f"unknown series kind {s.kind!r}")


def _thin(px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A line of many points drawn left to right (cluster sizes at large k) as at most
    four a pixel column, its first, last, lowest and highest there, in order: the same
    picture in a bounded page (a vertex per cluster at k = 65,536 wrote 1.5 MB of SVG)."""
    if len(px) <= 4 * (float(px[-1] - px[0]) + 1) or np.any(np.diff(px) < 0):
        return px, py  # few enough, or not drawn left to right
    column = np.floor(px - px[0]).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], len(px)]
    keep = set()
    for a, b in zip(starts, ends, strict=True):
        part = py[a:b]
        keep.update((a, b - 1, a + int(np.argmin(part)), a + int(np.argmax(part))))
    picked = np.array(sorted(keep))
    return px[picked], py[picked]


def _legend(entries: list[tuple[str, str, str]], right: float) -> list[str]:
    """The series' names in the plotting box's top right corner."""
    if not entries:
        return []
    width = 30 + CHAR_WIDTH * max(len(name) for name, _, _ in entries)
    left = right - width - 6
    out = [f"<rect x='{left:.1f}' y='30' width='{width:.1f}' height='{8 + 15 * len(entries)}' "
           "fill='white' fill-opacity='0.85' stroke='#ccc'/>"]  # fmt: skip
    for i, (name, colour, dash) in enumerate(entries):
        y = 42 + 15 * i
        out.append(f"<line x1='{left + 6:.1f}' y1='{y - 4}' x2='{left + 22:.1f}' y2='{y - 4}' "
                   f"stroke='{colour}' stroke-width='3'{dash}/>")  # fmt: skip
        out.append(f"<text x='{left + 27:.1f}' y='{y}'>{escape(name)}</text>")
    return out


def svg(panels: Panel | list[Panel], width: int = 640, height: int = 320) -> str:
    """An ``<svg>`` element of the panels side by side, each ``width`` x ``height`` px."""
    panels = [panels] if isinstance(panels, Panel) else panels
    body = []
    for i, p in enumerate(panels):
        body += _panel(p, i * width, width, height)
    total = width * len(panels)
    title = escape(" / ".join(p.title for p in panels))
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' role='img' width='{total}' height='{height}' "
        f"viewBox='0 0 {total} {height}' {FONT}><title>{title}</title>" + "".join(body) + "</svg>"
    )
