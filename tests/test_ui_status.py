"""The status bar's memory figure for a job counts every process of it (torchrun and its ranks)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ui.status_bar import job_rss_mb, rss_mb

CHILD = "x = bytearray(64 * 2**20); x[::4096] = b'1' * len(x[::4096]); import time; time.sleep(60)"
LEADER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {CHILD!r}]); time.sleep(60)"


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_a_job_in_its_own_session_counts_all_its_processes():
    with subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True) as leader:
        try:
            deadline = time.monotonic() + 30
            child = None
            while time.monotonic() < deadline:
                kids = children_of(leader.pid)
                if kids and (rss_mb(kids[0]) or 0) > 64:
                    child = kids[0]
                    break
                time.sleep(0.1)
            assert child is not None, "the child never touched its 64 MB"
            # the child may still be finishing its page-touching loop: compare only once the
            # session's memory has stopped moving
            last = -1.0
            while time.monotonic() < deadline and abs(job_rss_mb(child) - last) >= 0.5:
                last = job_rss_mb(child)
                time.sleep(0.3)
            whole = job_rss_mb(child)          # a rank's pid: the job is its whole session
            assert whole >= rss_mb(child) + rss_mb(leader.pid) - 1
            assert abs(job_rss_mb(leader.pid) - whole) < 2
        finally:
            os.killpg(leader.pid, signal.SIGKILL)
