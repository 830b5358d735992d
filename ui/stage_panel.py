"""One training stage's page: settings, inputs and their preview, Start / Stop / Resume,
progress, live plots, samples, the log, and the error of a failed run.

The panel shows one run at a time: "New run" (the form, filled with suggested settings) or an
existing run of the stage (its settings, its plots from events.jsonl, and, while it runs, new
events as the job reads them). It never trains anything itself; it asks the ProjectContext
to launch or resume a job and subscribes to that job's signals.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QLabel, QMessageBox,
                               QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSplitter,
                               QTabWidget, QTextBrowser, QVBoxLayout, QWidget)

from engine.config import from_dict, save_config
from engine.runio import format_count, format_duration
from workbench.forms import ARTIFACT_FIELDS, DATA_FIELDS, check, config_class, defaults
from workbench.runs import EventTail, RunInfo
from workbench.suggest import suggested_values
from ui.config_form import ConfigForm
from ui.data_preview import DataPreview
from ui.plots import PlotGrid, RunHistory
from ui.project_context import ProjectContext, relativize

NEW_RUN = "New run"
ERROR_STYLE = ("QFrame#error { border: 1px solid #d9534f; border-radius: 4px; "
               "background: rgba(217, 83, 79, 0.10); }")


class StagePanel(QWidget):
    runSelected = Signal(str)        # run name, '' for a new run

    def __init__(self, ctx: ProjectContext, stage: str, title: str, blurb: str, parent=None):
        super().__init__(parent)
        self.ctx, self.stage = ctx, stage
        self.run: RunInfo | None = None       # the run shown; None = a new run
        self._job = None
        self._loader: HistoryLoader | None = None
        self._data_ok = True

        # --- left: run, settings, controls -------------------------------------------------
        heading = QLabel(f"<h2 style='margin:0'>{html.escape(title)}</h2>")
        about = QLabel(blurb)
        about.setWordWrap(True)
        about.setForegroundRole(about.foregroundRole())
        self.run_combo = QComboBox()
        self.run_combo.setToolTip("Start a new run, or open one of this stage's runs to see its plots, "
                                  "resume it or watch it train")
        self.run_combo.activated.connect(self._on_run_chosen)
        self.form = ConfigForm(stage, ctx.artifacts)
        self.form.validity.connect(lambda _e: self._update_buttons())
        self.form.changed.connect(self._schedule_preview)
        self.extra = QVBoxLayout()          # subclasses put stage-specific inputs here
        self.start_btn = QPushButton("Start")
        self.start_btn.setDefault(True)
        self.stop_btn = QPushButton("Stop")
        self.resume_btn = QPushButton("Resume")
        self.start_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.stop)
        self.resume_btn.clicked.connect(self.resume)
        self.start_btn.setToolTip("Start a new run with these settings (a shown run's settings make a new run)")
        self.stop_btn.setToolTip("Save a checkpoint and stop (the run can be resumed)")
        self.resume_btn.setToolTip("Continue this run from its last checkpoint; raise max steps to train longer")
        buttons = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.resume_btn):
            buttons.addWidget(b)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress_label = QLabel(" ")
        self.status_label = QLabel(" ")
        self.status_label.setWordWrap(True)
        self.error_box = QFrame()
        self.error_box.setObjectName("error")
        self.error_box.setStyleSheet(ERROR_STYLE)
        self.error_text = QLabel()
        self.error_text.setWordWrap(True)
        self.error_text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        QVBoxLayout(self.error_box).addWidget(self.error_text)
        self.error_box.hide()

        left_inner = QWidget()
        left = QVBoxLayout(left_inner)
        left.addWidget(heading)
        left.addWidget(about)
        row = QHBoxLayout()
        row.addWidget(QLabel("Run"))
        row.addWidget(self.run_combo, 1)
        left.addLayout(row)
        left.addWidget(self.form)
        left.addLayout(self.extra)
        left.addLayout(buttons)
        left.addWidget(self.progress)
        left.addWidget(self.progress_label)
        left.addWidget(self.status_label)
        left.addWidget(self.error_box)
        left.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left_inner)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setMinimumWidth(360)

        # --- right: what the run shows ----------------------------------------------------
        self.tabs = QTabWidget()
        self.plots = PlotGrid(stage)
        self.samples = QTextBrowser()
        self.samples.setOpenLinks(False)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.preview = DataPreview()
        self.preview.validated.connect(self._on_data_validated)
        self.tabs.addTab(self.plots, "Plots")
        self.tabs.addTab(self.samples, "Samples")
        self.tabs.addTab(self.log, "Log")
        self.tabs.addTab(self.preview, "Data")

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(scroll)
        split.addWidget(self.tabs)
        split.setStretchFactor(1, 1)
        split.setSizes([420, 900])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(split)

        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(400)
        self._preview_timer.timeout.connect(self.refresh_preview)
        ctx.runsChanged.connect(self._on_runs_changed)
        ctx.jobStarted.connect(self._on_job_started)
        self._fill_runs()
        # Open on the newest run (its plots are what a returning user wants to see); "New run"
        # is one click away, and Start also starts a new run from a shown run's settings.
        self.show_run(ctx.latest(stage))

    # --- which run is shown -------------------------------------------------------------------

    def _fill_runs(self) -> None:
        current = self.run.name if self.run else ""
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        self.run_combo.addItem(NEW_RUN, "")
        for r in self.ctx.run_list(self.stage):
            self.run_combo.addItem(f"{r.name} — {r.status}", r.name)
        i = self.run_combo.findData(current)
        self.run_combo.setCurrentIndex(max(i, 0))
        self.run_combo.blockSignals(False)

    def _on_run_chosen(self, index: int) -> None:
        name = self.run_combo.itemData(index)
        self.show_run(self.ctx.run(name) if name else None)

    def select_run(self, name: str) -> None:
        if self.ctx.run(name) is None:     # a folder made since the last sync
            self.ctx.sync()
        self._fill_runs()
        self.show_run(self.ctx.run(name))

    def show_run(self, info: RunInfo | None) -> None:
        self._detach()
        self.run = info
        i = self.run_combo.findData(info.name if info else "")
        self.run_combo.setCurrentIndex(max(i, 0))
        self.plots.clear()
        self.samples.clear()
        self.log.clear()
        self.progress.setValue(0)
        self.progress_label.setText(" ")
        self.error_box.hide()
        self.form.refresh_choices()
        if info is None:
            values = defaults(self.stage)
            values.update(suggested_values(self.ctx.project, self.stage, self._newest))
            self.form.set_values(values)
            self.status_label.setText("A new run: check the settings and the Data tab, then Start.")
        else:
            # A run saved before a setting existed has that setting's default.
            self.form.set_values({**defaults(self.stage), **_read_config(info.path)})
            job = self.ctx.job_for(info.name)
            if job is not None:
                # The plots show the job's own buffers; new metrics only need a redraw.
                self.plots.set_history(job.history)
                self._add_events(job.events + ([job.progress] if job.progress else []))
                if job.running:
                    self._attach(job)
            else:
                self._load_history(info)
            self._show_status()
        self.refresh_preview()
        self._update_buttons()
        self.runSelected.emit(info.name if info else "")

    def _load_history(self, info: RunInfo) -> None:
        """A finished run's events, folded into plot buffers a slice at a time: a long run's
        file takes a second to read, and the window must not freeze meanwhile."""
        self._drop_loader()
        self.progress_label.setText("loading the run's events…")
        self._loader = HistoryLoader(info.path, self)
        self._loader.loaded.connect(lambda history, others, name=info.name:
                                    self._history_loaded(name, history, others))
        self._loader.start()

    def _history_loaded(self, name: str, history: RunHistory, others: list) -> None:
        if self.run is None or self.run.name != name:
            return          # the user moved on to another run meanwhile
        self.plots.set_history(history)
        self.progress_label.setText(" ")
        self._add_events(others)

    def shutdown(self) -> None:
        self._drop_loader()

    def _drop_loader(self) -> None:
        # A loader is the panel's child: dropped ones would keep their half-read histories
        # alive until the panel goes, one per run clicked.
        if self._loader is not None:
            self._loader.cancel()
            self._loader.deleteLater()
            self._loader = None

    def _newest(self, stage: str) -> Path | None:
        kind = {"tokenizer": "tokenizer", "reward": "reward"}.get(stage, "checkpoint")
        for _label, path in self.ctx.artifacts(kind):
            if path.name.startswith(stage + "-"):
                return path
        return None

    def _on_runs_changed(self) -> None:
        self._fill_runs()
        if self.run is not None:
            self.run = self.ctx.run(self.run.name)
            if self.run is None:
                self.show_run(None)
                return
            self._show_status()
        self.form.refresh_choices()
        self._update_buttons()

    def _on_job_started(self, job) -> None:
        # A job of this stage started (here, from the ranking view, or re-attached): show it.
        if job.stage == self.stage:
            self.select_run(job.run_dir.name)

    # --- the live job -------------------------------------------------------------------------

    def _attach(self, job) -> None:
        self._job = job
        job.eventsArrived.connect(self._add_job_events)
        job.finished.connect(self._on_finished)

    def _detach(self) -> None:
        if self._job is not None:
            for sig, slot in ((self._job.eventsArrived, self._add_job_events), (self._job.finished, self._on_finished)):
                try:
                    sig.disconnect(slot)
                except (RuntimeError, TypeError):
                    pass
        self._job = None

    def _on_finished(self, status: str, error) -> None:
        # The context synced the run store on this same signal (it connected first).
        self._detach()
        if self.run is not None:
            self.run = self.ctx.run(self.run.name)
        self._show_status()
        self._update_buttons()

    def _add_job_events(self, events: list[dict]) -> None:
        self._add_events(events, metrics_in_plots=True)

    def _add_events(self, events: list[dict], metrics_in_plots: bool = False) -> None:
        metrics, progress = [], None
        for ev in events:
            t = ev.get("type")
            if t == "metrics":
                metrics.append(ev)
            elif t == "progress":
                progress = ev           # only the newest of a batch is worth drawing
            elif t == "sample":
                self.samples.append(f"<p><b>step {ev.get('step')}</b> · <i>{html.escape(str(ev.get('prompt', '')))}</i>"
                                    f"<br><span style='white-space:pre-wrap'>{html.escape(str(ev.get('text', '')))}</span></p>")
            if t in ("log", "start", "done", "checkpoint"):
                self.log.appendPlainText(_log_line(ev))
        if progress is not None:
            self._show_progress(progress)
        if metrics:
            if metrics_in_plots:
                self.plots.refresh()
            else:
                self.plots.load_events(metrics)

    def _show_progress(self, ev: dict) -> None:
        total = max(int(ev.get("total") or 1), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(min(int(ev.get("step") or 0), total))
        parts = [format_count(ev)]
        if ev.get("tokens_per_s"):
            parts.append(f"{ev['tokens_per_s'] / 1000:.1f}k tokens/s")
        if ev.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(ev['eta_s'])}")
        self.progress_label.setText(" · ".join(parts))

    def _show_status(self) -> None:
        info = self.run
        if info is None:
            return
        status = "running" if self._live_job() is not None else info.status
        text = f"<b>{status}</b>"
        if info.duration_s is not None:
            text += f" · {format_duration(info.duration_s)}"
        if info.parents:
            text += " · from " + ", ".join(f"{k} {v}" for k, v in info.parents.items())
        self.status_label.setText(text)
        if status == "failed" and info.error:
            self.error_text.setText(f"<b>This run failed.</b><br><pre style='white-space:pre-wrap'>"
                                    f"{html.escape(info.error)}</pre>")
            self.error_box.show()
        else:
            self.error_box.hide()

    # --- actions ------------------------------------------------------------------------------

    def config_values(self) -> dict:
        return self.form.values()

    def start(self):
        """Start a new run with the form's settings; returns the Job (None if refused)."""
        cfg, error = check(self.stage, self.config_values())
        if error is not None:
            self.form.validate()
            return None
        run_dir = self.ctx.new_run_dir(self.stage)
        try:
            self.prepare_run_dir(run_dir)
        except Exception as e:  # noqa: BLE001 - shown to the user; the half-made folder removed
            import shutil
            shutil.rmtree(run_dir, ignore_errors=True)
            QMessageBox.warning(self, "Cannot start", str(e))
            return None
        return self.ctx.launch(self.stage, cfg, run_dir)

    def prepare_run_dir(self, run_dir: Path) -> None:
        """Hook: write a job's inputs into its folder before it starts."""

    def stop(self) -> None:
        job = self.ctx.job_for(self.run.name) if self.run else None
        if job is not None:
            job.stop()
            self.status_label.setText("<b>stopping</b> · saving a checkpoint")
            self.stop_btn.setEnabled(False)

    def resume(self):
        if self.run is None:
            return None
        cfg, error = check(self.stage, self.config_values())
        if error is not None:
            self.form.validate()
            return None
        # Edits made before Resume (a larger max_steps) go into the run's config; the engine
        # refuses changes that would make it a different run, and says which.
        values = relativize(self.config_values(), self.run.path, self.ctx.path)
        save_config(from_dict(config_class(self.stage), values), self.run.path / "config.json")
        job = self.ctx.resume(self.run.name)
        return job

    def _live_job(self):
        job = self.ctx.job_for(self.run.name) if self.run is not None else None
        return job if job is not None and job.running else None

    def _update_buttons(self) -> None:
        # A job just launched may not have written its start event yet: the job knows first.
        running = self.run is not None and (self.run.status == "running" or self._live_job() is not None)
        self.start_btn.setEnabled(not running and self.form.error is None and self._data_ok)
        self.stop_btn.setEnabled(running and self._live_job() is not None)
        self.resume_btn.setEnabled(self.run is not None and not running and self.run.resumable)
        self.form.set_editable(self.run is None or not running)

    # --- data preview -------------------------------------------------------------------------

    def _schedule_preview(self) -> None:
        self._preview_timer.start()

    def refresh_preview(self) -> None:
        values = self.form.values()
        base = self.run.path if self.run is not None else self.ctx.path
        fields = [(k, v) for k, v in values.items() if k in DATA_FIELDS and k not in ("val_data", "ptx_data", "eval_tasks")]
        if not fields:
            self._data_ok = True
            return
        key, value = fields[0]
        paths = [_resolve(base, p) for p in ([value] if isinstance(value, str) else value or [])]
        # The reward model's `data` is rankings, not SFT records.
        kind = "preferences" if self.stage == "reward" else DATA_FIELDS[key]
        if kind == "pretrain":
            self.preview.show_pretrain(paths)
        elif kind == "sft":
            tok = values.get("tokenizer") or values.get("init")
            self.preview.show_sft(paths, _resolve(base, tok) if tok else None)
        elif kind == "prompts":
            self.preview.show_prompts(paths)
        elif kind == "preferences":
            self.preview.show_preferences(paths)

    def _on_data_validated(self, ok: bool, problems: list) -> None:
        self._data_ok = ok
        if not ok:
            self.tabs.setCurrentWidget(self.preview)
        self._update_buttons()


