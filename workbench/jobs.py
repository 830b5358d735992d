"""A run of a stage as a job: started, re-attached, followed and stopped, with no Qt.

A job is `python -m engine.<stage> --run-dir DIR` (under torchrun when the config asks for
several processes) in a child process of its own (engine/osproc.py). Its events are the
lines the stage appends to DIR/events.jsonl, read through the run fold every view shares
(workbench/runfold.py); its stdout and stderr go to DIR/stdout.log and DIR/stderr.log, so a
crash before the first event (an import error) still has its traceback, shown as the error.

`workbench run`, `workbench pipeline` and the app all drive this class: the pipeline and the
CLI in a blocking loop (`run_job`), the app from a timer (ui/jobs.py wraps it in a QObject).
Stop: the file DIR/STOP (a checkpoint, then exit), then a terminate request after a grace
period, then the whole process tree is killed (DESIGN.md §2).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine import osproc as process
from engine.fsutil import disk_full_message, nearly_full
from engine.runio import STOP_WITH_ENV
from workbench.runfold import Follower, RunFold
from workbench.runfolder import RunFolderError, read_config
from workbench.stages import spec

ROOT = Path(__file__).resolve().parents[1]
LOST = "the process ended without a done event (killed, or the machine stopped); resume to continue"


def stage_command(stage: str, run_dir: Path, log_format: str = "json") -> list[str]:
    """The command line of a stage's job: the engine module, under torchrun when the run's
    config asks for several processes (`nproc`, for the DDP stages)."""
    stage_args = ["-m", spec(stage).module, "--run-dir", str(run_dir), "--log-format", log_format]
    nproc = config_nproc(run_dir)
    if nproc > 1:
        # --standalone: a rendezvous on a free local port, so several DDP jobs can run at once.
        return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *stage_args]
    return [sys.executable, "-u", *stage_args]


def config_nproc(run_dir: Path) -> int:
    """The number of processes a run trains with (1 when the config is absent or unreadable:
    the stage itself then reports what is wrong with it)."""
    try:
        value = read_config(run_dir).get("nproc", 1)
    except RunFolderError:
        return 1
    return value if isinstance(value, int) and value > 1 else 1


class Job:
    """One stage process on one run folder. Call `poll()` now and then: it folds new events,
    moves a stop request along, and notices the end (a `done` event, or the process gone)."""

    def __init__(self, stage: str, run_dir: Path, keep: bool = True, stop_with_us: bool = False):
        # Absolute: the child runs inside the folder, and liveness checks match the path in
        # its command line.
        self.stage, self.run_dir = stage, Path(run_dir).absolute()
        self.follower = Follower(self.run_dir, keep=keep)
        self.pid: Optional[int] = None
        self.status = "created"
        self.error: Optional[str] = None
        self.returncode: Optional[int] = None
        self._proc = None
        # Events up to this offset are history (an earlier session of a resumed run): their
        # `done` does not end this job.
        self._live_from = 0
        self._stop_at: Optional[float] = None
        self._stop_stage = 0
        self._grace_s = 30.0
        self._stop_with_us = stop_with_us    # the stage stops if this process dies (runio.STOP_WITH_ENV)

    @property
    def fold(self) -> RunFold:
        return self.follower.fold

    @property
    def running(self) -> bool:
        return self.status == "running"

    def start(self) -> "Job":
        """Launch the stage on the run folder (its config.json must be written)."""
        self._live_from = self.follower.tail.size()
        (self.run_dir / "STOP").unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.pop(STOP_WITH_ENV, None)
        if self._stop_with_us:
            env[STOP_WITH_ENV] = str(os.getpid())
        # events.jsonl carries the events; stdout (to stdout.log) is the readable log.
        cmd = stage_command(self.stage, self.run_dir, "human")
        try:
            with open(self.run_dir / "stdout.log", "ab") as out, open(self.run_dir / "stderr.log", "ab") as err:
                self._proc = process.spawn(cmd, self.run_dir, env, out, err)
        except OSError as e:
            self._finish("failed", f"could not start {sys.executable}: {e}")
            return self
        self.pid, self.status = self._proc.pid, "running"
        return self

    def attach(self, pid: Optional[int]) -> "Job":
        """Follow a run started elsewhere (a previous app session, a terminal)."""
        self.pid, self.status = pid, "running"
        self._live_from = 0
        return self

    def poll(self, max_bytes: Optional[int] = None) -> list[dict]:
        """New events (at most about max_bytes of them); updates `status` when the job ends."""
        if not self.running:
            return []
        new = self.follower.read(max_bytes)
        process.reap()
        self._escalate()
        f = self.follower
        if not f.caught_up:
            return new
        if not self._ended_here() and not self._process_alive():
            # Read once more: the process may have written its last lines and exited between
            # the read above and the liveness check.
            new += f.read()
            if not self._ended_here():
                self._finish("failed", self._crash_text())
        if self._ended_here():
            self._finish(f.fold.status, f.fold.error)
        return new

    def _ended_here(self) -> bool:
        f = self.follower
        return f.caught_up and f.fold.final and f.last_status_at > self._live_from

    def _process_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return process.alive(self.pid, self.run_dir)

    def _crash_text(self) -> str:
        tail = []
        err = self.run_dir / "stderr.log"
        if err.exists():
            tail = err.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
        started = self.follower.last_status_at > self._live_from
        head = LOST if started else f"the {self.stage} process exited before it started"
        if not tail and not started and nearly_full(self.run_dir):
            # It could not write its first event, nor a line of why.
            return f"{head}: {disk_full_message(self.run_dir)}"
        return head + (":\n" + "\n".join(tail) if tail else "")

    def _finish(self, status: str, error: Optional[str]) -> None:
        self.status, self.error = status, error
        self._stop_at = None
        if self._proc is not None:
            self.returncode = self._proc.poll()     # it may still be exiting: see wait()

    def wait(self, timeout: float = 60.0) -> Optional[int]:
        """After the end: wait for the process to exit (its `done` is its last act)."""
        if self._proc is not None:
            try:
                self.returncode = self._proc.wait(timeout=timeout)
            except Exception:   # noqa: BLE001 - a stuck exit must not hang the caller
                pass
            process.reap()
        return self.returncode

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask the stage to checkpoint and exit; after `grace_s` a terminate request, after
        another `grace_s` the whole process tree is killed (checked at each poll)."""
        if not self.running:
            return
        (self.run_dir / "STOP").touch()
        self._grace_s = grace_s
        self._stop_stage = 0
        self._stop_at = time.monotonic() + grace_s

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    def _escalate(self) -> None:
        if self._stop_at is None or time.monotonic() < self._stop_at or not self.pid:
            return
        self._stop_stage += 1
        if self._stop_stage == 1 and process.terminate(self.pid):
            self._stop_at = time.monotonic() + self._grace_s
        else:
            process.kill_tree(self.pid)
            self._stop_at = None

    def kill(self) -> None:
        """End the process tree at once (tests, and the last resort)."""
        if self.pid and self._process_alive():
            process.kill_tree(self.pid)


