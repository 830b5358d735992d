"""The run store: every run folder of a project, its stage, status, lineage and final metrics.

The folders are the truth (a run is reproducible from its folder alone, and the CLI makes
runs without asking the app); the `runs` table of workbench.db is an index over them, kept up
to date by `RunStore.sync()`, which reads only what was appended to each events.jsonl since
the last sync. So listing a project with hundreds of runs costs a stat per folder, and a run
made by `workbench pipeline` in a terminal shows up in the app with its lineage.

Status comes from the events: the last `start` or `done` decides. A run whose last event is a
`start` is running if its process is alive, else it ended without saying so (killed, power
loss) and is shown as failed, resumable from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from workbench.store import Store

STAGE_NAMES = ("tokenizer", "pretrain", "sft", "sample", "reward", "ppo")
FINAL = ("completed", "stopped", "failed")
# Config fields that name another run's artifact, per stage: these make the lineage.
PARENT_FIELDS = {
    "pretrain": ("tokenizer",),
    "sft": ("init", "tokenizer"),
    "sample": ("checkpoint", "tokenizer"),
    "reward": ("init", "tokenizer"),
    "ppo": ("policy", "reward_model", "value_model"),
}
LOST = "the process ended without a done event (killed, or the machine stopped); resume to continue"


@dataclass
class RunInfo:
    name: str
    stage: str
    path: Path
    status: str                       # created | running | completed | stopped | failed
    parents: dict[str, str]           # config field -> parent run name
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    pid: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else (time.time() if self.status == "running" else None)
        return None if end is None else max(0.0, end - self.started_at)

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "failed") and any((self.path / "checkpoints").glob("step-*"))


class EventTail:
    """Reads the lines appended to an events.jsonl since the last call; a half-written last
    line is left for the next call, so a reader never sees a torn event."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def read_new(self, max_bytes: int | None = None) -> list[dict]:
        """New complete lines; at most about `max_bytes` of them per call, so a reader catching
        up on a long file can spread the work over several calls."""
        return list(self.iter_new(max_bytes))

    def iter_new(self, max_bytes: int | None = None) -> Iterator[dict]:
        """read_new one event at a time (the offset moves on at once): a fold that takes them
        as they come never holds thousands alive for the UI thread's collector to walk."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:      # the file was replaced: start over
            self.offset = 0
        if size == self.offset:
            return
        want = size - self.offset if max_bytes is None else min(size - self.offset, max_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(want)
        end = data.rfind(b"\n") + 1
        if end == 0 and want < size - self.offset:
            # One line longer than max_bytes: read on to its end rather than never progress.
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
            end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue


def process_alive(pid: int | None, run_dir: Path) -> bool:
    """Is `pid` alive and still the stage process of this run (not a recycled pid)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return os.fsencode(str(run_dir)) in args or os.fsencode(run_dir.name) in b" ".join(args)
    return True     # no /proc (macOS): a live pid is the best we know


def stage_of(run_dir: Path) -> str:
    """The stage from the folder's name (runs/<stage>-<time>), as Project.new_run_dir makes it."""
    head = run_dir.name.split("-", 1)[0]
    return head if head in STAGE_NAMES else "unknown"


def parent_runs(stage: str, config: dict, run_dir: Path, runs_dir: Path) -> dict[str, str]:
    """Which runs of this project a config starts from: field -> run folder name."""
    out = {}
    for name in PARENT_FIELDS.get(stage, ()):
        value = config.get(name)
        if not isinstance(value, str) or not value:
            continue
        target = Path(value) if Path(value).is_absolute() else run_dir / value
        try:
            rel = Path(os.path.normpath(target)).relative_to(os.path.normpath(runs_dir))
        except ValueError:
            continue            # outside the project: an imported checkpoint
        if rel.parts and rel.parts[0] != run_dir.name:
            out[name] = rel.parts[0]
    return out


