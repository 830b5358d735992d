"""Processes and memory the same way on Linux, macOS and Windows: the one module that asks
which OS it runs on (psutil, not POSIX calls; a branch per platform where they differ).

A job is a child process that must outlive the app that started it: it gets a session (POSIX)
or process group (Windows) of its own, so Ctrl-C in the app's terminal and the app's exit do
not reach it, and it runs at a slightly lower priority, so the window keeps drawing while the
job uses every core. Stopping escalates from the run's STOP file (the job's own, cooperative
way: a checkpoint, then exit) to a terminate request, then to killing the whole tree (torchrun
and every rank).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil

LOWER_PRIORITY = 5          # POSIX niceness added to a job; Windows: below-normal class
# OpenMP's worker threads spin a while between parallel regions before they sleep. Alone that
# saves waking them; two jobs that both spin on the same cores take each other's turns and each
# runs several times slower than it would at half the machine (docs/PERFORMANCE.md). A job
# started while another of ours runs spins briefly (GNU libgomp: a spin count; LLVM and Intel
# OpenMP: milliseconds); the first keeps its spin, so a job alone loses nothing. Settings the
# user made in the environment win.
SHARED_CPU_ENV = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "1"}
# Any of these in an environment is the user's choice of spin, which we then leave alone.
SPIN_SETTINGS = ("OMP_WAIT_POLICY", *SHARED_CPU_ENV)
_ours: set[str] = set()     # the SHARED_CPU_ENV keys spin_briefly put in this process's own environment
# Every child this process started, until it exits: a job may be forgotten (its project
# closed) while its process runs on, and the Popen must outlive it to reap the process.
_children: list[subprocess.Popen] = []


def spawn(cmd: list[str], cwd: Path, env: dict, stdout, stderr) -> subprocess.Popen:
    """Start a job process detached from this one's terminal, at a lower priority (and, beside
    another running job, with SHARED_CPU_ENV)."""
    env = beside_running(env)
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.BELOW_NORMAL_PRIORITY_CLASS
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, creationflags=flags)
    else:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, start_new_session=True)
        lower_priority(proc.pid)
    _children.append(proc)
    return proc


def lower_priority(pid: int) -> None:
    """Lower a process's priority, and its children's (torchrun's ranks start after it)."""
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            if os.name == "nt":
                p.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
            elif p.nice() < LOWER_PRIORITY:
                p.nice(LOWER_PRIORITY)
    except (psutil.Error, OSError):
        pass        # it ended already, or the OS refuses: the job runs, only less politely


def spin_briefly() -> None:
    """SHARED_CPU_ENV for this process itself, when its torch work comes in short bursts beside
    jobs (the app: chat, compare, review), unless the user set these settings. Only before torch
    loads OpenMP, which reads them once. Jobs it starts alone do not inherit them."""
    if "torch" in sys.modules or any(k in os.environ for k in SPIN_SETTINGS):
        return
    os.environ.update(SHARED_CPU_ENV)
    _ours.update(SHARED_CPU_ENV)


def beside_running(env: dict) -> dict:
    """`env`, with SHARED_CPU_ENV added when another child of ours is running and the user set
    none of these settings (nor OMP_WAIT_POLICY) in it; without what spin_briefly set here."""
    env = {k: v for k, v in env.items() if k not in _ours}
    reap()
    if not _children or any(k in env for k in SPIN_SETTINGS):
        return env
    return {**env, **SHARED_CPU_ENV}


def reap() -> None:
    """Collect the exit status of children that ended, so none lingers as a zombie."""
    _children[:] = [p for p in _children if p.poll() is None]


def children() -> list[subprocess.Popen]:
    return list(_children)


def alive(pid: Optional[int], run_dir: Optional[Path] = None) -> bool:
    """Is `pid` a live process, and (given `run_dir`) still one working on that run folder
    rather than a recycled pid?"""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if run_dir is None:
            return True
        args = p.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True         # someone else's process: alive, but we cannot tell more
    if not args:
        return True
    folder = Path(run_dir)
    return any(a == str(folder) or a.endswith(folder.name) for a in args)


def terminate(pid: int) -> bool:
    """Ask a job to stop now (its handler still saves a checkpoint). False if it is gone."""
    try:
        if os.name == "nt":
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            psutil.Process(pid).terminate()
    except (psutil.NoSuchProcess, ProcessLookupError):
        return False
    except (psutil.AccessDenied, OSError):
        return True
    return True


def kill_tree(pid: int) -> None:
    """Kill a job and every process it started (torchrun and its ranks)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def pid_alive(pid: int) -> bool:
    """Does a process with this pid exist (any owner)?"""
    return psutil.pid_exists(pid)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    if os.name == "nt":
        info = psutil.Process().memory_info()
        return info.peak_wset / 2**20                       # Windows' peak working set
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
                if line.startswith("VmHWM:"):               # the high-water mark, in kB
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    import resource                                          # macOS (and any other POSIX)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024     # bytes there, KiB elsewhere


def tree_rss_mb(pid: Optional[int] = None) -> Optional[float]:
    """Resident memory of a process and all its descendants in MB (this process: pid None)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def cache_dir() -> Path:
    """This user's cache folder for the workbench (WORKBENCH_CACHE_DIR overrides): what is
    measured once per machine, never project data."""
    if os.environ.get("WORKBENCH_CACHE_DIR"):
        return Path(os.environ["WORKBENCH_CACHE_DIR"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "workbench"

