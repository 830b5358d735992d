"""How long the UI thread was unable to run: a fast timer that measures its own lateness.

A timer on the UI thread should fire every `interval_ms`. When it fires late, something held
the event loop for the difference: a slow slot, a redraw, a blocking call. The probe records
each tick's lateness, so a test or benchmark that streams a job's events into the UI can say
"the worst stall was 40 ms, the 99th percentile 3 ms" instead of "it felt smooth".

    probe = StallProbe(interval_ms=10)
    probe.start()
    ...                       # drive the UI, with the event loop running
    probe.stop()
    probe.max_stall_ms, probe.percentile(99), probe.histogram()
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
from PySide6.QtCore import QObject, Qt, QTimer

# Upper edges of the histogram's buckets in ms: a 60 Hz frame is 16.7 ms; past 100 ms a person
# notices the lag, past a second they think the app hung.
BUCKETS_MS = (1.0, 5.0, 16.7, 33.3, 100.0, 250.0, 1000.0, float("inf"))


class StallProbe(QObject):
    def __init__(self, interval_ms: int = 10, parent: Optional[QObject] = None):
        super().__init__(parent)
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.interval_ms = interval_ms
        self._timer = QTimer(self)
        # The default coarse timer may fire up to 5% early or late by design; that would read
        # as stall noise at this resolution.
        self._timer.setTimerType(Qt.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)
        self._last: Optional[float] = None
        self.stalls_ms: list[float] = []        # lateness of every tick, 0 when on time

    def start(self) -> None:
        """Starts measuring afresh (earlier results are dropped)."""
        self.reset()
        self._last = time.perf_counter()
        self._timer.start()

    def stop(self) -> None:
        # The time since the last tick counts too: a stall that is still going on when the
        # measurement ends must not vanish.
        if self._timer.isActive():
            self._tick()
            self._timer.stop()
        self._last = None

    def reset(self) -> None:
        self.stalls_ms = []
        if self._last is not None:
            self._last = time.perf_counter()

    @property
    def running(self) -> bool:
        return self._timer.isActive()

    @property
    def ticks(self) -> int:
        return len(self.stalls_ms)

    @property
    def max_stall_ms(self) -> float:
        return max(self.stalls_ms, default=0.0)

    @property
    def total_stall_ms(self) -> float:
        return float(sum(self.stalls_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.stalls_ms, q)) if self.stalls_ms else 0.0

    def histogram(self) -> dict[str, int]:
        """Ticks per lateness bucket, labelled by upper edge: {"<=1ms": 950, "<=5ms": 40, ...}."""
        counts = np.bincount(np.searchsorted(BUCKETS_MS, self.stalls_ms, side="left"),
                             minlength=len(BUCKETS_MS)) if self.stalls_ms else [0] * len(BUCKETS_MS)
        return {(f"<={edge:g}ms" if edge != float("inf") else f">{BUCKETS_MS[-2]:g}ms"): int(n)
                for edge, n in zip(BUCKETS_MS, counts)}

    def summary(self) -> dict:
        """The figures a benchmark writes into its table."""
        return {"interval_ms": self.interval_ms, "ticks": self.ticks,
                "max_stall_ms": round(self.max_stall_ms, 2), "p50_ms": round(self.percentile(50), 2),
                "p99_ms": round(self.percentile(99), 2), "total_stall_ms": round(self.total_stall_ms, 1),
                "histogram": self.histogram()}

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.stalls_ms.append(max(0.0, (now - self._last) * 1000.0 - self.interval_ms))
        self._last = now