class _Fold:
    """What the store keeps from a run's events, updated from appended lines only."""

    def __init__(self, row: dict | None):
        row = row or {}
        self.status = row.get("status", "created")
        self.started_at = row.get("started_at")
        self.ended_at = row.get("ended_at")
        self.error = row.get("error")
        self.pid = row.get("pid")
        self.step = row.get("step")
        self.metrics = json.loads(row.get("metrics") or "{}")
        self.stage = row.get("stage")

    def add(self, ev: dict) -> None:
        t = ev.get("type")
        if t == "start":
            self.status, self.error, self.ended_at = "running", None, None
            self.pid = ev.get("pid")
            self.stage = ev.get("stage") or self.stage
            if self.started_at is None:
                self.started_at = ev.get("time")
        elif t == "done":
            self.status, self.error = ev.get("status", "failed"), ev.get("error")
            self.ended_at = ev.get("time")
            if self.started_at is None:
                self.started_at = ev.get("time")
        elif t == "metrics":
            self.step = ev.get("step", self.step)
            self.metrics.update({k: v for k, v in ev.items() if "/" in k})
        elif t == "progress":
            self.step = ev.get("step", self.step)


def lineage_of(runs: Iterable[RunInfo], name: str) -> list[RunInfo]:
    """The run `name` and its ancestors among `runs`, nearest first (tokenizer last)."""
    by_name = {r.name: r for r in runs}
    out, todo, seen = [], [name], set()
    while todo:
        n = todo.pop(0)
        if n in seen or n not in by_name:
            continue
        seen.add(n)
        out.append(by_name[n])
        todo.extend(by_name[n].parents.values())
    return out


