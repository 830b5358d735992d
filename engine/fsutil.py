"""Crash-safe file writes (write to a temporary name, fsync, rename, fsync the folder), a full
disk reported as such, and the fault points the fault tests kill a process at."""
from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

from engine.runio import StageError

FAULT_ENV = "WORKBENCH_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when WORKBENCH_FAULT is `name` (or `name@N`: at its Nth pass).

    The only way to prove that a run survives a kill at each phase of a save or a prune without
    strace (which CI may lack): the test names the phase, the process dies there, the test
    reruns the stage. Costs one dictionary lookup when the variable is unset.
    """
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    target, _, nth = want.partition("@")
    if target != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        _die()


def _die() -> None:
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))   # Windows has no SIGKILL


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno is None:
        # numpy's tofile (the GGUF writer's) reports a full disk as a short write, no errno.
        return " requested and " in str(e) and str(e).endswith("written")
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors writes in Rust and reports the OS error in its text only.
    return any(f"(os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT))


class DiskFull(StageError, OSError):
    """No space left where the run writes: said in one line, with what is free, not a traceback.
    Still an OSError with errno ENOSPC, so callers that handle OSError go on doing so."""

    def __init__(self, path: str | os.PathLike):
        OSError.__init__(self, errno.ENOSPC, disk_full_message(path))

    def __str__(self) -> str:
        return self.strerror


def nearly_full(path: str | os.PathLike, below: int = 1 << 20) -> bool:
    """Is less than `below` bytes free where `path` is (False where that cannot be told)?"""
    try:
        return shutil.disk_usage(path).free < below
    except OSError:
        return False


def disk_full_message(path: str | os.PathLike) -> str:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = f"{shutil.disk_usage(path).free / 1e6:.1f}"
    except OSError:
        free = "?"
    return f"disk full: {free} MB free in {path}"


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: a rename into it is then on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path     # the names callers read best by


def atomic_write_bytes(path: Path, data: bytes, fault: str = "") -> None:
    """`path` holds `data` whole, or what it held before: never a torn write. `fault` names a
    fault point inside the write (tests kill the process there)."""
    path = Path(path)
    if path.is_dir():       # else the rename fails naming the temporary file, not this one
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if fault:
                fault_point(fault)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(path.parent) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, fault: str = "") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (before the rename that publishes it)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))
