"""The status bar's machine line: device, GPU memory when CUDA is present, memory of the app
and of its running jobs. Updated every 2 s from /proc and torch.cuda; cheap enough for the UI
thread (a few file reads)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import psutil
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel

INTERVAL_MS = 2000


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process in MB (this one when pid is None)."""
    path = Path(f"/proc/{pid or 'self'}/status")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:              # no /proc (macOS, Windows): psutil knows
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, resident pages) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces
    return int(fields[1]), int(fields[3]), int(fields[21])


def job_rss_mb(pid: int) -> float | None:
    """Resident memory of a job: all processes of its session when the job leads it (the app
    starts each job in its own session, and a DDP job is torchrun plus one process per rank),
    else the process alone (a run started from a terminal shares the shell's session)."""
    own = _stat(pid)
    if own is None:
        return rss_mb(pid)
    ppid, sid, _ = own
    if sid not in (pid, ppid):
        return rss_mb(pid)
    pages = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == sid:
                pages += st[2]
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_text() -> str:
    import torch
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "GPU: Apple MPS"
    return f"CPU ({os.cpu_count()} cores)"


def gpu_memory_text() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None
    # mem_get_info is the whole device, so it counts the training jobs' child processes too.
    free, total = torch.cuda.mem_get_info()
    return f"GPU memory {(total - free) / 2**30:.1f}/{total / 2**30:.0f} GB"


class MachineStatus(QLabel):
    def __init__(self, job_pids: Callable[[], list[int]], parent=None):
        super().__init__(parent)
        self.job_pids = job_pids
        # Asked of PyTorch once something else has loaded it (a project's pages do): importing it
        # here would hold back the window's first paint by a second.
        self.device: str | None = None
        self.setToolTip("The device jobs run on by default, and memory in use")
        self._timer = QTimer(self)
        self._timer.setInterval(INTERVAL_MS)
        self._timer.timeout.connect(self.update_text)
        self._timer.start()
        self.update_text()

    def update_text(self) -> None:
        if self.device is None and "torch" in sys.modules:
            self.device = device_text()
        parts = [self.device or f"{os.cpu_count()} cores"]
        gpu = gpu_memory_text() if self.device is not None else None
        if gpu:
            parts.append(gpu)
        app = rss_mb()
        if app is not None:
            parts.append(f"app {app:.0f} MB")
        jobs = [m for m in (job_rss_mb(p) for p in self.job_pids()) if m is not None]
        if jobs:
            parts.append(f"{len(jobs)} job(s) {sum(jobs):.0f} MB")
        self.setText("  ·  ".join(parts))
