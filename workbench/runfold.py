"""Reading a run's events.jsonl, and the one fold of them that every view of a run shares.

A stage appends one JSON event per line to DIR/events.jsonl (engine/runio.py lists the types).
`EventTail` reads what was appended since the last call, never a half-written line; `RunFold`
turns events into what a run *is* at that point: its status, step, last metrics, last progress
(with an ETA from the recent rate), its curves (`RunHistory`) and the events a page lists
(samples, log lines, checkpoints). `Follower` is the two together. The run index, a live job,
a re-attached job and a finished run reopened in the app all fold through this one class, so a
re-attached or resumed run shows exactly the curve a fresh load shows.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Iterator, Optional

from engine.runio import parse_event_line
from workbench.history import RunHistory

FINAL = ("completed", "stopped", "failed")
# Event types a page lists (the rest are folded into status, progress and curves).
LISTED = ("start", "done", "log", "sample", "checkpoint")
ETA_WINDOW_S = 90.0     # the ETA follows the pace of about the last minute and a half


class EventTail:
    """Reads the lines appended to an events.jsonl since the last call; a half-written last
    line is left for the next call, so a reader never sees a torn event."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_new(self, max_bytes: int | None = None) -> list[dict]:
        """New complete lines; at most about `max_bytes` of them per call, so a reader catching
        up on a long file can spread the work over several calls."""
        return [ev for _end, ev in self.iter_new(max_bytes)]

    def iter_new(self, max_bytes: int | None = None) -> Iterator[tuple[int, dict]]:
        """(offset just past the line, event) for each new complete line. The offset moves on
        at once: a fold that takes events as they come never holds thousands alive at a time
        for the UI thread's collector to walk. A line that is not JSON (torn by a kill) is
        skipped; the line after it is read as usual, and an event an older writer glued onto a
        torn line is recovered (engine.runio.parse_event_line, the engine's own reader)."""
        size = self.size()
        if size < self.offset:      # the file was replaced: start over
            self.offset = 0
        if size == self.offset:
            return
        start = self.offset
        want = size - start if max_bytes is None else min(size - start, max_bytes)
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(want)
            end = data.rfind(b"\n") + 1
            if end == 0 and want < size - start:
                # One line longer than max_bytes: read on to its end rather than never progress.
                data += f.read(size - start - want)
                end = data.rfind(b"\n") + 1
        self.offset = start + end
        pos = start
        for line in data[:end].splitlines(keepends=True):
            pos += len(line)
            try:
                ev = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                try:        # the rare torn line: recover an event glued onto it
                    ev = parse_event_line(line.decode("utf-8"))
                except UnicodeDecodeError:
                    continue
            if isinstance(ev, dict):
                yield pos, ev

    @property
    def at_end(self) -> bool:
        """No complete line is left to read (a torn last line, the writer killed mid-line or
        still writing it, does not count)."""
        size = self.size()
        if self.offset >= size:
            return True
        if size - self.offset > 1 << 16:
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return b"\n" not in f.read()


