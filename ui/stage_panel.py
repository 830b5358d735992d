"""One training stage's page: settings, inputs and their preview, Start / Stop / Resume,
progress, live plots, samples, the log, and the error of a failed run.

The panel shows one run at a time: "New run" (the form, filled with the settings the catalogue
and the project suggest) or an existing run of the stage (its settings, and what its events
say). What it shows of a run comes from one fold of the run's events (workbench/runfold.py):
the live job's when the run is running, else a RunLoader's that reads the file a slice at a
time; either way the curves, samples and progress are the same. It never trains anything
itself; it asks the ProjectContext to launch or resume a job and subscribes to its signals.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from PySide6.QtCore import QEvent, QSize, Qt, QTimer, Signal
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QLabel, QMessageBox,
                               QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSplitter,
                               QTabWidget, QTextBrowser, QVBoxLayout, QWidget)

from engine.checkpoint import resolve_checkpoint
from engine.config import ConfigError
from engine.runio import format_count, format_duration
from workbench import runfolder, stages
from workbench.forms import check
from workbench.memory import memory_note
from workbench.runs import RunInfo, estimate_seconds
from ui.config_form import ConfigForm, widen_popup
from ui.data_preview import DataPreview
from ui.jobs import RunLoader
from ui.plots import PlotGrid
from ui.project_context import ProjectContext

NEW_RUN = "New run"
ERROR_STYLE = ("QFrame#error { border: 1px solid #d9534f; border-radius: 4px; "
               "background: rgba(217, 83, 79, 0.10); }")


class _Column(QScrollArea):
    """The settings column: it scrolls up and down only, so it is never narrower than what it
    holds needs beside its scroll bar (else the "…" buttons and spin arrows sit under the bar,
    out of reach). It asks its splitter for that width again whenever what it holds changes."""
    MIN_WIDTH = 380

    def setWidget(self, widget) -> None:
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return False

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is None:
            return hint
        need = inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(max(self.MIN_WIDTH, need), hint.height())


class StagePanel(QWidget):
    runSelected = Signal(str)        # run name, '' for a new run

    def __init__(self, ctx: ProjectContext, stage: str, parent=None):
        super().__init__(parent)
        self.ctx, self.stage = ctx, stage
        self.spec = stages.spec(stage)
        self.run: RunInfo | None = None       # the run shown; None = a new run
        self._source = None                   # the live Job or the RunLoader of the shown run
        self._last_log = ""                   # its newest log line, shown until it makes progress
        self._auto: dict = {}                 # a new run's form values as last set by the panel
        self._steps_seen = None
        self._data_ok = True
        self._build()
        self._preview_timer = QTimer(self, singleShot=True, interval=400)
        self._preview_timer.timeout.connect(self.refresh_preview)
        ctx.runsChanged.connect(self._on_runs_changed)
        ctx.jobStarted.connect(self._on_job_started)
        ctx.jobFollowed.connect(self._on_job_followed)
        self._fill_runs()
        # Open on the newest run (its plots are what a returning user wants to see); "New run"
        # is one click away, and Start also starts a new run from a shown run's settings.
        self.show_run(ctx.latest(stage))

    def _build(self) -> None:
        heading = QLabel(f"<h2 style='margin:0'>{html.escape(self.spec.heading)}</h2>")
        about = QLabel(self.spec.blurb)
        about.setWordWrap(True)
        self.run_combo = QComboBox()
        self.run_combo.setToolTip("Start a new run, or open one of this stage's runs to see its plots, "
                                  "resume it or watch it train")
        self.run_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.run_combo.setMinimumContentsLength(20)
        self.run_combo.activated.connect(self._on_run_chosen)
        self.form = ConfigForm(self.stage, self.ctx.artifacts)
        self.form.preflight = lambda values: runfolder.preflight(self.stage, values,
                                                                 self.ctx.preflight_dir(self.stage))
        self.form.validity.connect(lambda _e: self._update_buttons())
        self.form.changed.connect(self._on_form_changed)
        self.notes = QLabel()
        self.notes.setWordWrap(True)
        self.notes.setTextFormat(Qt.TextFormat.RichText)
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
        self.progress_label.setWordWrap(True)     # a log line in it must not widen the column
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

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self._left_column(heading, about, buttons))
        split.addWidget(self._tabs())
        split.setStretchFactor(1, 1)
        split.setSizes([440, 880])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(split)

    def _left_column(self, heading: QLabel, about: QLabel, buttons: QHBoxLayout) -> QScrollArea:
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
        left.addWidget(self.notes)
        left.addLayout(buttons)
        left.addWidget(self.progress)
        left.addWidget(self.progress_label)
        left.addWidget(self.status_label)
        left.addWidget(self.error_box)
        left.addStretch(1)
        scroll = _Column()
        scroll.setWidget(left_inner)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        return scroll

    def _tabs(self) -> QTabWidget:
        self.tabs = QTabWidget()
        self.plots = PlotGrid(self.stage)
        self.samples = QTextBrowser()
        self.samples.setOpenLinks(False)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        # Wrapped as a terminal wraps: a stage's first line (device, model, data) runs long.
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.preview = DataPreview()
        self.preview.validated.connect(self._on_data_validated)
        self.tabs.addTab(self.plots, "Plots")
        self.tabs.addTab(self.samples, "Samples")
        self.tabs.addTab(self.log, "Log")
        self.tabs.addTab(self.preview, "Data")
        return self.tabs

    # --- which run is shown -------------------------------------------------------------------

    def _fill_runs(self) -> None:
        current = self.run.name if self.run else ""
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        self.run_combo.addItem(NEW_RUN, "")
        for r in self.ctx.run_list(self.stage):
            # A job just launched is running before the run index has read its start event.
            status = "running" if self._running_job(r.name) is not None else r.status
            self.run_combo.addItem(f"{r.name} — {status}", r.name)
        widen_popup(self.run_combo)
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
        self._drop_source()
        self.run = info
        self._last_log = ""
        i = self.run_combo.findData(info.name if info else "")
        self.run_combo.setCurrentIndex(max(i, 0))
        self.plots.clear()
        self.samples.clear()
        self.log.clear()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress_label.setText(" ")
        self.error_box.hide()
        self.form.refresh_choices()
        if info is None:
            self.form.set_values(self.ctx.suggested_values(self.stage))
            self._auto = self.form.values()
        else:
            self.form.set_values(runfolder.form_values(self.stage, info.path))
            job = self.ctx.job_for(info.name)
            self._follow(job if job is not None else RunLoader(info.path, self).start())
        self._steps_seen = self._steps()
        self._show_status()
        self._update_notes()
        self.refresh_preview()
        self._update_buttons()
        self.runSelected.emit(info.name if info else "")

    def _follow(self, source) -> None:
        """Show a run through its fold: what it holds now, then each batch of new events."""
        self._source = source
        fold = source.fold
        self.plots.set_history(fold.history)
        self._list_events(fold.listed)
        self._show_progress()
        if hasattr(source, "finished"):
            source.eventsArrived.connect(self._on_events)
            source.finished.connect(self._on_finished)
        else:
            # A finished run is drawn once it is read: redrawing per slice made reopening a
            # long run several times slower.
            self.progress_label.setText("loading the run's events…")
            source.loaded.connect(self._on_loaded)

    def _drop_source(self) -> None:
        source, self._source = self._source, None
        if source is None:
            return
        for sig, slot in ((getattr(source, "finished", None) and source.eventsArrived, self._on_events),
                          (getattr(source, "finished", None), self._on_finished),
                          (getattr(source, "loaded", None), self._on_loaded)):
            if sig is not None:
                try:
                    sig.disconnect(slot)
                except (RuntimeError, TypeError):
                    pass
        if isinstance(source, RunLoader):
            # A loader is the panel's child: dropped ones would keep their half-read folds
            # alive until the panel goes, one per run clicked.
            source.cancel()
            source.deleteLater()

    def shutdown(self) -> None:
        self._drop_source()

    def _on_runs_changed(self) -> None:
        self._fill_runs()
        before = self.form.values()
        self.form.refresh_choices()
        if self.run is not None:
            self.run = self.ctx.run(self.run.name)
            if self.run is None:
                self.show_run(None)
                return
            self._show_status()
        else:
            self._follow_suggestions(before)
        if self.form.values() != before:
            self._preview_timer.start()     # a picker now offers (and holds) a new run
        self.form.validate()
        self._update_notes()
        self._update_buttons()

    def _follow_suggestions(self, before: dict) -> None:
        """A new run's inputs follow the newest runs (a tokenizer just trained, a newer SFT
        model) until the user picks something else: an input still as the panel last set it
        (`before` the pickers were refilled) takes the new suggestion."""
        fresh = self.ctx.suggested_values(self.stage)
        current = self.form.values()
        watched = {p.field for p in self.spec.parents} | {d.field for d in self.spec.data}
        changes = {k: fresh[k] for k in watched & set(fresh)
                   if fresh[k] != current.get(k) and before.get(k) == self._auto.get(k)}
        if changes:
            self.form.set_values({**current, **changes})
        self._auto = {**self._auto, **{k: v for k, v in self.form.values().items()
                                       if k in watched and before.get(k) == self._auto.get(k)}}

    def _on_job_started(self, job) -> None:
        # A job of this stage started (here, from the ranking view, or re-attached): show it.
        if job.stage == self.stage:
            self.select_run(job.run_dir.name)

    def _on_job_followed(self, job) -> None:
        # A run another process started: followed live if this page shows it (as read once
        # from its folder, it stood still at the step it was opened at, with Stop off).
        if self.run is not None and self.run.name == job.run_dir.name:
            self.show_run(self.ctx.run(job.run_dir.name) or self.run)

    # --- what a run's events show -------------------------------------------------------------

    def _on_events(self, events: list[dict]) -> None:
        self._list_events([e for e in events if e.get("type") in ("start", "done", "log", "sample", "checkpoint")])
        self.plots.refresh()
        self._show_progress()

    def _on_loaded(self) -> None:
        self._list_events(self._source.fold.listed)
        self.plots.refresh()
        self._show_progress()

    def _on_finished(self, status: str, error) -> None:
        # The context synced the run store on this same signal (it connected first).
        if self.run is not None:
            self.run = self.ctx.run(self.run.name) or self.run
        self._show_progress()
        self._show_status()
        self._update_buttons()

    def _list_events(self, events: list[dict]) -> None:
        for ev in events:
            t = ev.get("type")
            if t == "sample":
                self.samples.append(f"<p><b>step {ev.get('step')}</b> · <i>{html.escape(str(ev.get('prompt', '')))}</i>"
                                    f"<br><span style='white-space:pre-wrap'>{html.escape(str(ev.get('text', '')))}</span></p>")
            else:
                self.log.appendPlainText(_log_line(ev))
                if t == "log":
                    self._last_log = str(ev.get("message", ""))

    def _show_progress(self) -> None:
        if self._source is None:
            return
        fold = self._source.fold
        ev = fold.progress
        if ev is None:
            # Before its first step a stage may work for a while (encoding data, measuring the
            # starting model): what it last said, rather than a page that looks frozen.
            live = getattr(self._source, "running", False)
            self.progress_label.setText(self._last_log if live and self._last_log else " ")
            return
        total = max(int(ev.get("total") or 1), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(min(int(ev.get("step") or 0), total))
        parts = [format_count(ev)]
        if ev.get("tokens_per_s"):
            parts.append(f"{ev['tokens_per_s'] / 1000:.1f}k tokens/s")
        live = getattr(self._source, "running", False)
        eta = fold.eta_s() if live else None
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        self.progress_label.setText(" · ".join(parts))

    def _show_status(self) -> None:
        info = self.run
        if info is None:
            self.status_label.setText(self._next_step())
            self.error_box.hide()
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

    def _next_step(self) -> str:
        """What a new run waits for, said as the next thing to do."""
        err = self.form.error
        if isinstance(err, ConfigError):
            parent = self.spec.parent(err.field)
            if parent is not None and parent.expects and not self.ctx.newest(parent):
                first = stages.spec(parent.expects[0])
                return (f"Next: {first.action} on the {first.title} page; {err.field} needs one of its runs. "
                        "Then Start here.")
            return f"Fix the setting marked in red ({err.field}), then Start."
        if not self._data_ok:
            return "Fix the problems the Data tab lists, then Start."
        return "A new run: check the settings and the Data tab, then Start."

    # --- settings that depend on each other ---------------------------------------------------

    def _steps(self):
        field = self.spec.steps_field
        return self.form.values().get(field) if field else None

    def _on_form_changed(self) -> None:
        steps = self._steps()
        if (self.spec.follows and isinstance(steps, int) and steps > 0 and isinstance(self._steps_seen, int)
                and steps != self._steps_seen):
            # Intervals set as a share of the run follow its length, unless the user set them.
            old, new = stages.follow_steps(self.spec, self._steps_seen), stages.follow_steps(self.spec, steps)
            values = self.form.values()
            changes = {k: new[k] for k in new if values.get(k) == old[k]}
            if changes:
                self.form.set_values({**values, **changes})
        if isinstance(steps, int):
            self._steps_seen = steps
        self._update_notes()
        self._preview_timer.start()

    def _update_notes(self) -> None:
        values = self.form.values()
        notes = []
        for p in self.spec.parents:
            chosen = values.get(p.field)
            stage = stages.stage_of_folder(Path(chosen).name) if isinstance(chosen, str) and chosen else None
            if p.expects and stage and stage not in p.expects:
                notes.append(f"⚠ {p.field} is a {stage} run: {p.why}.")
        steps = values.get(self.spec.steps_field) if self.spec.steps_field else None
        if isinstance(steps, int) and steps > 0:
            late = [k for k in self.spec.follows if isinstance(values.get(k), int) and values[k] > steps]
            if late:
                notes.append(f"⚠ {', '.join(late)} {'is' if len(late) == 1 else 'are'} above "
                             f"{self.spec.steps_field} ({steps}): only at the end of the run.")
        if self.run is None or self._live_job() is None:
            seconds, basis = estimate_seconds(self.stage, values, self.ctx.run_list(self.stage))
            if seconds is not None:
                notes.append(f"About {format_duration(seconds)} at the pace of {basis}.")
            memory = memory_note(self.stage, values)
            if memory is not None:
                notes.append(memory)
        self.notes.setText("<br>".join(html.escape(n) for n in notes))
        self.notes.setVisible(bool(notes))
        if self.run is None:
            self.status_label.setText(self._next_step())

    # --- actions ------------------------------------------------------------------------------

    def config_values(self) -> dict:
        return self.form.values()

    def rankings(self) -> runfolder.Rankings | None:
        """Hook: train on the project's rankings (written into the run folder at Start)."""
        return None

    def start(self):
        """Start a new run with the form's settings; returns the Job (None if refused)."""
        _cfg, error = check(self.stage, self.config_values())
        if error is not None:
            self.form.validate()
            return None
        try:
            return self.ctx.launch(self.stage, self.config_values(), rankings=self.rankings())
        except ConfigError as e:
            self.form.refuse(e)
            self.status_label.setText(f"Not started: {e}")
            return None
        except (ValueError, OSError) as e:
            QMessageBox.warning(self, "Cannot start", str(e))
            return None

    def stop(self) -> None:
        job = self._live_job()
        if job is not None:
            job.stop()
            self.status_label.setText("<b>stopping</b> · saving a checkpoint")
            self.stop_btn.setEnabled(False)

    def resume(self):
        if self.run is None:
            return None
        _cfg, error = check(self.stage, self.config_values())
        if error is not None:
            self.form.validate()
            return None
        try:
            return self.ctx.resume(self.run.name, self.config_values())
        except ConfigError as e:
            # Said on the field; the run stays as it was (its config.json is not written).
            self.form.refuse(e)
            self.status_label.setText(f"Not resumed: {e}")
            return None
        except (ValueError, OSError) as e:
            QMessageBox.warning(self, "Cannot resume", str(e))
            return None

    def _live_job(self):
        return self._running_job(self.run.name) if self.run is not None else None

    def _running_job(self, name: str):
        job = self.ctx.job_for(name)
        return job if job is not None and job.running else None

    def _update_buttons(self) -> None:
        # A job just launched may not have written its start event yet: the job knows first.
        live = self._live_job()
        running = self.run is not None and (self.run.status == "running" or live is not None)
        self.start_btn.setEnabled(not running and self.form.error is None and self._data_ok)
        self.stop_btn.setEnabled(live is not None and not live.stopping)
        self.resume_btn.setEnabled(self.run is not None and not running and self.run.resumable)
        self.form.set_editable(self.run is None or not running)
        if self.run is None:
            self.status_label.setText(self._next_step())

    # --- data preview -------------------------------------------------------------------------

    def refresh_preview(self) -> None:
        values = self.form.values()
        base = self.run.path if self.run is not None else self.ctx.path
        shown = next((d for d in self.spec.data if d.preview), None)
        if shown is None:
            self._data_ok = True
            return
        value = values.get(shown.field)
        paths = [_resolve(base, p) for p in ([value] if isinstance(value, str) else value or [])]
        if shown.kind == "pretrain":
            self.preview.show_pretrain(paths)
        elif shown.kind == "sft":
            self.preview.show_sft(paths, self._tokenizer_file(values, base))
        elif shown.kind == "prompts":
            self.preview.show_prompts(paths)
        elif shown.kind == "preferences":
            self.preview.show_preferences(paths)

    def _tokenizer_file(self, values: dict, base: Path) -> Path | None:
        """The tokenizer the stage will use: its own field, else the one inside the checkpoint
        it starts from (a run folder holds it in its chosen checkpoint's folder)."""
        for name in ("tokenizer", *(p.field for p in self.spec.parents if p.kind == "checkpoint")):
            v = values.get(name)
            if not v:
                continue
            path = _resolve(base, v)
            if path.is_file():
                return path
            if (path / "tokenizer.json").is_file():
                return path / "tokenizer.json"
            try:
                return resolve_checkpoint(path) / "tokenizer.json"
            except (FileNotFoundError, OSError, ValueError):
                return None
        return None

    def _on_data_validated(self, ok: bool, problems: list) -> None:
        self._data_ok = ok
        if not ok:
            self.tabs.setCurrentWidget(self.preview)
        self._update_buttons()


def _resolve(base: Path, p) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (base / path).resolve()


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
