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
from typing import Iterable

from engine.checkpoint import latest_checkpoint
from workbench import stages
from workbench.jobs import LOST
from engine.osproc import alive as process_alive
from workbench.runfold import Follower, RunFold
from workbench.runfolder import RunFolderError, read_config
from workbench.store import Store


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
        return self.status in ("stopped", "failed") and latest_checkpoint(self.path / "checkpoints") is not None


def stage_of(run_dir: Path) -> str:
    """The stage from the folder's name (runs/<stage>-<time>), as Project.new_run_dir makes it."""
    return stages.stage_of_folder(run_dir.name) or "unknown"


def parent_runs(stage: str, config: dict, run_dir: Path, runs_dir: Path) -> dict[str, str]:
    """Which runs of this project a config starts from: field -> run folder name."""
    out = {}
    parents = stages.BY_NAME[stage].parents_read(config) if stage in stages.BY_NAME else ()
    for name in (p.field for p in parents):
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
        self._parents_checked = False
        if self._own:
            self.store.index_without_fsync()

    def close(self) -> None:
        if self._own:
            self.store.close()

    def sync(self, max_bytes: int | None = None) -> list[RunInfo]:
        """Bring the index up to date with the folders and return every run, newest first.

        With `max_bytes`, each run's events.jsonl is read at most that far per call (the app
        syncs on its UI thread, a slice at a time) and `behind` says whether a run has more."""
        self.behind = False
        folders = {p.name: p for p in self.runs_dir.iterdir() if p.is_dir()} if self.runs_dir.is_dir() else {}
        rows = {r["name"]: r for r in self.store.run_rows()}
        changed = []
        # Once per store, finished runs' parents are derived again from their configs: the
        # rule may have changed since a run was indexed (GRPO's reward model is no parent at
        # rm_weight 0), or a resume's --set changed an input.
        recheck, self._parents_checked = not self._parents_checked, True
        for name, path in folders.items():
            new_row, caught_up = self._sync_one(path, rows.get(name), max_bytes, recheck)
            self.behind |= not caught_up
            if new_row is not None:
                changed.append(new_row)
        gone = set(rows) - set(folders)
        if changed or gone:
            self.store.write_runs(changed, forget=gone)
        return self.list()

    def _sync_one(self, path: Path, row: dict | None, max_bytes: int | None = None,
                  recheck: bool = False) -> tuple[dict | None, bool]:
        """The run's row with its new events folded in (None: unchanged), and whether every
        event is read (`max_bytes` may leave some for the next call). With `recheck`, a finished
        run's parents are derived again from its config."""
        events = path / "events.jsonl"
        try:
            size = events.stat().st_size
        except FileNotFoundError:
            size = 0
        if row is not None and row["events_offset"] == size and row["status"] != "running":
            return (self._reparented(path, row) if recheck else None), True
        if (row is not None and row["events_offset"] == size and row["status"] == "running"
                and process_alive(row["pid"], path)):
            return None, True     # running, nothing new: no write
        resume_at = row is not None and size >= row["events_offset"]
        follower = Follower(path, fold=RunFold(keep=False, row=row if resume_at else None),
                            offset=row["events_offset"] if resume_at else 0)
        caught_up = max_bytes is None or size - follower.tail.offset <= max_bytes
        new = follower.read(max_bytes)
        fold, tail = follower.fold, follower.tail
        finished = bool(new) and new[-1].get("type") == "done"
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
                   parent_runs(stage, _config_or_empty(path), path, self.runs_dir))
        created = row["created_at"] if row is not None else _created(path)
        return dict(name=path.name, stage=stage, status=fold.status, parents=json.dumps(parents),
                    created_at=created, started_at=fold.started_at, ended_at=fold.ended_at, error=fold.error,
                    pid=fold.pid, step=fold.step, metrics=json.dumps(fold.metrics),
                    events_offset=tail.offset), caught_up

    def _reparented(self, path: Path, row: dict) -> dict | None:
        """The row with the parents its config names now, or None if they are the same (or the
        config is missing or unreadable: the parents indexed from it before are kept)."""
        config = _config_or_empty(path)
        if not config:
            return None
        parents = json.dumps(parent_runs(row["stage"], config, path, self.runs_dir))
        return None if parents == row["parents"] else dict(row, parents=parents)

    def list(self, stage: str | None = None) -> list[RunInfo]:
        return [self._info(r) for r in self.store.run_rows(stage)]

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
        self.store.write_runs([], forget=[name])
        shutil.rmtree(doomed, ignore_errors=True)



def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _config_or_empty(path: Path) -> dict:
    try:
        return read_config(path)
    except RunFolderError:
        return {}


def _created(path: Path) -> float:
    cfg = path / "config.json"
    return (cfg if cfg.exists() else path).stat().st_mtime


def estimate_seconds(stage: str, values: dict, runs: Iterable[RunInfo]) -> tuple[float | None, str]:
    """How long a run with `values` should take, from the newest completed run of the stage
    that reported its length: its seconds per step, scaled by how much work a step does
    (the catalogue's `work` settings); with `epochs` set, from the newest that was also set by
    epochs, its time per pass. (None, "") when no such run exists."""
    spec = stages.spec(stage)
    steps = values.get(spec.steps_field) if spec.steps_field else None
    epochs = values.get("epochs")
    by_epochs = isinstance(epochs, (int, float)) and epochs > 0      # epochs set the steps, not max_steps
    if not by_epochs and (not isinstance(steps, (int, float)) or steps <= 0):
        return None, ""
    for r in runs:
        if r.status != "completed" or not r.step or r.duration_s is None:
            continue
        try:
            then = read_config(r.path)
        except RunFolderError:
            continue
        if by_epochs:
            # Passes over the same data: the time goes with the passes, whatever the batch.
            was = then.get("epochs")
            if isinstance(was, (int, float)) and was > 0:
                return r.duration_s * epochs / was, r.name
            continue
        per_step = r.duration_s / r.step
        scale = 1.0
        for name in spec.work:
            a, b = values.get(name), then.get(name)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
                scale *= a / b
        return per_step * scale * steps, r.name
    return None, ""