class RunFold:
    """What a run's events say so far. `keep=False` keeps only the summary (the run index
    holds hundreds of runs; curves and samples are read when a run is shown)."""

    def __init__(self, keep: bool = True, row: Optional[dict] = None):
        row = row or {}
        self.status = row.get("status", "created")
        self.stage = row.get("stage")
        self.started_at = row.get("started_at")
        self.ended_at = row.get("ended_at")
        self.error = row.get("error")
        self.pid = row.get("pid")
        self.stop_with: Optional[int] = None      # the launcher the running process stops with
        self.step = row.get("step")
        self._metrics: dict[str, float] = json.loads(row.get("metrics") or "{}")
        self.progress: Optional[dict] = None
        self.keep = keep
        self.history = RunHistory() if keep else None
        self.listed: list[dict] = []
        self._pace: deque[tuple[float, float]] = deque()

    def add(self, ev: dict) -> None:
        t = ev.get("type")
        if t == "start":
            self.status, self.error, self.ended_at = "running", None, None
            self.pid, self.stop_with = ev.get("pid"), ev.get("stop_with")
            self.stage = ev.get("stage") or self.stage
            # A resumed run's progress stays where its checkpoint left it until the new session
            # reports (it read 0% meanwhile); the pace of the last session is not this one's.
            self._pace.clear()
            if self.started_at is None:
                self.started_at = ev.get("time")
        elif t == "done":
            self.status, self.error = ev.get("status", "failed"), ev.get("error")
            self.ended_at = ev.get("time")
            if self.started_at is None:
                self.started_at = ev.get("time")
        elif t == "metrics":
            self.step = ev.get("step", self.step)
            if self.history is not None:
                self.history.add_event(ev)
            else:
                self._metrics.update({k: v for k, v in ev.items() if "/" in k})
        elif t == "progress":
            self.step = ev.get("step", self.step)
            self.progress = ev
            self._note_pace(ev)
        if self.keep and t in LISTED:
            self.listed.append(ev)

    def add_all(self, events: list[dict]) -> None:
        """`add` for many; metrics go to the curves in one bulk append."""
        if self.history is None:
            for ev in events:
                self.add(ev)
            return
        metrics = []
        for ev in events:
            if ev.get("type") == "metrics":
                self.step = ev.get("step", self.step)
                metrics.append(ev)
            else:
                self.add(ev)
        self.history.add_events(metrics)

    @property
    def metrics(self) -> dict[str, float]:
        """The last value of every metric (with curves kept, read from their ends)."""
        if self.history is None:
            return self._metrics
        return {**self._metrics, **{k: self.history.last(k) for k in self.history.keys()}}

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def _note_pace(self, ev: dict) -> None:
        elapsed, step = ev.get("elapsed_s"), ev.get("step")
        if not isinstance(elapsed, (int, float)) or not isinstance(step, (int, float)):
            return
        if self._pace and (elapsed < self._pace[-1][0] or step < self._pace[-1][1]):
            self._pace.clear()      # a new session of the run (a resume)
        self._pace.append((float(elapsed), float(step)))
        while len(self._pace) > 2 and self._pace[-1][0] - self._pace[1][0] >= ETA_WINDOW_S:
            self._pace.popleft()

    def eta_s(self) -> Optional[float]:
        """Seconds left at the pace of the last minute or so (a run slowed by a busy machine
        is not promised its early speed); the stage's own estimate until there is a pace."""
        p = self.progress
        if p is None or self.final:
            return None
        total, step = p.get("total"), p.get("step")
        if len(self._pace) >= 2 and isinstance(total, (int, float)) and isinstance(step, (int, float)):
            (t0, s0), (t1, s1) = self._pace[0], self._pace[-1]
            if s1 > s0 and t1 > t0:
                return max(0.0, (total - step) * (t1 - t0) / (s1 - s0))
        return p.get("eta_s")


class Follower:
    """A run folder's events, read incrementally into a RunFold."""

    def __init__(self, run_dir: Path, keep: bool = True, fold: Optional[RunFold] = None, offset: int = 0):
        self.run_dir = Path(run_dir)
        self.tail = EventTail(self.run_dir / "events.jsonl", offset)
        self.fold = fold or RunFold(keep)
        self.last_status_at = 0     # file offset just past the last start or done event read

    def read(self, max_bytes: int | None = None) -> list[dict]:
        """Fold what was appended (at most about max_bytes of it); returns the new events."""
        new = []
        for end, ev in self.tail.iter_new(max_bytes):
            if ev.get("type") in ("start", "done"):
                self.last_status_at = end
            new.append(ev)
        if new:
            self.fold.add_all(new)
        return new

    def read_all(self) -> "Follower":
        self.read()
        return self

    @property
    def caught_up(self) -> bool:
        return self.tail.at_end


def fold_run(run_dir: Path) -> RunFold:
    """A whole run's events folded at once (the CLI, tests, benchmarks)."""
    return Follower(run_dir).read_all().fold
