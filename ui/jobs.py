"""A job as the widgets see it: workbench.jobs.Job polled by a timer, its news as signals.

All of the job's logic (starting the process, re-attaching by pid, folding events, stopping with
escalation, telling a crash from an end) is Qt-free in workbench/jobs.py, shared with `workbench
run` and the pipeline. This wrapper only polls it every POLL_MS on the UI thread and forwards what
changed. Not a QProcess: a QProcess kills its process when it is destroyed, and a job must
outlive the app that started it.

Events are delivered in batches (one signal per poll, not per line), and each poll reads at most
POLL_BYTES, so a stage that logs every step, or a re-attach catching up on a long events.jsonl,
cannot flood or stall the UI thread.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from workbench import jobs
from workbench.runfold import Follower

POLL_MS = 100
POLL_BYTES = 256 * 1024


class Job(QObject):
    # object, not list: a list signal converts every event dict to a QVariantMap and back,
    # milliseconds per poll while a run streams.
    eventsArrived = Signal(object)    # new event dicts, in order (already folded into .fold)
    finished = Signal(str, object)    # status (completed | stopped | failed), error text or None

    def __init__(self, stage: str, run_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.core = jobs.Job(stage, run_dir)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)

    # What the job is, read from the Qt-free core.
    stage = property(lambda self: self.core.stage)
    run_dir = property(lambda self: self.core.run_dir)
    pid = property(lambda self: self.core.pid)
    status = property(lambda self: self.core.status)
    error = property(lambda self: self.core.error)
    fold = property(lambda self: self.core.fold)
    running = property(lambda self: self.core.running)
    stopping = property(lambda self: self.core.stopping)
    history = property(lambda self: self.core.fold.history)
    progress = property(lambda self: self.core.fold.progress)

    def start(self) -> "Job":
        """Launch the stage on the run folder (its config.json must be written)."""
        self.core.start()
        self._follow()
        return self

    def attach(self, pid: int | None) -> "Job":
        """Follow a run started earlier (a previous app session, a terminal)."""
        self.core.attach(pid)
        self._follow()
        return self

    def _follow(self) -> None:
        if self.core.running:
            self.poll()
        if self.core.running:
            self._timer.start()
        else:
            self.finished.emit(self.core.status, self.core.error)

    def poll(self) -> None:
        was_running = self.core.running
        new = self.core.poll(POLL_BYTES)
        if new:
            self.eventsArrived.emit(new)
        if was_running and not self.core.running:
            self._timer.stop()
            self.finished.emit(self.core.status, self.core.error)

    def detach(self) -> None:
        """Stop following the job (its project closes); the process runs on."""
        self._timer.stop()

    def stop(self, grace_ms: int = 30_000) -> None:
        """Ask the stage to checkpoint and exit; escalate to terminate, then kill."""
        self.core.stop(grace_ms / 1000)

    def kill(self) -> None:
        """End the process tree at once (tests, and the last resort)."""
        self.core.kill()


class RunLoader(QObject):
    """A finished run's events folded on the UI thread, SLICE_BYTES per timer tick, through the
    same fold a live job uses (so a reopened run shows exactly the curve it showed live).

    Not on a worker thread: parsing JSON is pure Python, and a thread doing it holds the GIL,
    so every call from Qt into Python on the UI thread (each paint of a Python widget) waits
    for it: reopening a run of 100k events stalled the window for 0.4 s that way. A slice of
    256 KB is ~2,500 events, about 15 ms."""
    SLICE_BYTES = 256 * 1024
    eventsArrived = Signal(object)    # each slice of events, as read
    loaded = Signal()

    def __init__(self, run_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.follower = Follower(Path(run_dir))
        self._timer = QTimer(self, interval=0)
        self._timer.timeout.connect(self._step)

    fold = property(lambda self: self.follower.fold)

    def start(self) -> "RunLoader":
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.stop()

    @property
    def busy(self) -> bool:
        return self._timer.isActive()

    def _step(self) -> None:
        new = self.follower.read(self.SLICE_BYTES)
        if new:
            self.eventsArrived.emit(new)
        if self.follower.caught_up:
            self._timer.stop()
            self.loaded.emit()
