"""Live metric plots: a grid of pyqtgraph plots per stage, fed by the engine's `metrics` events.

Events arrive far faster than a screen needs them (a step every few milliseconds on a GPU), so
`add_event` only appends to numpy buffers (workbench/history.py) and marks the grid dirty; a
~15 Hz timer hands the buffers to the curves, and only the curves whose series changed. Curves
draw with peak downsampling and clip-to-view, as in pyqtgraph's examples/scrollingPlots.py, so
pyqtgraph draws about as many points as a plot is pixels wide however long the run. When a
redraw still costs more than UI_SHARE of the interval (a million points, a slow machine), the
timer slows down instead of starving the UI.

Which plots a stage gets is data (`PLOT_SPECS`, in workbench/plot_specs.py, which the HTML
report draws from too), built from the keys the engine emits. Any other key a run emits
(per-task SFT accuracies, PPO score quantiles, timings, memory) can be shown in the last plot,
chosen from the "Other metrics" list singly or by prefix group ("eval/acc/*"), so a metric
added to the engine is visible without a UI change.
"""
from __future__ import annotations

import html
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, QTimer
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QLabel, QScrollArea,
                               QVBoxLayout, QWidget)

from ui.plot_figures import FIGURES, FigureTable
from ui.plot_widgets import MIN_PLOT_HEIGHT, CountAxis, PaintClock, ScrollingGrid, TimedPlot
from workbench.history import TOKENS, RunHistory, Series  # noqa: F401 - Series is re-exported
from workbench.plot_specs import COLORS, PLOT_SPECS, PLOT_X  # noqa: F401 - re-exported

REDRAW_MS = 66              # ~15 Hz: smooth to the eye, a small share of the UI thread
SLOWEST_MS = 2000           # the longest the adaptive interval grows to
UI_SHARE = 0.3              # the most of the UI thread that redrawing plots may take
MARKERS_UP_TO = 100         # sparse series (evaluations, one-off stats) get point markers
OTHER = "Other metrics"

_DASHES = [Qt.SolidLine, Qt.DashLine, Qt.DotLine, Qt.DashDotLine]
_GLYPHS = {Qt.SolidLine: "━━", Qt.DashLine: "╍╍", Qt.DotLine: "┉┉", Qt.DashDotLine: "━╍",
           Qt.NoPen: "●"}          # points only: a plot against another metric (PLOT_X)


def _padded(v: float, step: bool) -> tuple[float, float]:
    """A range around one value: ±10% (at least ±1 on a step axis), from zero up for zero."""
    pad = max(abs(v) * 0.1, 1.0 if step else 0.0) or 1.0
    lo, hi = v - pad, v + pad
    if v >= 0 > lo:
        lo = 0.0
    return lo, hi


@dataclass
class _Cell:
    title: str
    keys: list[str]
    widget: pg.PlotWidget
    legend: QLabel
    frame: QWidget
    curves: dict = field(default_factory=dict)      # (run index, key) -> PlotDataItem
    drawn: dict = field(default_factory=dict)       # (run index, key) -> what the curve holds
    styles: dict = field(default_factory=dict)      # (run index, key) -> (colour index, dash)
    entries: list = field(default_factory=list)     # the legend's entries, as _legend_entries
    pinned: set = field(default_factory=set)        # axes given a range by _fit, not autorange
    ds: int = 1                                     # the downsampling factor set by _downsample
    x_key: Optional[str] = None                     # drawn against this metric (PLOT_X), not the step


