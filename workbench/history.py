"""A run's metrics as numpy series, built from the engine's `metrics` events; no Qt.

The live plots (ui/plots.py) draw from these, and anything headless that wants a run's curves
(the runs browser's summaries, a benchmark) can read them the same way:

    h = fold_run(run_dir).history          # workbench.runfold: the fold every view of a run uses
    steps, loss = h.arrays("train/loss")
    tokens, loss = h.arrays("train/loss", x="tokens")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

TOKENS = "train/tokens"     # cumulative tokens seen, emitted by the trainer at each log step


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)     # the engine writes non-finite values as "nan", "inf"
        except ValueError:
            return None
    return None


class Series:
    """One metric of one run: x (step) and y in float64 buffers that double when full.

    Steps only increase. A step at or before the last one means the run was resumed from an
    earlier checkpoint, so the points from that step on are dropped and the new ones replace
    them, as the resumed run replaces that stretch of training.
    """
    __slots__ = ("_x", "_y", "_n", "version", "rewinds", "nonfinite")

    def __init__(self, capacity: int = 64):
        self._x = np.empty(capacity)
        self._y = np.empty(capacity)
        self._n = 0
        self.version = 0        # bumped on every change: the grid redraws a curve when it moves
        self.rewinds = 0        # bumped when points were dropped: derived caches start over
        self.nonfinite = False

    def __len__(self) -> int:
        return self._n

    def append(self, x: float, y: float) -> None:
        n = self._n
        if n and x <= self._x[n - 1]:
            n = self._rewind(x)
        self._reserve(n + 1)
        self._x[n] = x
        self._y[n] = y
        self._n = n + 1
        self.version += 1
        if not math.isfinite(y):
            self.nonfinite = True

    def extend(self, xs, ys) -> None:
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        if not len(xs):
            return
        # The same rule as append, vectorised: a point survives only if every later one is
        # at a later step.
        later_min = np.minimum.accumulate(xs[::-1])[::-1]
        keep = np.ones(len(xs), dtype=bool)
        keep[:-1] = xs[:-1] < later_min[1:]
        if not keep.all():
            xs, ys = xs[keep], ys[keep]
        n = self._n
        if n and xs[0] <= self._x[n - 1]:
            n = self._rewind(xs[0])
        self._reserve(n + len(xs))
        self._x[n:n + len(xs)] = xs
        self._y[n:n + len(xs)] = ys
        self._n = n + len(xs)
        self.version += 1
        if not np.isfinite(ys).all():
            self.nonfinite = True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the filled part; valid until the next change."""
        return self._x[:self._n], self._y[:self._n]

    def _rewind(self, x: float) -> int:
        self._n = int(np.searchsorted(self._x[:self._n], x, side="left"))
        self.rewinds += 1
        return self._n

    def _reserve(self, need: int) -> None:
        cap = len(self._x)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("_x", "_y"):
            old = getattr(self, name)
            new = np.empty(cap)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)


@dataclass
class _TokenX:
    stamp: tuple
    exact: int = 0                      # leading points whose token count can no longer change
    buf: np.ndarray = field(default_factory=lambda: np.empty(0))


