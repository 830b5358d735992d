"""The open project as the widgets see it: its runs, its jobs, and signals when either changes.

Widgets are given this object and subscribe to it (DESIGN.md: a widget never owns training
state). It makes run folders through workbench/runfolder.py and starts jobs through ui/jobs.py
(both shared with the CLI and the pipeline), re-attaches to jobs a previous app session left
running, and keeps the run index in step with the folders on a slow timer, so a run made by the
CLI in a terminal appears in the app without a refresh button.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import QObject, QTimer, Signal

from engine.checkpoint import latest_checkpoint
from engine.config import to_dict
from workbench import runfolder, stages
from engine.osproc import alive as process_alive
from engine.osproc import reap
from workbench.project import SETTINGS, Project
from workbench.runs import RunInfo, RunStore, lineage_of
from ui.jobs import Job

SYNC_MS = 3000
SYNC_BYTES = 256 * 1024     # per run and turn: ~2,500 events, ~25 ms


class ProjectContext(QObject):
    runsChanged = Signal()
    jobStarted = Signal(object)      # Job
    jobFinished = Signal(object)     # Job
    jobFollowed = Signal(object)     # Job: a run another process started (a window, a terminal)
    projectGone = Signal(bool)       # True: the folder was moved or deleted; False: it is back

    def __init__(self, project: Project, parent: QObject | None = None):
        super().__init__(parent)
        self.project = project
        self.path = project.path
        self.runs = RunStore(project.path)
        self.jobs: dict[str, Job] = {}           # run name -> live job
        self._infos: list[RunInfo] = []
        self._following = False      # runs started elsewhere are followed once reattach() has run
        self.gone = False            # the folder is not where it was opened (moved, deleted)
        # Made before the first sync, which starts _catch_up when a run has more unread events
        # than one slice (a long run's log, on the first open of a project).
        self._catch_up = QTimer(self, singleShot=True, interval=0)
        self._catch_up.timeout.connect(self.sync)
        self._timer = QTimer(self)
        self._timer.setInterval(SYNC_MS)
        self._timer.timeout.connect(self.sync)
        self.sync()
        self._timer.start()

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
        gone = not (self.path / SETTINGS).is_file()
        if gone != self.gone:
            self.gone = gone
            self.projectGone.emit(gone)
        if gone:        # what it held stays on screen, rather than a project of nothing
            return self._infos
        self._apply(self.runs.sync(max_bytes=SYNC_BYTES))
        if self.runs.behind:
            self._catch_up.start()
        elif self._following:
            self._follow_others()
        return self._infos

    def _follow_others(self) -> None:
        """Follow, as jobs of this window, the runs another process started since the project
        opened (a second window, `workbench run`, a pipeline): their pages show them live and
        Stop reaches them. Said with jobFollowed, not jobStarted: a page showing something else
        (a new run's settings being typed) stays as it is."""
        for job in self._attach(self._infos):
            self.jobFollowed.emit(job)

    def _attach(self, infos: list[RunInfo]) -> list[Job]:
        attached = []
        for info in infos:
            # A job of this window that has ended is no longer the run's: a resume elsewhere
            # (a terminal, another window) is followed anew.
            old = self.jobs.get(info.name)
            if info.status == "running" and (old is None or not old.running) \
                    and process_alive(info.pid, info.path):
                job = Job(info.stage, info.path, self)
                self.jobs[info.name] = job
                job.finished.connect(lambda *_, j=job: self._on_finished(j))
                job.attach(info.pid)
                attached.append(job)
        return attached

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

    def usable(self, r: RunInfo, kind: str) -> bool:
        """Does the run hold an artifact of this kind yet (a finished tokenizer, a checkpoint)?"""
        if r.stage not in stages.ARTIFACT_STAGES.get(kind, ()):
            return False
        if kind == "tokenizer":
            return (r.path / "tokenizer.json").exists()
        return latest_checkpoint(r.path / "checkpoints") is not None

    def artifacts(self, kind: str) -> list[tuple[str, Path]]:
        """Choices for an artifact picker: runs that hold one, newest first."""
        out = []
        for r in self.run_list():
            if not self.usable(r, kind):
                continue
            if kind == "tokenizer":
                out.append((f"{r.name} (vocab {int(r.metrics.get('tokenizer/vocab_size', 0)) or '?'})", r.path))
            else:
                out.append((f"{r.name} ({r.status}, step {r.step})", r.path))
        return out

    def checkpoints(self) -> list[tuple[str, Path]]:
        """Language models to chat with or sample from: fine-tuned ones first (a stage that
        starts from another model: SFT, PPO), newest first, then base models."""
        found = self.artifacts("checkpoint")
        tuned = [c for c in found if stages.fine_tunes(stages.stage_of_folder(c[1].name))]
        return tuned + [c for c in found if c not in tuned]

    def newest(self, parent: stages.Parent, method: bool = False) -> Optional[Path]:
        """The newest run that holds what `parent` loads, of a stage it expects; for an alignment
        method's model, the newest SFT run when there is one (as the pipeline does), so PPO, DPO
        and GRPO started one after another all start from it and compare."""
        wanted = ("sft",) if method and parent.kind == "checkpoint" and "sft" in parent.expects else ()
        for stages_ in (wanted, parent.expects):
            for r in self.run_list():
                if r.stage in stages_ and self.usable(r, parent.kind):
                    return r.path
        return None

    def suggested_values(self, stage: str) -> dict:
        method = stages.spec(stage).method
        return runfolder.suggested_values(self.project, stage, lambda p: self.newest(p, method))

    # --- jobs -----------------------------------------------------------------------------------

    def preflight_dir(self, stage: str) -> Path:
        """Where a new run's relative paths would start from, for runfolder.preflight: never
        made, and a name no run folder has (a real one's checkpoints would be taken for a
        resume's). The form's paths are absolute, and kept so."""
        return self.path / "runs" / f".new-{stage}"

    def new_run_dir(self, stage: str) -> Path:
        return self.project.new_run_dir(stage)

    def launch(self, stage: str, values, rankings: runfolder.Rankings | None = None) -> Job:
        """Make a new run folder from `values` (a dict, or a stage's config) and start it.
        Raises ConfigError or ValueError, leaving no folder, when it cannot start."""
        if not isinstance(values, dict):
            values = to_dict(values)
        if (problem := runfolder.preflight(stage, values, self.preflight_dir(stage))) is not None:
            raise problem
        run_dir = runfolder.new_run(self.project, stage, values, rankings=rankings)
        return self._start(Job(stage, run_dir, self))

    def resume(self, name: str, values: dict | None = None) -> Job:
        """Continue a run from its last checkpoint; `values` (edits made before Resume, such as
        a larger max_steps) go into its config first. The engine refuses changes that would
        make it a different run, and says which."""
        info = self.run(name)
        if info is None:
            raise KeyError(name)
        if values is not None:
            # Refused here, config.json untouched: written first, a change a resume cannot take
            # (a batch size) failed the run at once and stayed in its config.json.
            if (problem := runfolder.preflight(info.stage, values, info.path, self.path)) is not None:
                raise problem
            runfolder.write_config(info.stage, values, info.path, self.path)
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
        attached = self._attach(self.run_list())
        for job in attached:
            self.jobStarted.emit(job)
        self._following = True
        return attached

    def job_for(self, name: str) -> Job | None:
        return self.jobs.get(name)

    def running_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.running]