class PlotGrid(QWidget):
    """The plots of one stage, fed live (`add_event`), from a file (`load_events`), or overlaying
    several finished runs (`set_overlay`, for the runs browser)."""

    def __init__(self, stage: str, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.stage = stage
        self.history = RunHistory()
        self._overlay: Optional[list[tuple[str, RunHistory]]] = None
        self._x_mode = "step"
        self._dirty = False
        self._other_keys: set[str] = set()
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._tick)
        self._clock = PaintClock()
        self._redraw_s = 0.0
        self._next_cell = 0         # where a redraw limited to some plots goes on from
        self._round_s = 0.0         # seconds a round of one-plot redraws has cost so far
        self._interval = REDRAW_MS  # between rounds, as the throttle last set it

        self.other_box = QComboBox()
        self.other_box.setPlaceholderText("choose a metric")
        self.other_box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.other_box.currentIndexChanged.connect(self._other_chosen)
        self.x_axis_box = QComboBox()
        self.x_axis_box.addItem("Step", "step")
        self.x_axis_box.addItem("Tokens", "tokens")
        self.x_axis_box.currentIndexChanged.connect(self._x_axis_chosen)

        # A stage with no plots of its own (a new one) shows every metric under "Other".
        own = PLOT_SPECS.get(stage, [])
        specs = own + ([] if stage in FIGURES else [(OTHER, [])])
        against = PLOT_X.get(stage, {})
        self._cells = {title: self._make_cell(title, keys, against.get(title)) for title, keys in specs}
        self._spec_keys = {k for _, keys in own for k in keys}
        self.figures = FigureTable(stage)
        self.figures.setVisible(stage in FIGURES)
        if stage in FIGURES:
            self.figures.show_runs(self._runs())

        # The chooser sits in the bar, not in its cell, so every plot in the grid is the same size.
        bar = QHBoxLayout()
        bar.addWidget(QLabel(OTHER))
        bar.addWidget(self.other_box, 1)
        bar.addStretch(2)
        bar.addWidget(QLabel("x axis"))
        bar.addWidget(self.x_axis_box)
        grid = ScrollingGrid()
        grid.setSpacing(6)
        cols = 2 if len(specs) in (2, 4) else 3
        for i, cell in enumerate(self._cells.values()):
            cell.frame.setMinimumHeight(MIN_PLOT_HEIGHT)
            grid.addWidget(cell.frame, i // cols, i % cols)
        for c in range(cols):
            grid.setColumnStretch(c, 1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        if stage in FIGURES:
            outer.addWidget(self.figures, 1)
        else:
            outer.addLayout(bar)
            # PPO's and GRPO's dozen plots in a short space scroll rather than shrink to slivers.
            holder = QWidget()
            holder.setLayout(grid)
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(holder)
            outer.addWidget(scroll, 1)
        self._apply_palette()

    # ----- feeding data

    def add_event(self, ev: dict) -> None:
        """Any engine event; metrics are buffered and drawn on the next redraw tick."""
        if self.history.add_event(ev) and self._overlay is None:
            self._schedule()

    def load_events(self, events: Iterable[dict]) -> None:
        """A run's whole event list at once (reopening a run): much faster than add_event."""
        if self.history.add_events(events) and self._overlay is None:
            self._schedule()

    def set_history(self, history: RunHistory) -> None:
        """Show a history built elsewhere (off the UI thread, for a long finished run)."""
        self.history = history
        self._overlay = None
        self._reset_curves()
        self._schedule()

    def set_overlay(self, runs: Optional[list[tuple[str, RunHistory]]]) -> None:
        """Draw these runs together, one colour per run (None or []: back to this grid's own)."""
        self._overlay = list(runs) if runs else None
        self._reset_curves()
        self._schedule()

    def refresh(self) -> None:
        """Redraw soon: for overlaid histories that their owner appended to."""
        self._schedule()

    def clear(self) -> None:
        self.history = RunHistory()
        self._overlay = None
        self._other_keys = set()
        self.other_box.blockSignals(True)
        self.other_box.clear()
        self.other_box.blockSignals(False)
        if OTHER in self._cells:
            self._cells[OTHER].keys = []
        self._reset_curves()

    def set_x_axis(self, mode: str) -> None:
        if mode not in ("step", "tokens"):
            raise ValueError(f"x axis must be 'step' or 'tokens', not {mode!r}")
        if mode == self._x_mode:
            return
        self._x_mode = mode
        self.x_axis_box.blockSignals(True)
        self.x_axis_box.setCurrentIndex(self.x_axis_box.findData(mode))
        self.x_axis_box.blockSignals(False)
        for cell in self._cells.values():
            cell.drawn.clear()
            cell.pinned.discard("x")
            cell.widget.getPlotItem().enableAutoRange(x=True)
        self._schedule()

    def _x_axis_chosen(self, index: int) -> None:
        self.set_x_axis(self.x_axis_box.itemData(index))

    def x_axis(self) -> str:
        return self._x_mode

    def redraw_interval_ms(self) -> int:
        """The live redraw period now: REDRAW_MS, or longer while redraws are expensive."""
        return self._interval

    # ----- inspection (tests, and panels that show the latest value)

    def titles(self) -> list[str]:
        return list(self._cells)

    def plot_item(self, title: str) -> pg.PlotItem:
        return self._cells[title].widget.getPlotItem()

    def curve(self, title: str, key: str, run: int = 0) -> pg.PlotDataItem:
        """The curve of `key` in plot `title` (run: its index in the overlay); KeyError if none."""
        return self._cells[title].curves[(run, key)]

    def curve_data(self, title: str, key: str, run: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The full data handed to a curve (before downsampling and clipping)."""
        c = self.curve(title, key, run)
        return c.xData, c.yData

    def legend(self, title: str) -> QLabel:
        """The legend under plot `title`: rich text, one link per entry (click: hide/show)."""
        return self._cells[title].legend

    def other_choices(self) -> list[str]:
        return [self.other_box.itemText(i) for i in range(self.other_box.count())]

    def show_other(self, choice: str) -> None:
        """Show one metric, or a prefix group such as "score/*", in the Other metrics plot."""
        i = self.other_box.findText(choice)
        if i < 0:
            raise KeyError(choice)
        self.other_box.setCurrentIndex(i)

    # ----- drawing

    def _runs(self) -> list[tuple[str, RunHistory]]:
        return self._overlay if self._overlay is not None else [("", self.history)]

    def _schedule(self) -> None:
        self._dirty = True
        if not self._timer.isActive() and self.isVisible():
            self._timer.start()

    def _tick(self) -> None:
        # A hidden grid (another stage's page) waits for showEvent instead of drawing unseen.
        if (not self._dirty and self._next_cell == 0) or not self.isVisible():
            self._timer.stop()
            return
        if self._next_cell == 0:
            self._dirty = False     # a round takes what came so far; what comes during it, the next
        # One plot per tick: Qt repaints every changed plot of a window in one pass, and nine
        # plots at once held the UI thread for 60-90 ms while a job streamed; one at a time, an
        # input event waits for one plot's repaint at most. Within a round the next plot follows
        # as soon as the loop is idle; rounds are spaced by the throttle below.
        self._round_s += self._redraw_s + self._clock.take()    # the last tick and its repaints
        t = time.perf_counter()
        more = self.redraw(limit=1)
        self._redraw_s = time.perf_counter() - t
        if more:
            self._timer.setInterval(0)
            return
        # Orange-style throttle: when a round of redraws and repaints cost more than UI_SHARE of
        # the interval (a million points, many runs, a slow machine), rounds come less often
        # rather than starve input and the event stream.
        self._interval = int(min(SLOWEST_MS, max(REDRAW_MS, self._round_s * 1000 / UI_SHARE)))
        self._round_s = 0.0
        self._timer.setInterval(self._interval)

    def redraw(self, limit: Optional[int] = None) -> bool:
        """Hand every changed series to its curve now; with `limit`, those of at most that
        many plots, from where the last limited call stopped. True if plots are left in the
        round (changed or not: they are looked at by the next call)."""
        if limit is None:
            self._dirty = False
        runs = self._runs()
        if self.stage in FIGURES:
            self.figures.show_runs(runs)
            return False
        self._update_other_choices(runs)
        overlay = self._overlay is not None
        cells = list(self._cells.values())
        # A limited call goes on from where the last one stopped, to the last plot: a round.
        start = min(self._next_cell, len(cells)) if limit else 0
        updated, more = 0, False
        for i, cell in enumerate(cells[start:]):
            if limit is not None and updated >= limit:
                self._next_cell, more = start + i, True
                break
            changed = False
            for ri, (_label, hist) in enumerate(runs):
                tok = hist.series.get(TOKENS) if self._x_mode == "tokens" and cell.x_key is None else None
                xs = hist.series.get(cell.x_key) if cell.x_key else None
                if cell.x_key and xs is None:
                    continue
                for ki, key in enumerate(cell.keys):
                    s = hist.series.get(key)
                    if s is None or not len(s):
                        continue
                    stamp = (s.version, tok.version if tok is not None else None, xs.version if xs else None)
                    if key.endswith("_baseline"):
                        # A baseline spans the plot's other curves, so it moves when they do.
                        stamp = (stamp, tuple(hist.series[k].version for k in cell.keys if k in hist.series))
                    if cell.drawn.get((ri, key)) == stamp:
                        continue
                    curve = cell.curves.get((ri, key))
                    if curve is None:
                        dash = Qt.NoPen if cell.x_key else _DASHES[ki % len(_DASHES)] if overlay else (
                            Qt.DashLine if key.endswith("_baseline") else Qt.SolidLine)
                        curve = cell.widget.plot(symbolPen=None)
                        cell.curves[(ri, key)] = curve
                        cell.styles[(ri, key)] = (ri if overlay else ki, dash)
                        self._style_curve(curve, cell.styles[(ri, key)])
                        self._update_legend(cell)
                    x, y = hist.against(cell.x_key, key) if cell.x_key else hist.arrays(key, self._x_mode)
                    if key.endswith("_baseline"):
                        x, y = self._baseline(cell, hist, x, y)
                    if s.nonfinite:
                        # A gap where a value was nan or inf, so the view's range stays finite;
                        # nothing at all while no value is finite (pyqtgraph's range code warns
                        # on an all-NaN array, inside a paint call where a warning can't surface).
                        finite = np.isfinite(y)
                        x, y = (x, np.where(finite, y, np.nan)) if finite.any() else (x[:0], y[:0])
                    markers = bool(cell.x_key) or (len(s) <= MARKERS_UP_TO and not key.endswith("_baseline"))
                    # The series knows whether it holds a non-finite value: spare pyqtgraph its
                    # own scan of every point on every redraw.
                    curve.setData(x, y, symbol="o" if markers else None, symbolSize=5,
                                  skipFiniteCheck=not s.nonfinite)
                    cell.drawn[(ri, key)] = stamp
                    changed = True
            if changed:
                updated += 1
                self._downsample(cell)
                self._fit(cell)
        else:
            self._next_cell = 0
        # From every run, not only the plots this call visited: a limited call sees a few.
        any_tokens = self._x_mode == "tokens" and any(
            hist.series.get(TOKENS) is not None for _label, hist in runs)
        label = "tokens" if any_tokens else "step"
        for cell in self._cells.values():
            if cell.x_key:
                continue        # labelled once, with its metric
            axis = cell.widget.getPlotItem().getAxis("bottom")
            if axis.labelText != label:
                axis.setLabel(label)
        return more

    def _baseline(self, cell: _Cell, hist: RunHistory, x: np.ndarray, y: np.ndarray):
        """A reference value measured once (the unigram model's loss), drawn as a level line
        from where it was measured to the end of the plot's other curves."""
        ends = [hist.arrays(k, self._x_mode)[0][-1] for k in cell.keys
                if k in hist.series and len(hist.series[k]) and not k.endswith("_baseline")]
        end = max(ends + [x[-1]])
        return np.array([x[0], end]), np.array([y[-1], y[-1]])

    def _downsample(self, cell: _Cell) -> None:
        """About two points per pixel of width (peak mode keeps each bin's min and max)."""
        if cell.x_key:
            return
        n = max((len(c.xData) for c in cell.curves.values() if c.xData is not None), default=0)
        ds = max(1, n // max(1, cell.widget.width()))
        if ds != cell.ds:
            cell.widget.getPlotItem().setDownsampling(ds=ds, auto=False, mode="peak")
            cell.ds = ds

    def _fit(self, cell: _Cell) -> None:
        """An axis whose data is one value (a single point, a constant series) gets a range
        padded around it, never below zero for a value that is not: pyqtgraph's autorange
        would centre it in a range as wide as the last one, -0.5..0.5 on a new plot."""
        box = cell.widget.getPlotItem().getViewBox()
        data = [(c.xData, c.yData) for c in cell.curves.values()
                if c.isVisible() and c.xData is not None and len(c.xData)]
        for i, axis in enumerate(("x", "y")):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # an all-NaN series: no bounds
                bounds = [(np.nanmin(d[i]), np.nanmax(d[i])) for d in data]
            bounds = [(a, b) for a, b in bounds if np.isfinite(a) and np.isfinite(b)]
            lo = min((float(a) for a, _ in bounds), default=None)
            hi = max((float(b) for _, b in bounds), default=None)
            if lo is not None and lo == hi:
                box.setRange(**{f"{axis}Range": _padded(lo, step=axis == "x")}, padding=0)
                cell.pinned.add(axis)
            elif axis in cell.pinned:
                cell.pinned.discard(axis)
                box.enableAutoRange(axis=box.XAxis if axis == "x" else box.YAxis)

    def _reset_curves(self) -> None:
        for cell in self._cells.values():
            self._empty(cell)
        self._dirty = True

    def _empty(self, cell: _Cell) -> None:
        for curve in cell.curves.values():
            cell.widget.removeItem(curve)
        cell.curves.clear()
        cell.drawn.clear()
        cell.styles.clear()
        cell.pinned.clear()
        # With nothing to fit, autorange keeps the last run's ranges: an empty plot of a new run
        # would show the old one's axes. A new plot's own range instead.
        item = cell.widget.getPlotItem()
        item.getViewBox().setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
        item.enableAutoRange()
        self._update_legend(cell)

    def _update_other_choices(self, runs) -> None:
        keys = set().union(*(h.series.keys() for _, h in runs)) - self._spec_keys
        if keys == self._other_keys:
            return
        self._other_keys = keys
        groups: dict[str, int] = {}
        for k in keys:
            g = k.rsplit("/", 1)[0]
            groups[g] = groups.get(g, 0) + 1
        choices = sorted(keys | {f"{g}/*" for g, n in groups.items() if n > 1})
        current = self.other_box.currentText()
        if not current and choices:
            # Not an empty plot until someone picks: the first group (a task kind's accuracy each).
            current = next((c for c in choices if c.endswith("/*")), choices[0])
            self._title_other(current)
        self.other_box.blockSignals(True)
        self.other_box.clear()
        self.other_box.addItems(choices)
        self.other_box.setCurrentIndex(self.other_box.findText(current) if current else -1)
        self.other_box.blockSignals(False)
        # A chosen group takes in members that appeared since (a new task kind's accuracy).
        self._cells[OTHER].keys = self._keys_for(current)

    def _keys_for(self, choice: str) -> list[str]:
        if choice.endswith("/*"):
            prefix = choice[:-1]
            return sorted(k for k in self._other_keys if k.startswith(prefix) and "/" not in k[len(prefix):])
        return [choice] if choice in self._other_keys else []

    def _other_chosen(self, index: int) -> None:
        cell = self._cells[OTHER]
        self._empty(cell)
        choice = self.other_box.itemText(index) if index >= 0 else ""
        cell.keys = self._keys_for(choice)
        self._title_other(choice)
        self._schedule()

    def _title_other(self, choice: str) -> None:
        self._cells[OTHER].widget.getPlotItem().setTitle(
            choice or OTHER, color=self.palette().color(QPalette.Text).name(), size="9pt")

    # ----- legend: a label under the plot, so it never hides the newest points (pyqtgraph's
    # legend floats over the data, and the data grows toward it)

    def _legend_entries(self, cell: _Cell) -> list[tuple[str, Optional[QColor], object, list]]:
        """(name, colour or None for a neutral swatch, line style, the curves it stands for).

        One run: an entry per metric. Several runs: an entry per run (its colour) and one per
        metric (its line style), so five runs of three metrics make eight entries, not fifteen.
        """
        if self._overlay is None:
            return [(key, self._color(ci), dash, [(ri, key)]) for (ri, key), (ci, dash) in cell.styles.items()]
        runs: dict[int, list] = {}
        keys: dict[str, tuple] = {}
        for (ri, key), (_ci, dash) in cell.styles.items():
            runs.setdefault(ri, []).append((ri, key))
            keys.setdefault(key, (dash, []))[1].append((ri, key))
        entries = [(self._overlay[ri][0], self._color(ri), Qt.SolidLine, ids) for ri, ids in sorted(runs.items())]
        if len(keys) > 1:
            entries += [(key, None, dash, ids) for key, (dash, ids) in keys.items()]
        return entries

    def _update_legend(self, cell: _Cell) -> None:
        fg = self.palette().color(QPalette.Text)
        muted = QColor(fg)
        muted.setAlpha(110)
        parts = []
        where = list(self._cells).index(cell.title) if cell.title in self._cells else 0
        cell.entries = self._legend_entries(cell)
        # A group's plot is titled with its prefix ("eval/acc/*"): its members go by the rest
        # ("add", "sort"), so eleven task kinds take a line or two, not the plot's height.
        group = self.other_box.currentText()[:-1] if cell.title == OTHER and \
            self.other_box.currentText().endswith("/*") else None
        for i, (name, color, dash, ids) in enumerate(cell.entries):
            if group and name.startswith(group):
                name = name[len(group):]
            shown = any(cell.curves[ident].isVisible() for ident in ids)
            text = (fg if shown else muted).name(QColor.HexArgb)
            swatch = (color or fg).name(QColor.HexArgb) if shown else muted.name(QColor.HexArgb)
            decoration = "none" if shown else "line-through"
            # Non-breaking inside an entry (a word joiner after each "/", where Qt would break),
            # plain spaces between: lines wrap between entries.
            label = html.escape(name).replace(" ", "&nbsp;").replace("/", "/\u2060")
            parts.append(f'<a href="{where}/{i}" style="text-decoration:none">'
                         f'<span style="color:{swatch}">{_GLYPHS[dash]}</span>&nbsp;'
                         f'<span style="color:{text}; text-decoration:{decoration}">{label}</span></a>')
        # A non-breaking space keeps an empty legend one line high: plots stay aligned in a row.
        cell.legend.setText(" &nbsp; ".join(parts) or "&nbsp;")

    def _toggle_curve(self, link: str) -> None:
        """Clicking a legend entry hides or shows its curves (and the y range follows)."""
        where, entry = (int(part) for part in link.split("/"))
        cell = list(self._cells.values())[where]
        ids = cell.entries[entry][3]
        show = not any(cell.curves[ident].isVisible() for ident in ids)
        for ident in ids:
            cell.curves[ident].setVisible(show)
        cell.widget.getPlotItem().enableAutoRange(y=True)
        cell.pinned.discard("y")
        self._fit(cell)
        self._update_legend(cell)

    # ----- look

    def _make_cell(self, title: str, keys: list[str], against: Optional[tuple[str, str]] = None) -> _Cell:
        w = TimedPlot(self._clock, axisItems={"bottom": CountAxis("bottom", integers=against is None),
                                              "left": CountAxis("left")})
        w.setMinimumSize(200, 90)
        p = w.getPlotItem()
        # Downsampling is set from the data's length and the plot's width (_downsample), not
        # pyqtgraph's auto mode: that one follows the view range, which autorange takes from the
        # downsampled points, and in a real X window the two moved each other on every repaint.
        # Neither it nor clipping suits a plot against another metric (x not sorted): every point.
        p.setDownsampling(auto=False, mode="peak")
        p.setClipToView(against is None)
        p.showGrid(x=True, y=True, alpha=0.15)
        for side in ("left", "bottom"):
            # Major ticks only: the minor grid doubles the lines drawn on every repaint, and a
            # live plot repaints its axes whenever its range grows.
            p.getAxis(side).setStyle(maxTickLevel=0)
        p.getAxis("left").setTickDensity(1.8)       # major-only leaves short y axes with two labels
        # No setLimits(xMin=0) to keep autorange's margin off negative steps: in a real X
        # window, with a run streaming into a page, it made the plots repaint each other forever.
        p.setLabel("bottom", against[1] if against else "step")
        legend = QLabel()
        legend.setTextFormat(Qt.RichText)
        legend.setContentsMargins(6, 0, 6, 0)
        legend.setWordWrap(True)
        legend.setTextInteractionFlags(Qt.LinksAccessibleByMouse)
        legend.setToolTip("Click an entry to hide or show its curve")
        frame = QWidget()
        # The frame shares the plot's background, so plot and legend read as one tile.
        frame.setBackgroundRole(QPalette.Base)
        frame.setAutoFillBackground(True)
        box = QVBoxLayout(frame)
        box.setContentsMargins(0, 0, 0, 4)
        box.setSpacing(0)
        box.addWidget(w, 1)
        box.addWidget(legend)
        # Links name the cell and the entry, so one bound method serves every legend: no
        # lambda holding the grid alive from its own children.
        legend.linkActivated.connect(self._toggle_curve)
        return _Cell(title, list(keys), w, legend, frame, x_key=against[0] if against else None)

    def _color(self, index: int) -> QColor:
        c = QColor(COLORS[index % len(COLORS)])
        # Tableau's tones are set for white paper; on a dark background they need more light.
        return c.lighter(135) if self.palette().color(QPalette.Base).lightness() < 128 else c

    def _style_curve(self, curve: pg.PlotDataItem, style: tuple) -> None:
        color_index, dash = style
        color = self._color(color_index)
        curve.setPen(pg.mkPen(color, width=1.5, style=dash))
        curve.setSymbolBrush(color)

    def _apply_palette(self) -> None:
        pal = self.palette()
        bg, fg = pal.color(QPalette.Base), pal.color(QPalette.Text)
        muted = QColor(fg)
        muted.setAlpha(150)
        for cell in self._cells.values():
            cell.widget.setBackground(bg)
            p = cell.widget.getPlotItem()
            title = self.other_box.currentText() or OTHER if cell.title == OTHER else cell.title
            p.setTitle(title, color=fg.name(), size="9pt")
            for side in ("left", "bottom"):
                ax = p.getAxis(side)
                ax.setPen(pg.mkPen(muted))
                ax.setTextPen(pg.mkPen(fg))
            for ident, curve in cell.curves.items():
                self._style_curve(curve, cell.styles[ident])
            self._update_legend(cell)

    def changeEvent(self, event: QEvent) -> None:
        if event.type() in (QEvent.PaletteChange, QEvent.ApplicationPaletteChange):
            self._apply_palette()
        super().changeEvent(event)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._dirty or self._next_cell:      # new data, or a round left half-drawn when hidden
            self._timer.start()
