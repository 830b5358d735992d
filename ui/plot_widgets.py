"""The pieces a plot grid (ui/plots.py) is built of: an axis that writes 250k rather than
'(x1e+06)', a plot that times its repaints and hands the wheel to the grid's scroll, and the grid
layout that lets the plots scroll instead of shrinking."""
from __future__ import annotations

import math
import time

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QGridLayout, QScrollArea


def _short(v: float) -> str:
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:g}"


class CountAxis(pg.AxisItem):
    """Large values as 250k, 1.5M, 2B rather than pyqtgraph's '(x1e+06)' axis label; with
    `integers`, an axis of steps or tokens, ticks on whole numbers only (a run of two steps
    read 1.0, 1.5, 2.0)."""

    def __init__(self, orientation: str, integers: bool = False):
        super().__init__(orientation)
        self.enableAutoSIPrefix(False)
        self.integers = integers

    def tickValues(self, minVal, maxVal, size):
        levels = super().tickValues(minVal, maxVal, size)
        if not self.integers or not levels or levels[0][0] >= 1:
            return levels
        first, last = math.ceil(minVal), math.floor(maxVal)
        return [(1.0, [float(v) for v in range(first, last + 1)])] if last - first < 1000 else levels

    def tickStrings(self, values, scale, spacing):
        if max((abs(v) for v in values), default=0.0) * scale < 1e4:
            return super().tickStrings(values, scale, spacing)
        return [_short(v * scale) for v in values]


class PaintClock:
    """Seconds spent painting the grid's plots, summed until read."""
    __slots__ = ("busy",)

    def __init__(self):
        self.busy = 0.0

    def take(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy


class TimedPlot(pg.PlotWidget):
    """A PlotWidget that adds the time of its repaints to a clock: the cost of a redraw is
    mostly paid here, after redraw() has returned."""

    def __init__(self, clock: PaintClock, **kwargs):
        super().__init__(**kwargs)
        self._clock = clock

    def paintEvent(self, event) -> None:
        t = time.perf_counter()
        super().paintEvent(event)
        self._clock.busy += time.perf_counter() - t

    def wheelEvent(self, event) -> None:
        # Where the grid scrolls, the wheel scrolls it (the plots fill most of it, and a wheel
        # that zoomed would also stop a live plot following its data); Ctrl+wheel zooms.
        scroll = self.parent()
        while scroll is not None and not isinstance(scroll, QScrollArea):
            scroll = scroll.parent()
        if (scroll is not None and scroll.verticalScrollBar().maximum() > 0
                and not event.modifiers() & Qt.ControlModifier):
            QApplication.sendEvent(scroll.verticalScrollBar(), event)
            return
        super().wheelEvent(event)


MIN_PLOT_HEIGHT = 150     # px: below this a plot's axis labels run into each other


class ScrollingGrid(QGridLayout):
    """The plots' grid, without height-for-width: a resizable scroll area gives a layout that has
    one the height it asks for at the viewport's width, and wrapping legends pass it up from each
    plot's preferred height, so every plot stood ~500 px tall. Without it the plots share the
    viewport's height, down to MIN_PLOT_HEIGHT, and below that the grid scrolls."""

    def hasHeightForWidth(self) -> bool:
        return False
