"""Line charts as inline SVG text, for pages that must stand alone (the run report).

No plotting library: a report is opened years later on a machine without this one's packages,
and an SVG in the page needs nothing but a browser. A chart is an axis box with "nice" ticks
(1, 2 or 5 times a power of ten), light grid lines, a legend, and one polyline per series.
Non-finite values break a line rather than end the chart, and a long series is reduced to the
lowest and highest value per pixel column (peak downsampling, as the app's live plots do), so
a million-step run makes a page of a few hundred kilobytes that still shows every spike.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from workbench.plot_specs import COLORS

WIDTH, HEIGHT = 540, 300
SMALL = (350, 220)          # a chart of one metric with no plot of its own: three to a row
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 44      # margins round the axis box, in pixels
MARKERS_UP_TO = 100         # sparse series (evaluations) get a dot per point, as in the app
DASHES = ["", "6 4", "2 3", "8 3 2 3"]


@dataclass
class Line:
    label: str
    x: np.ndarray
    y: np.ndarray
    dashed: bool = False        # a reference level (a baseline), not a measurement
    joined: bool = True         # False: points only (one metric against another)


def nice_ticks(lo: float, hi: float, want: int = 5) -> list[float]:
    """Round values from about lo to hi, about `want` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, want)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if (hi - lo) / (m * power) <= want + 1)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v: float, step: float) -> str:
    """Enough digits to tell neighbouring ticks apart, and no more."""
    a = abs(v)
    if a < step * 1e-6:
        return "0"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div and step >= div / 100:
            return f"{v / div:.{_decimals(step / div)}f}{suffix}"
    if step < 1e-4:
        # Tiny steps (a learning rate, a value that barely moves): as many significant digits
        # as it takes to tell the value from its neighbour.
        return f"{v:.{max(2, math.floor(math.log10(a)) - math.floor(math.log10(step)) + 1)}g}"
    return f"{v:.{_decimals(step)}f}"


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0


def _range(values: list[np.ndarray]) -> tuple[float, float]:
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if len(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0          # a flat line sits in the middle, not on an edge
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def downsample(x: np.ndarray, y: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about 2 * columns points: each column's lowest and highest, in step order."""
    if len(x) <= 2 * columns:
        return x, y
    edges = np.linspace(0, len(x), columns + 1).astype(int)
    keep = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        seg = y[a:b]
        if not np.isfinite(seg).all():
            keep.extend(range(a, b))    # keep the gap a non-finite value makes
            continue
        i, j = a + int(np.argmin(seg)), a + int(np.argmax(seg))
        keep.extend(sorted({i, j}))
    idx = np.asarray(keep)
    return x[idx], y[idx]


def line_chart(title: str, lines: list[Line], x_label: str = "step", y_label: str = "",
               width: int = WIDTH, height: int = HEIGHT, legend: bool = True) -> str:
    """One chart as an <svg> element (no XML prolog: it goes inside an HTML page); without
    a legend when the caption already names its one line."""
    lines = [ln for ln in lines if len(ln.x)]
    x0, x1 = _range([ln.x for ln in lines])
    y0, y1 = _range([ln.y for ln in lines])
    box_w, box_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * box_w

    def py(y):
        return TOP + box_h - (y - y0) / (y1 - y0) * box_h

    # No xmlns: SVG inside HTML needs none, and the page then names no URL at all.
    out = [f'<svg class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>",
           f'<rect x="{LEFT}" y="{TOP}" width="{box_w}" height="{box_h}" fill="#fff" stroke="#999"/>']
    out += _x_axis(x0, x1, px, height, x_label)
    out += _y_axis(y0, y1, py, width, y_label)
    for i, ln in enumerate(lines):
        out += _series(ln, COLORS[i % len(COLORS)], DASHES[i // len(COLORS) % len(DASHES)], px, py, box_w)
    if legend:
        out += _legend(lines, width)
    out.append("</svg>")
    return "\n".join(out)


def _x_axis(x0, x1, px, height, label) -> list[str]:
    ticks = nice_ticks(x0, x1)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    base = height - BOTTOM
    out = []
    for t in ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{base}" stroke="#eee"/>'
                   f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" class="tick">'
                   f'{_e(tick_label(t, step))}</text>')
    out.append(f'<text x="{LEFT + (px(x1) - LEFT) / 2:.1f}" y="{height - 8}" text-anchor="middle" '
               f'class="axis">{_e(label)}</text>')
    return out


def _y_axis(y0, y1, py, width, label) -> list[str]:
    ticks = nice_ticks(y0, y1)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    out = []
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{width - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#666"/>'
                   f'<text x="{LEFT - 7}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                   f'{_e(tick_label(t, step))}</text>')
    if label:
        mid = TOP + (py(y0) - TOP) / 2
        out.append(f'<text x="12" y="{mid:.1f}" text-anchor="middle" class="axis" '
                   f'transform="rotate(-90 12 {mid:.1f})">{_e(label)}</text>')
    return out


def _series(ln: Line, color: str, dash: str, px, py, box_w: int) -> list[str]:
    x, y = downsample(np.asarray(ln.x, float), np.asarray(ln.y, float), box_w)
    dash = "4 3" if ln.dashed else dash
    out = []
    if ln.joined:
        for run in _finite_runs(x, y):
            pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[run], y[run]))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.6"'
                       + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
    if not ln.joined or len(x) <= MARKERS_UP_TO:
        ok = np.isfinite(x) & np.isfinite(y)
        out += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.6" fill="{color}"/>'
                for a, b in zip(x[ok], y[ok])]
    return out


def _finite_runs(x: np.ndarray, y: np.ndarray) -> list[slice]:
    """The stretches between non-finite values, each of two points or more."""
    ok = np.isfinite(x) & np.isfinite(y)
    runs, start = [], None
    for i, good in enumerate(ok.tolist() + [False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if i - start > 1:
                runs.append(slice(start, i))
            start = None
    return runs


def _legend(lines: list[Line], width: int) -> list[str]:
    """Swatches in a row above the axis box; what does not fit is cut with an ellipsis (the
    full name stays in the tooltip, and in the page's table of final values)."""
    out, x, right = [], LEFT, width - RIGHT
    for i, ln in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        room = right - x - 26
        if room < 40:
            break
        chars = int(room // 6.4)
        text = ln.label if len(ln.label) <= chars else ln.label[:max(1, chars - 1)] + "…"
        dash = ' stroke-dasharray="4 3"' if ln.dashed else ""
        swatch = (f'<line x1="{x}" y1="14" x2="{x + 18}" y2="14" stroke="{color}" stroke-width="2.5"{dash}/>'
                  if ln.joined else f'<circle cx="{x + 9}" cy="14" r="3" fill="{color}"/>')
        out.append(f'{swatch}<text x="{x + 22}" y="18" class="legend">{_e(text)}<title>{_e(ln.label)}</title></text>')
        x += 22 + int(6.4 * len(text)) + 16
    return out


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
