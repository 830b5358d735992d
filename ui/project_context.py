"""The open project as the widgets see it: its runs, its jobs, and signals when either changes.

Widgets are given this object and subscribe to it (DESIGN.md: a widget never owns training
state). It starts jobs through ui/jobs.py, re-attaches to jobs a previous app session left
running, and keeps the run store in step with the folders on a slow timer, so a run made by
the CLI in a terminal appears in the app without a refresh button.
"""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from engine.config import save_config, to_dict
from workbench.project import Project
from workbench.runs import RunInfo, RunStore, lineage_of, process_alive
from ui.jobs import Job, reap

SYNC_MS = 3000
SYNC_BYTES = 256 * 1024     # per run and turn: ~2,500 events, ~25 ms
# Which stages' runs a picker for an artifact kind offers.
ARTIFACT_STAGES = {"tokenizer": ("tokenizer",), "checkpoint": ("pretrain", "sft", "ppo"), "reward": ("reward",)}


class ProjectContext(QObject):
    runsChanged = Signal()
    jobStarted = Signal(object)      # Job
    jobFinished = Signal(object)     # Job

    def __init__(self, project: Project, parent: QObject | None = None):
        super().__init__(parent)
        self.project = project
        self.path = project.path
        self.runs = RunStore(project.path)
        self.jobs: dict[str, Job] = {}           # run name -> live job
        self._infos: list[RunInfo] = []
        self.sync()
        self._timer = QTimer(self)
        self._timer.setInterval(SYNC_MS)
        self._timer.timeout.connect(self.sync)
        self._timer.start()
        self._catch_up = QTimer(self, singleShot=True, interval=0)
        self._catch_up.timeout.connect(self.sync)

    def close(self) -> None:
        """Stop watching; running jobs keep running (the next session re-attaches)."""
        self._timer.stop()
        self._catch_up.stop()
        for job in self.jobs.values():
            job.detach()
        self.runs.close()

    # --- runs -----------------------------------------------------------------------------------

    def sync(self) -> list[RunInfo]:
        """Bring the run list up to date (every few seconds, and when the app starts or ends
        a job). On the UI thread, a slice at a time: a run that has more events than SYNC_BYTES
        unread is read on in the next turns of the event loop. Not on a worker thread: folding
        events is pure Python, and a thread doing it holds the GIL that every paint of a Python
        widget needs (a job streaming 4,500 events/s stalled the window 0.4 s that way)."""
        reap()
        self._apply(self.runs.sync(max_bytes=SYNC_BYTES))
        if self.runs.behind:
            self._catch_up.start()
        return self._infos

    def _apply(self, infos: list[RunInfo]) -> None:
        before = [(r.name, r.status, r.step) for r in self._infos]
        self._infos = infos
        if [(r.name, r.status, r.step) for r in self._infos] != before:
            self.runsChanged.emit()

    # The UI asks these many times per click: they read the list the last sync made, not
    # the database.
    def run(self, name: str) -> RunInfo | None:
        return next((r for r in self._infos if r.name == name), None)

    def lineage(self, name: str) -> list[RunInfo]:
        return lineage_of(self._infos, name)

    def run_list(self, stage: str | None = None) -> list[RunInfo]:
        return [r for r in self._infos if stage is None or r.stage == stage]

    def latest(self, stage: str) -> RunInfo | None:
        runs = self.run_list(stage)
        return runs[0] if runs else None

    def artifacts(self, kind: str) -> list[tuple[str, Path]]:
        """Choices for an artifact picker: finished or checkpointed runs, newest first."""
        out = []
        for r in self.run_list():
            if r.stage not in ARTIFACT_STAGES.get(kind, ()):
                continue
            if kind == "tokenizer":
                if (r.path / "tokenizer.json").exists():
                    out.append((f"{r.name} (vocab {int(r.metrics.get('tokenizer/vocab_size', 0)) or '?'})", r.path))
            elif any((r.path / "checkpoints").glob("step-*")):
                out.append((f"{r.name} ({r.status}, step {r.step})", r.path))
        return out

    def checkpoints(self) -> list[tuple[str, Path]]:
        return self.artifacts("checkpoint")

    # --- jobs -----------------------------------------------------------------------------------

    def new_run_dir(self, stage: str) -> Path:
        return self.project.new_run_dir(stage)

    def launch(self, stage: str, config, run_dir: Path | None = None) -> Job:
        """Write the config into a (new) run folder, with paths inside the project made
        relative to it so the project folder can be moved, and start the stage."""
        run_dir = run_dir or self.new_run_dir(stage)
        values = relativize(to_dict(config), run_dir, self.path)
        from workbench.forms import config_class
        from engine.config import from_dict
        save_config(from_dict(config_class(stage), values), run_dir / "config.json")
        return self._start(Job(stage, run_dir, self))

    def resume(self, name: str) -> Job:
        info = self.run(name)
        if info is None:
            raise KeyError(name)
        return self._start(Job(info.stage, info.path, self))

    def _start(self, job: Job) -> Job:
        self.jobs[job.run_dir.name] = job
        job.finished.connect(lambda *_: self._on_finished(job))
        job.start()
        self.sync()
        self.jobStarted.emit(job)
        return job

    def _on_finished(self, job: Job) -> None:
        self.sync()
        self.jobFinished.emit(job)

    def reattach(self) -> list[Job]:
        """Follow the runs a previous session left running; returns the jobs attached."""
        attached = []
        for info in self.run_list():
            if info.status == "running" and info.name not in self.jobs and process_alive(info.pid, info.path):
                job = Job(info.stage, info.path, self)
                self.jobs[info.name] = job
                job.finished.connect(lambda *_, j=job: self._on_finished(j))
                job.attach(info.pid)
                attached.append(job)
                self.jobStarted.emit(job)
        return attached

    def job_for(self, name: str) -> Job | None:
        return self.jobs.get(name)

    def running_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.running]


def relativize(values: dict, run_dir: Path, project_dir: Path) -> dict:
    """Absolute paths inside the project -> relative to the run folder (how the engine reads
    them); anything else as given."""
    from workbench.forms import ARTIFACT_FIELDS, DATA_FIELDS
    root = os.path.abspath(project_dir)

    def rel(v):
        if isinstance(v, str) and os.path.isabs(v) and os.path.abspath(v).startswith(root + os.sep):
            return os.path.relpath(v, run_dir)
        return v

    out = dict(values)
    for key, v in values.items():
        if key in ARTIFACT_FIELDS or key in DATA_FIELDS:
            out[key] = [rel(x) for x in v] if isinstance(v, list) else rel(v)
    return out
