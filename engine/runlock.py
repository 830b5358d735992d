"""One process at a time in a run folder.

Two stage processes on one folder delete each other's temporary saves and corpus files as
leftovers, prune each other's checkpoints and interleave their events, so a stage takes
`DIR/.run.lock` before it touches anything and a second one is refused at once, naming the
first one's pid. The lock is an OS file lock (flock on Unix, LockFileEx on Windows, through
`filelock`): the OS releases it when its holder dies however it dies, so a killed run never
leaves its folder locked. The pid goes to `DIR/.run.pid` beside it, because filelock truncates
the lock file whenever anyone opens it; a pid file alone would outlive a killed holder.

`locked_by(run_dir)` answers the app's question "is a process running in this folder, and which".
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from engine.runio import StageError
from engine.osproc import pid_alive

LOCK_NAME = ".run.lock"
PID_NAME = ".run.pid"
# A stage waits this long for the lock: long enough for `locked_by` (which takes the lock for
# an instant to look) to let go, short enough to count as "at once" for a real second process.
START_WAIT_S = 2.0
# How long `locked_by` waits for a holder that has just taken the lock to write its pid.
PID_WAIT_S = 5.0


class RunLocked(StageError):
    """Another process holds the run folder."""

    def __init__(self, run_dir: Path, pid: Optional[int]):
        self.pid = pid
        who = f"pid {pid}" if pid else "a process whose pid is not known yet"
        super().__init__(f"run folder {run_dir} is in use by another process ({who}): wait for it to "
                         "end or stop it, then start this run again")


def _lock(run_dir: Path) -> FileLock:
    return FileLock(os.fspath(Path(run_dir) / LOCK_NAME), thread_local=False)


class RunLock:
    """Held by the one process working in `run_dir`; `with RunLock(dir):` or acquire/release."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._lock = _lock(self.run_dir)

    def acquire(self) -> "RunLock":
        try:
            self._lock.acquire(timeout=START_WAIT_S)
        except Timeout:
            raise RunLocked(self.run_dir, locked_by(self.run_dir)) from None
        pid_file = self.run_dir / PID_NAME
        tmp = pid_file.with_name(f"{PID_NAME}.tmp-{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pid_file)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / PID_NAME).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(run_dir: Path) -> Optional[int]:
    try:
        return int((Path(run_dir) / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def locked_by(run_dir: str | os.PathLike) -> Optional[int]:
    """The pid of the process working in `run_dir`, or None if none is.

    0 when a process holds the lock but has not written its pid within PID_WAIT_S (it cannot
    be named). The lock itself is tried for an instant (a pid file alone can name a recycled
    pid); a stage starting at that very moment waits it out (START_WAIT_S).
    """
    run_dir = Path(run_dir)
    probe = _lock(run_dir)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        pass
    except OSError:
        return None         # a folder we cannot even open a file in is not being run here
    else:
        probe.release()
        return None
    # Held: by a process that is about to write its pid (or just did, over a dead one's).
    deadline = time.monotonic() + PID_WAIT_S
    while time.monotonic() < deadline:
        pid = _read_pid(run_dir)
        if pid and pid_alive(pid):
            return pid
        time.sleep(0.05)
    return 0
