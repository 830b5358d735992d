"""Training jobs in child processes, watched through their events.jsonl.

A job is `python -m engine.<stage> --run-dir DIR` in a child process of its own session. Not a
QProcess: a QProcess kills its process when it is destroyed, and a job must outlive the app
that started it; PySide6's QProcess.startDetached gives no pid when output is redirected. Its events are the lines the stage
appends to DIR/events.jsonl, read by a 100 ms poll: the same code path serves a job started a
second ago and one the reopened app re-attaches to, which catches up from the top of the file.
stdout and stderr go to DIR/stdout.log and DIR/stderr.log, so a crash before the first event
(an import error) still has its traceback, shown as the job's error.

Events are delivered in batches (one signal per poll, not per line), so a stage that logs every
step cannot flood the UI thread with queued signals.

Stop: the file DIR/STOP, then SIGTERM after a grace period, then SIGKILL (DESIGN.md §2).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from engine.config import save_config
from workbench.runner import stage_command
from workbench.runs import LOST, EventTail, process_alive
from workbench.history import RunHistory

POLL_MS = 100
# Per poll: a stage writes a few KB/s, so this only bounds catching up on a long events.jsonl
# (re-attach) or a flood, spreading the parsing over polls instead of one long stall.
POLL_BYTES = 256 * 1024
JOB_NICENESS = 5
ROOT = Path(__file__).resolve().parents[1]
# Every child this app started, until it exits: a Job may be dropped (its project closed) while
# its process runs on, and the Popen must outlive it to reap the process when it ends.
_children: list[subprocess.Popen] = []


def reap() -> None:
    """Collect the exit status of children that ended, so none lingers as a zombie."""
    _children[:] = [p for p in _children if p.poll() is None]


def stage_arguments(stage: str, run_dir: Path) -> list[str]:
    # events.jsonl carries the events; stdout (to stdout.log) is the readable log.
    return stage_command(stage, run_dir, "human")[1:]


class Job(QObject):
    eventsArrived = Signal(list)      # new event dicts, in order (metrics already in .history)
    finished = Signal(str, object)    # status (completed | stopped | failed), error text or None

    def __init__(self, stage: str, run_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        # Absolute: the child runs inside the folder, and re-attach matches the path in its
        # command line.
        self.stage, self.run_dir = stage, Path(run_dir).absolute()
        self.pid: int | None = None
        self.status = "created"
        self.error: str | None = None
        # Metrics go into numpy buffers, not a list of dicts: a long run streams millions of
        # values, and every live dict is work for each garbage collection on the UI thread.
        self.history = RunHistory()
        self.events: list[dict] = []           # the other events (start, sample, log, ...)
        self.progress: dict | None = None      # the last progress event
        self._tail = EventTail(self.run_dir / "events.jsonl")
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)
        self._stop_timer = QTimer(self)
        self._stop_timer.setSingleShot(True)
        self._stop_timer.timeout.connect(self._escalate)
        self._stop_stage = 0
        self._seen_start = False
        self._proc: subprocess.Popen | None = None

    # --- starting and attaching ---------------------------------------------------------------

    def start(self) -> "Job":
        """Launch the stage on the run folder (its config.json must be written)."""
        # Events of an earlier session of this run (a resume) are history, not news.
        self._tail.offset = _size(self.run_dir / "events.jsonl")
        (self.run_dir / "STOP").unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        try:
            with open(self.run_dir / "stdout.log", "ab") as out, open(self.run_dir / "stderr.log", "ab") as err:
                # A new session: Ctrl-C in the app's terminal must not reach the job, and
                # closing the app must not end it.
                self._proc = subprocess.Popen([sys.executable, *stage_arguments(self.stage, self.run_dir)],
                                              cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=err, start_new_session=True,
                                              preexec_fn=_lower_priority)
        except OSError as e:
            self._finish("failed", f"could not start {sys.executable}: {e}")
            return self
        _children.append(self._proc)
        pid = self._proc.pid
        self.pid, self.status = pid, "running"
        self._timer.start()
        return self

    def attach(self, pid: int | None) -> "Job":
        """Follow a run started earlier (by a previous app session): catch up, then poll."""
        self.pid, self.status = pid, "running"
        self._tail.offset = 0
        self._seen_start = True
        self.poll()
        if self.status == "running":
            self._timer.start()
        return self

    # --- polling ------------------------------------------------------------------------------

    def poll(self) -> None:
        new = self._tail.read_new(POLL_BYTES)
        done = None
        for ev in new:
            t = ev.get("type")
            if t == "start":
                self._seen_start = True
                self.pid = ev.get("pid", self.pid)
                done = None          # an earlier session's end, followed by a resume
            elif t == "done":
                done = ev
            elif t == "progress":
                self.progress = ev
        if new:
            self.history.add_events(e for e in new if e.get("type") == "metrics")
            self.events.extend(e for e in new if e.get("type") not in ("metrics", "progress"))
            self.eventsArrived.emit(new)
        reap()                       # a child that exited must not linger as a zombie pid
        if done is not None:
            self._finish(done.get("status", "failed"), done.get("error"))
        elif self.status == "running" and not process_alive(self.pid, self.run_dir):
            # Read once more: the process may have written its last lines and exited
            # between the read above and the liveness check.
            if _size(self._tail.path) > self._tail.offset:
                return
            self._finish("failed", self._crash_text())

    def _crash_text(self) -> str:
        tail = []
        err = self.run_dir / "stderr.log"
        if err.exists():
            tail = err.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
        head = LOST if self._seen_start else f"the {self.stage} process exited before it started"
        return head + (":\n" + "\n".join(tail) if tail else "")

    def _finish(self, status: str, error) -> None:
        self._timer.stop()
        self._stop_timer.stop()
        if self.status in ("completed", "stopped", "failed"):
            return
        self.status, self.error = status, error
        self.finished.emit(status, error)

    def detach(self) -> None:
        """Stop following the job (its project closes); the process runs on."""
        self._timer.stop()

    @property
    def running(self) -> bool:
        return self.status == "running"

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, grace_ms: int = 30_000) -> None:
        """Ask the stage to checkpoint and exit; escalate to SIGTERM, then SIGKILL."""
        if not self.running:
            return
        (self.run_dir / "STOP").touch()
        self._stop_stage = 0
        self._stop_timer.start(grace_ms)

    def _escalate(self) -> None:
        if not self.running or not process_alive(self.pid, self.run_dir):
            return
        self._stop_stage += 1
        sig = signal.SIGTERM if self._stop_stage == 1 else signal.SIGKILL
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGTERM:
            self._stop_timer.start(self._stop_timer.interval())

    def kill(self) -> None:
        """Immediately end the process (tests, and the last resort)."""
        if self.pid and process_alive(self.pid, self.run_dir):
            os.kill(self.pid, signal.SIGKILL)


def _lower_priority() -> None:
    # A job uses every core it can; a slightly lower priority lets the window keep drawing
    # while costing the job nothing when the machine is otherwise idle.
    try:
        os.nice(JOB_NICENESS)
    except OSError:
        pass


def launch(stage: str, run_dir: Path, config=None, parent: QObject | None = None) -> Job:
    """Write config.json (when given) and start the stage."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        save_config(config, run_dir / "config.json")
    return Job(stage, run_dir, parent).start()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