class RunHistory:
    """Every metric of one run as a `Series`, built from its events.

    Only some events carry `train/tokens`, so the token count at any other step (an evaluation,
    a stage's own statistics) is interpolated from the ones that do, and extrapolated at the
    latest rate past the last one. That lets every metric be drawn against tokens, the x axis
    on which runs with different batch sizes compare.
    """

    def __init__(self):
        self.series: dict[str, Series] = {}
        self._tx: dict[str, _TokenX] = {}

    @classmethod
    def from_events(cls, events: Iterable[dict]) -> "RunHistory":
        h = cls()
        h.add_events(events)
        return h

    def add_event(self, ev: dict) -> bool:
        """Takes a `metrics` event's values; returns whether the event was one."""
        if ev.get("type") != "metrics":
            return False
        step = _number(ev.get("step"))
        if step is None:
            return False
        for k, v in ev.items():
            if "/" in k:
                y = _number(v)
                if y is not None:
                    s = self.series.get(k)
                    if s is None:
                        s = self.series[k] = Series()
                    s.append(step, y)
        return True

    def add_events(self, events: Iterable[dict]) -> int:
        """The bulk form of add_event (a run's whole events.jsonl); returns metrics events taken."""
        cols: dict[str, tuple[list, list]] = {}
        n = 0
        for ev in events:
            if ev.get("type") != "metrics":
                continue
            step = _number(ev.get("step"))
            if step is None:
                continue
            n += 1
            for k, v in ev.items():
                if "/" not in k:
                    continue
                y = float(v) if type(v) in (float, int) else _number(v)
                if y is None:
                    continue
                col = cols.get(k)
                if col is None:
                    col = cols[k] = ([], [])
                col[0].append(step)
                col[1].append(y)
        for k, (xs, ys) in cols.items():
            s = self.series.get(k)
            if s is None:
                s = self.series[k] = Series(max(64, len(xs)))
            s.extend(xs, ys)
        return n

    def keys(self) -> list[str]:
        return sorted(self.series)

    def __contains__(self, key: str) -> bool:
        return key in self.series

    def last(self, key: str) -> Optional[float]:
        s = self.series.get(key)
        return float(s.arrays()[1][-1]) if s is not None and len(s) else None

    @property
    def has_tokens(self) -> bool:
        s = self.series.get(TOKENS)
        return s is not None and len(s) > 0

    def arrays(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of one metric; x "tokens" falls back to steps for a run that counts none."""
        steps, y = self.series[key].arrays()
        if x == "tokens" and self.has_tokens:
            return self._tokens_x(key), y
        return steps, y

    def against(self, x_key: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): `key`'s values against `x_key`'s at the steps that have both (PPO's score
        against its KL), without the pairs where either is not finite: a point needs both."""
        sx, x = self.series[x_key].arrays()
        sy, y = self.series[key].arrays()
        _, ix, iy = np.intersect1d(sx, sy, assume_unique=True, return_indices=True)
        x, y = x[ix], y[iy]
        keep = np.isfinite(x) & np.isfinite(y)
        return (x, y) if keep.all() else (x[keep], y[keep])

    def _tokens_x(self, key: str) -> np.ndarray:
        s, tok = self.series[key], self.series[TOKENS]
        stamp = (s.rewinds, tok.rewinds)
        cache = self._tx.get(key)
        if cache is None or cache.stamp != stamp:
            cache = self._tx[key] = _TokenX(stamp)
        steps, _ = s.arrays()
        n = len(steps)
        if len(cache.buf) < n:
            grown = np.empty(max(n, 2 * len(cache.buf)))
            grown[:cache.exact] = cache.buf[:cache.exact]
            cache.buf = grown
        # Only the points past the last exactly-known ones are computed again: while a run
        # streams, that is a handful per redraw, not the whole history.
        ts, tk = tok.arrays()
        cache.buf[cache.exact:n] = _interp_tokens(steps[cache.exact:n], ts, tk)
        cache.exact = int(np.searchsorted(steps, ts[-1], side="right"))
        return cache.buf[:n]


def _interp_tokens(steps: np.ndarray, ts: np.ndarray, tk: np.ndarray) -> np.ndarray:
    out = np.interp(steps, ts, tk)
    # Before the first count, tokens grow from zero at step 0; after the last, at the average
    # rate so far (np.interp would hold them flat).
    before, after = steps < ts[0], steps > ts[-1]
    if before.any():
        out[before] = steps[before] * (tk[0] / ts[0]) if ts[0] > 0 else tk[0]
    if after.any():
        rate = tk[-1] / ts[-1] if ts[-1] > 0 else 0.0
        out[after] = tk[-1] + (steps[after] - ts[-1]) * rate
    return out