class RunStore:
    """The project's runs; one per app window, on the UI thread (a Store is single-threaded)."""

    def __init__(self, project_dir: str | Path, store: Store | None = None):
        self.project_dir = Path(project_dir)
        self.runs_dir = self.project_dir / "runs"
        self._own = store is None
        self.store = store or Store.for_project(self.project_dir)
        self.behind = False         # the last sync left unread events (its max_bytes)
        if self._own:
            # The index is rebuilt from the folders whenever it is lost, so its commits need
            # not wait for the disk (FULL, the annotation store's setting, fsyncs every one;
            # the app syncs every few seconds on the UI thread).
            self.store.conn.execute("PRAGMA synchronous=OFF")

    def close(self) -> None:
        if self._own:
            self.store.close()

    def sync(self, max_bytes: int | None = None) -> list[RunInfo]:
        """Bring the index up to date with the folders and return every run, newest first.

        With `max_bytes`, each run's events.jsonl is read at most that far per call (the app
        syncs on its UI thread, a slice at a time) and `behind` says whether a run has more."""
        self.behind = False
        folders = {p.name: p for p in self.runs_dir.iterdir() if p.is_dir()} if self.runs_dir.is_dir() else {}
        conn = self.store.conn
        conn.row_factory = _dict_row
        try:
            rows = {r["name"]: r for r in conn.execute("SELECT * FROM runs")}
        finally:
            conn.row_factory = None
        with self.store.transaction() as c:
            for name in set(rows) - set(folders):
                c.execute("DELETE FROM runs WHERE name = ?", (name,))
            for name, path in folders.items():
                if not self._sync_one(c, path, rows.get(name), max_bytes):
                    self.behind = True
        return self.list()

    def _sync_one(self, c, path: Path, row: dict | None, max_bytes: int | None = None) -> bool:
        """Fold the run's new events into its row; False if `max_bytes` left some unread."""
        events = path / "events.jsonl"
        try:
            size = events.stat().st_size
        except FileNotFoundError:
            size = 0
        if row is not None and row["events_offset"] == size and row["status"] != "running":
            return True
        if (row is not None and row["events_offset"] == size and row["status"] == "running"
                and process_alive(row["pid"], path)):
            return True     # running, nothing new: no write
        fold = _Fold(row if row is not None and size >= row["events_offset"] else None)
        tail = EventTail(events, row["events_offset"] if row is not None and size >= row["events_offset"] else 0)
        caught_up = max_bytes is None or size - tail.offset <= max_bytes
        finished = False
        for ev in tail.iter_new(max_bytes):
            fold.add(ev)
            finished = ev.get("type") == "done"
        if finished and fold.status == "completed":
            # A stage that ends by re-evaluating its chosen checkpoint (the reward model's best)
            # writes those figures to summary.json before `done`: they, not the last logged
            # evaluation, are the run's result.
            summary = _read_json(path / "summary.json")
            fold.metrics.update({k: v for k, v in summary.items()
                                 if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)})
        if caught_up and fold.status == "running" and not process_alive(fold.pid, path):
            # (only once every line is read: the unread ones may hold its `done`)
            fold.status, fold.error = "failed", LOST
        stage = fold.stage or (row or {}).get("stage") or stage_of(path)
        parents = (json.loads(row["parents"]) if row is not None and row["parents"] != "{}" else
                   parent_runs(stage, _read_json(path / "config.json"), path, self.runs_dir))
        created = row["created_at"] if row is not None else _created(path)
        c.execute(
            """INSERT INTO runs (name, stage, status, parents, created_at, started_at, ended_at, error,
                                 pid, step, metrics, events_offset)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET stage=excluded.stage, status=excluded.status,
                 parents=excluded.parents, started_at=excluded.started_at, ended_at=excluded.ended_at,
                 error=excluded.error, pid=excluded.pid, step=excluded.step, metrics=excluded.metrics,
                 events_offset=excluded.events_offset""",
            (path.name, stage, fold.status, json.dumps(parents), created, fold.started_at, fold.ended_at,
             fold.error, fold.pid, fold.step, json.dumps(fold.metrics), tail.offset))
        return caught_up

    def list(self, stage: str | None = None) -> list[RunInfo]:
        query = "SELECT * FROM runs" + (" WHERE stage = ?" if stage else "") + " ORDER BY created_at DESC, name DESC"
        conn = self.store.conn
        conn.row_factory = _dict_row
        try:
            rows = list(conn.execute(query, (stage,) if stage else ()))
        finally:
            conn.row_factory = None
        return [self._info(r) for r in rows]

    def get(self, name: str) -> RunInfo | None:
        return next((r for r in self.list() if r.name == name), None)

    def _info(self, r: dict) -> RunInfo:
        return RunInfo(name=r["name"], stage=r["stage"], path=self.runs_dir / r["name"], status=r["status"],
                       parents=json.loads(r["parents"]), created_at=r["created_at"], started_at=r["started_at"],
                       ended_at=r["ended_at"], error=r["error"], pid=r["pid"], step=r["step"],
                       metrics=json.loads(r["metrics"]))

    def children(self, name: str) -> list[RunInfo]:
        return [r for r in self.list() if name in r.parents.values()]

    def lineage(self, name: str) -> list[RunInfo]:
        """The run and its ancestors, nearest first (tokenizer last)."""
        return lineage_of(self.list(), name)

    def delete(self, name: str) -> None:
        """Delete a run's folder and its row; refuses a running run."""
        info = self.get(name)
        if info is None:
            raise KeyError(f"no run named {name}")
        if info.status == "running" and process_alive(info.pid, info.path):
            raise RuntimeError(f"{name} is running; stop it before deleting it")
        # Rename first: a half-deleted folder must not look like a damaged run on the next sync.
        doomed = info.path.with_name(f".deleting-{name}")
        info.path.rename(doomed)
        with self.store.transaction() as c:
            c.execute("DELETE FROM runs WHERE name = ?", (name,))
        shutil.rmtree(doomed, ignore_errors=True)



def _dict_row(cursor, row) -> dict:
    return {d[0]: v for d, v in zip(cursor.description, row)}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _created(path: Path) -> float:
    cfg = path / "config.json"
    return (cfg if cfg.exists() else path).stat().st_mtime