@dataclass
class JobResult:
    stage: str
    run_dir: Path
    status: str                  # completed | stopped | failed
    error: Optional[str]
    returncode: Optional[int]
    fold: RunFold

    def metrics(self) -> dict[str, float]:
        """The last value of every metric the run reported."""
        return dict(self.fold.metrics)


def run_job(stage: str, run_dir: Path, on_event: Optional[Callable[[dict], None]] = None,
            poll_s: float = 0.2, stop_grace_s: float = 30.0) -> JobResult:
    """Run a stage to its end, following its events; Ctrl-C (or SIGTERM: a `kill`, a CI
    cancel, `timeout`) asks it to stop cleanly (a checkpoint), a second one kills it. The stage
    is a process of its own: left to the default SIGTERM, this one would die and leave it
    training, an orphan holding its run folder. So SIGHUP (the terminal closed) stops it the same
    way, and if this process is killed outright the stage stops itself (runio.STOP_WITH_ENV)."""
    job = Job(stage, run_dir, keep=False, stop_with_us=True).start()
    interrupted = False
    with _terminate_as_interrupt():
        while job.running:
            try:
                for ev in job.poll():
                    if on_event is not None:
                        on_event(ev)
                if job.running:
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                if interrupted:
                    job.kill()
                else:
                    interrupted = True
                    job.stop(stop_grace_s)
        job.wait()
    return JobResult(stage, job.run_dir, job.status, job.error, job.returncode, job.fold)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt meanwhile (main thread only: where Python runs
    handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt
    caught = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {s: signal.signal(s, interrupt) for s in caught}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