class HistoryLoader(QObject):
    """Folds a run's events.jsonl into a RunHistory on the UI thread, SLICE_BYTES per timer
    tick, then emits `loaded(history, the other events)`.

    Not on a worker thread: parsing JSON is pure Python, and a thread doing it holds the GIL,
    so every call from Qt into Python on the UI thread (each paint of a Python widget) waits
    for it: reopening a run of 100k events stalled the window for 0.4 s that way. A slice of
    256 KB is ~2,500 events, about 15 ms."""
    SLICE_BYTES = 256 * 1024
    loaded = Signal(object, list)

    def __init__(self, run_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.tail = EventTail(Path(run_dir) / "events.jsonl")
        self.history = RunHistory()
        self.others: list[dict] = []
        self._timer = QTimer(self, interval=0)
        self._timer.timeout.connect(self._step)

    def start(self) -> "HistoryLoader":
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.stop()

    @property
    def busy(self) -> bool:
        return self._timer.isActive()

    def _step(self) -> None:
        before = self.tail.offset
        metrics = []
        for ev in self.tail.iter_new(self.SLICE_BYTES):
            (metrics if ev.get("type") == "metrics" else self.others).append(ev)
        self.history.add_events(metrics)
        if self.tail.offset == before:      # nothing more: the file is read
            self._timer.stop()
            self.loaded.emit(self.history, self.others)


def _resolve(base: Path, p) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (base / path).resolve()


def _read_config(run_dir: Path) -> dict:
    try:
        values = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    # Paths in a run's config are relative to the run folder; the form shows them absolute.
    for key in list(values):
        v = values[key]
        if key in DATA_FIELDS or key in ARTIFACT_FIELDS:
            if isinstance(v, list):
                values[key] = [str(_resolve(run_dir, x)) for x in v]
            elif isinstance(v, str) and v:
                values[key] = str(_resolve(run_dir, v))
    return values


def _log_line(ev: dict) -> str:
    t = ev.get("type")
    if t == "log":
        return f"[{ev.get('level', 'info')}] {ev.get('message', '')}"
    if t == "start":
        return f"started (pid {ev.get('pid')})" + (f", resuming from {ev['resumed_from']}" if ev.get("resumed_from") else "")
    if t == "checkpoint":
        return f"checkpoint at step {ev.get('step')}" + (" (best)" if ev.get("best") else "")
    if t == "done":
        return f"done: {ev.get('status')}" + (f" — {ev['error']}" if ev.get("error") else "")
    return json.dumps(ev)
