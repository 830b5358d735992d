"""Every run of the project: stage, status, parents, start, duration, final metrics; newest
first, and sorted by any column with a click on its header (times and durations as numbers).

Select one run to see its plots, several of one stage to overlay them (x by step or by
tokens, with the plots' own x-axis switch). Open shows the run in its stage's panel (to resume or watch it); Delete asks first
and refuses a running run; Show folder opens it in the file manager; Export report… writes it as
one HTML page to hand in (workbench/report.py).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QKeySequence, QShortcut
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QMessageBox, QPushButton, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from engine.checkpoint import latest_checkpoint
from engine.runio import format_duration
from workbench import report, runfolder, stages
from workbench.plot_specs import KEY_METRICS
from workbench.runs import RunInfo
from ui import file_dialogs
from ui.export_dialog import ExportDialog
from ui.jobs import RunLoader
from ui.plots import PlotGrid, RunHistory
from ui.project_context import ProjectContext
from ui.workers import Worker

MAX_OVERLAY = 12        # runs overlaid at once: each has an entry in every plot's legend
COLUMNS = ["Run", "Stage", "Status", "Started from", "Started", "Duration", "Result"]
STARTED, DURATION = COLUMNS.index("Started"), COLUMNS.index("Duration")
# Below this many held-out rankings a reward model's accuracy moves by several points with
# each one (95% interval about ±10 points at 100), so it is shown with a warning.
FEW_HELD_OUT = 100


def result_text(info: RunInfo, short: bool = False) -> str:
    """The run's key figures; `short` for the sidebar, whose line is narrow."""
    if info.status == "failed" and info.error:
        return f"failed: {info.error.splitlines()[0]}"     # why, where the figures would be
    parts = []
    for key, label, fmt in KEY_METRICS.get(info.stage, []):
        v = info.metrics.get(key)
        if isinstance(v, (int, float)):
            text = f"{label} {fmt.format(v)}"
            if key == "val/accuracy":
                text += _held_out(info, short)
            parts.append(text)
    return ", ".join(parts)


def _origin(info: RunInfo) -> str:
    """Where a run from outside the project came from (an import's model folder or name)."""
    spec = stages.BY_NAME.get(info.stage)
    if spec is None or not spec.origin:
        return ""
    try:
        value = runfolder.read_config(info.path).get(spec.origin)
    except (OSError, ValueError, runfolder.RunFolderError):
        return ""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else str(value or "")


def _held_out(info: RunInfo, short: bool = False) -> str:
    """' on N held-out rankings', from the finished run's summary (no comma: the sidebar shows
    the text up to the first one); `short`: only when they are too few, in a few words."""
    path = Path(info.path) / "summary.json"
    try:
        n = _summary_count(path, path.stat().st_mtime_ns)
    except OSError:
        return ""
    if n is None:
        return ""
    if n < FEW_HELD_OUT:
        if short:
            return f" (only {n} held out)"
        return f" on only {n} held-out ranking{'s' * (n != 1)} (too few to go by)"
    return "" if short else f" on {n:,} held-out rankings"


@lru_cache(maxsize=256)
def _summary_count(path: Path, _mtime_ns: int) -> int | None:
    # Keyed by the file's time: the sidebar asks every second, the file is written once.
    try:
        n = json.loads(path.read_text(encoding="utf-8")).get("val_rankings")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _write_report(run_dir: Path, out: Path, *, emit, cancelled) -> tuple[Path | None, str | None]:
    """(where it went, None) or (None, the one-line reason): the reasons a person can act on
    are answers, not exceptions with a type name in front."""
    try:
        return report.write_report(run_dir, out), None
    except (report.ReportError, OSError) as e:
        return None, report.error_line(e, out)


class _Cell(QTableWidgetItem):
    """A table cell that sorts by a key of its own (a time, a duration), not by its text."""

    def __init__(self, text: str, key=None):
        super().__init__(text)
        self.key = text.casefold() if key is None else key

    def __lt__(self, other) -> bool:
        mine, theirs = self.key, getattr(other, "key", other.text())
        if type(mine) is not type(theirs):
            return str(mine) < str(theirs)
        return mine < theirs


class RunsBrowser(QWidget):
    openRun = Signal(str, str)        # stage, run name

    def __init__(self, ctx: ProjectContext, parent=None):
        super().__init__(parent)
        self.ctx = ctx
        self._histories: dict[str, RunHistory] = {}
        self._loaders: dict[str, RunLoader] = {}      # runs whose events are being read
        self.last_export: ExportDialog | None = None
        self.report_worker: Worker | None = None
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.setAlternatingRowColors(True)
        # Tab leaves the table for the buttons under it (by default it walks the cells, and a
        # keyboard user never reached Open or Delete); Enter opens the run, Delete deletes.
        self.table.setTabKeyNavigation(False)
        for key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):       # not `activated`: a double click too
            QShortcut(QKeySequence(key), self.table, lambda: self.open_btn.isEnabled() and self.open_selected(),
                      context=Qt.ShortcutContext.WidgetShortcut)
        QShortcut(QKeySequence.StandardKey.Delete, self.table, lambda: self.delete_btn.isEnabled()
                  and self.delete_selected(), context=Qt.ShortcutContext.WidgetShortcut)
        header = self.table.horizontalHeader()
        # Newest first until the user clicks a header (Qt's default, column 0 descending, put
        # the runs in reverse alphabetical order); refreshes keep whatever order was chosen.
        header.setSortIndicator(STARTED, Qt.SortOrder.DescendingOrder)
        self.table.setSortingEnabled(True)
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.table.itemDoubleClicked.connect(lambda _i: self.open_selected())

        self.open_btn = QPushButton("Open in its panel")
        self.folder_btn = QPushButton("Show folder")
        self.delete_btn = QPushButton("Delete…")
        self.export_btn = QPushButton("Export…")
        self.export_btn.setToolTip("Its newest checkpoint as a Hugging Face folder or a GGUF file")
        self.export_btn.clicked.connect(self.export_selected)
        self.report_btn = QPushButton("Export report…")
        self.report_btn.setToolTip("The run as one HTML page to hand in: summary, plots, samples, config, "
                                   "lineage and hardware")
        self.report_btn.clicked.connect(self.export_report)
        self.open_btn.clicked.connect(self.open_selected)
        self.folder_btn.clicked.connect(self.show_folder)
        # Not the slot itself: clicked(bool checked) would arrive as `confirm=False`.
        self.delete_btn.clicked.connect(lambda: self.delete_selected())
        self.hint = QLabel("Select runs of one stage to overlay their curves.")
        bar = QHBoxLayout()
        for w in (self.open_btn, self.folder_btn, self.export_btn, self.report_btn, self.delete_btn):
            bar.addWidget(w)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter: stage, status, name… (e.g. ppo failed)")
        self.filter.setClearButtonEnabled(True)
        self.filter.setToolTip("Shows the runs whose name, stage, status or parent runs hold every word typed")
        self.filter.textChanged.connect(self._apply_filter)
        bar.addWidget(self.filter, 1)
        bar.addWidget(self.hint)

        self.plot_holder = QVBoxLayout()
        # Why a run failed, above its plots (which a run that failed early leaves empty).
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.note.hide()
        self.plot_holder.addWidget(self.note)
        plots = QWidget()
        plots.setLayout(self.plot_holder)
        self.plots: PlotGrid | None = None
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(plots)
        split.setSizes([300, 500])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(QLabel("<h2 style='margin:0'>Runs</h2>"))
        lay.addLayout(bar)
        lay.addWidget(split, 1)
        ctx.runsChanged.connect(self.refresh)
        self.refresh()

    # --- the table ----------------------------------------------------------------------------

    def refresh(self) -> None:
        selected = set(self.selected_names())
        self.table.setSortingEnabled(False)
        runs = self.ctx.run_list()
        self.table.setRowCount(len(runs))
        for row, info in enumerate(runs):
            when = info.started_at or info.created_at
            duration = info.duration_s
            cells = [info.name, info.stage, info.status,
                     ", ".join(info.parents.values()) or _origin(info), time.strftime("%Y-%m-%d %H:%M", time.localtime(when)),
                     format_duration(duration), result_text(info)]
            keys = {STARTED: when, DURATION: -1.0 if duration is None else duration}
            for col, text in enumerate(cells):
                item = _Cell(text, keys.get(col))
                item.setData(Qt.ItemDataRole.UserRole, info.name)
                if col == 2 and info.error:
                    item.setToolTip(info.error)
                if col == 3 and info.parents:
                    item.setToolTip("\n".join(f"{k}: {v}" for k, v in info.parents.items()))
                self.table.setItem(row, col, item)
        self.table.setSortingEnabled(True)
        self._apply_filter()
        # The selection is what it was, no more: the view would move it to the row under a
        # deleted one, whose name the plots of the deleted run would then stand beside.
        self.table.blockSignals(True)
        self.table.clearSelection()
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).text() in selected:
                self._add_row(row)
        self.table.blockSignals(False)
        if selected - {info.name for info in runs}:
            self._on_selection()        # some of what was plotted is gone
        elif self.plots is not None and any(i.name in selected and i.status == "running" for i in runs):
            self._replot_running()
        self._update_buttons()

    def _replot_running(self) -> None:
        """A running run's plots follow it: a job's history grows as it is followed, to redraw;
        a run no job follows is read again."""
        infos = [i for i in (self.ctx.run(n) for n in self.selected_names()) if i is not None]
        if all(self.ctx.job_for(i.name) is not None or i.status != "running" for i in infos):
            self.plots.refresh()
        else:
            self._on_selection()

    def _apply_filter(self) -> None:
        """Hide the rows without every word of the filter (in name, stage, status or parents);
        a hidden run is no longer selected."""
        words = self.filter.text().lower().split()
        dropped = False
        for row in range(self.table.rowCount()):
            text = " ".join(self.table.item(row, col).text() for col in range(4)).lower()
            hidden = not all(w in text for w in words)
            self.table.setRowHidden(row, hidden)
            if hidden and self.table.item(row, 0).isSelected():
                for col in range(self.table.columnCount()):
                    self.table.item(row, col).setSelected(False)
                dropped = True
        if dropped:
            self._on_selection()

    def _add_row(self, row: int) -> None:
        sel = self.table.selectionModel()
        from PySide6.QtCore import QItemSelectionModel
        sel.select(self.table.model().index(row, 0),
                   QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows)

    def selected_names(self) -> list[str]:
        rows = sorted({i.row() for i in self.table.selectedItems()})
        return [self.table.item(r, 0).text() for r in rows]

    def select(self, names: list[str]) -> None:
        self.table.clearSelection()
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).text() in names:
                self._add_row(row)

    def _update_buttons(self) -> None:
        names = self.selected_names()
        self.open_btn.setEnabled(len(names) == 1)
        self.folder_btn.setEnabled(len(names) == 1)
        self.delete_btn.setEnabled(len(names) >= 1)
        info = self.ctx.run(names[0]) if len(names) == 1 else None
        self.export_btn.setEnabled(info is not None and self._exportable(info))
        self.report_btn.setEnabled(info is not None and (self.report_worker is None or not self.report_worker.running))

    @staticmethod
    def _exportable(info: RunInfo) -> bool:
        spec = stages.BY_NAME.get(info.stage)
        return spec is not None and spec.produces in ("checkpoint", "reward") and latest_checkpoint(
            info.path / "checkpoints") is not None

    # --- plots --------------------------------------------------------------------------------

    def _history(self, info: RunInfo) -> RunHistory:
        job = self.ctx.job_for(info.name)
        if job is not None:
            return job.history
        # A finished run's events do not change: read them once, a slice per turn of the event
        # loop (a run of 120,000 events read at once held the window 1.4 s); the plots fill in.
        if info.name not in self._histories or info.status == "running":
            old = self._loaders.pop(info.name, None)
            if old is not None:
                old.cancel()
                old.deleteLater()
            loader = self._loaders[info.name] = RunLoader(info.path, self).start()
            loader.loaded.connect(lambda name=info.name: self._loaded(name))
            self._histories[info.name] = loader.fold.history
        return self._histories[info.name]

    def _loaded(self, name: str) -> None:
        loader = self._loaders.pop(name, None)
        if loader is not None:
            loader.deleteLater()
        if self.plots is not None and name in self.selected_names():
            self.plots.refresh()
            info = self.ctx.run(name)
            if info is not None and self.selected_names() == [name]:
                self._say_note(info, self._histories[name])

    def _on_selection(self) -> None:
        self._update_buttons()
        infos = [i for i in (self.ctx.run(n) for n in self.selected_names()) if i is not None]
        if not infos:
            self.note.hide()
            if self.plots is not None:      # nothing selected: no plots of a run not chosen
                self.plots.setParent(None)
                self.plots.deleteLater()
                self.plots = None
            return
        # The stage most of the selection shares (a filter's words may catch a run of another
        # stage that names the others as its input), and no more runs than a legend can name.
        stage = Counter(i.stage for i in infos).most_common(1)[0][0]
        same = [i for i in infos if i.stage == stage]
        left_out = max(0, len(same) - MAX_OVERLAY)
        same = same[:MAX_OVERLAY]
        if self.plots is None or self.plots.stage != stage:
            if self.plots is not None:
                self.plots.setParent(None)
                self.plots.deleteLater()
            self.plots = PlotGrid(stage)
            self.plot_holder.addWidget(self.plots)
        if len(same) == 1:
            history = self._history(same[0])
            self.plots.set_history(history)
            self._say_note(same[0], history)
        else:
            self.plots.set_overlay([(i.name, self._history(i)) for i in same])
            self.note.hide()
        skipped = len(infos) - len(same) - left_out
        said = ([f"{left_out} more {stage} run(s) not overlaid: {MAX_OVERLAY} at most, the first in the table"]
                if left_out else []) + ([f"{skipped} run(s) of other stages not overlaid"] if skipped else [])
        self.hint.setText("; ".join(said) + "." if said else "Select runs of one stage to overlay their curves.")

    def _say_note(self, info: RunInfo, history: RunHistory) -> None:
        text = ""
        if info.status == "failed":
            text = f"{info.name} failed: {info.error or 'no reason recorded'}"
        if not history.keys() and info.status in ("failed", "stopped"):
            text += ("" if not text else "\n") + "It reported no metrics: it ended before its first logged step."
        self.note.setText(text)
        self.note.setVisible(bool(text))

    # --- actions ------------------------------------------------------------------------------

    def open_selected(self) -> None:
        names = self.selected_names()
        if len(names) == 1:
            info = self.ctx.run(names[0])
            if info is not None:
                self.openRun.emit(info.stage, info.name)

    def export_selected(self) -> "ExportDialog | None":
        names = self.selected_names()
        info = self.ctx.run(names[0]) if len(names) == 1 else None
        if info is None:
            return None
        dialog = ExportDialog(info.path, reward_model=stages.spec(info.stage).produces == "reward", parent=self)
        self.last_export = dialog
        dialog.open()
        return dialog

    def export_report(self) -> "Worker | None":
        """Ask where, then write the report on a worker thread (a long run's events take a
        while to read); a failure is one line in a message box."""
        names = self.selected_names()
        info = self.ctx.run(names[0]) if len(names) == 1 else None
        if info is None:
            return None
        chosen = file_dialogs.save_file(self, f"Save the report of {info.name}",
                                         str(info.path / report.REPORT_NAME), "HTML page (*.html)")
        if not chosen:
            return None
        out = Path(chosen)
        self.report_btn.setEnabled(False)
        self.hint.setText(f"Writing the report of {info.name}…")
        self.report_worker = Worker(_write_report, info.path, out)
        self.report_worker.finished.connect(lambda result: self._report_written(info.name, *result))
        self.report_worker.done.connect(self._update_buttons)
        self.report_worker.start()
        return self.report_worker

    def _report_written(self, name: str, out: Path | None, problem: str | None) -> None:
        if problem:
            self.hint.setText(f"No report of {name}.")
            QMessageBox.warning(self, "Report not written", problem)
        else:
            self.hint.setText(f"Report of {name} written to {out}")

    def show_folder(self) -> None:
        names = self.selected_names()
        if len(names) == 1:
            folder = self.ctx.runs.runs_dir / names[0]
            if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))):
                # No file manager on this desktop: the path, to copy, rather than nothing at all.
                QMessageBox.information(self, "Run folder", f"No file manager opened it. The run's folder:\n\n{folder}")

    def _confirm_delete(self, names: list[str]) -> bool:
        """Ask, naming the runs that were made from these (they lose their lineage and cannot
        resume without them); No is the default, so Enter does not delete."""
        made_from = sorted({c.name for n in names for c in self.ctx.runs.children(n)} - set(names))
        text = (f"Delete {len(names)} run(s) and their folders, checkpoints included?\n\n" + _listed(names, "\n")
                + (f"\n\n{len(made_from)} other run(s) started from them and will lose their input: "
                   + _listed(made_from, ", ") if made_from else "") + "\n\nThis cannot be undone.")
        yes, no = QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.No
        return QMessageBox.question(self, "Delete runs", text, yes | no, no) == yes

    def delete_selected(self, confirm: bool = True) -> list[str]:
        names = self.selected_names()
        if not names:
            return []
        running = [n for n in names if (info := self.ctx.run(n)) is not None and info.status == "running"]
        if running:     # said before asking, not after a Yes
            QMessageBox.warning(self, "Not deleted", f"{', '.join(running)} is running: stop it before "
                                "deleting it. Nothing was deleted.")
            return []
        if confirm and not self._confirm_delete(names):
            return []
        deleted, problems = [], []
        for name in names:
            try:
                self.ctx.runs.delete(name)
                deleted.append(name)
            except (RuntimeError, KeyError, OSError) as e:
                problems.append(f"{name}: {e}")
        self.ctx.sync()
        if problems:
            QMessageBox.warning(self, "Not deleted", "\n".join(problems))
        return deleted


def _listed(names: list[str], sep: str, most: int = 12) -> str:
    """Names for a question box: a long selection's first ones and how many more (150 names,
    one a line, pushed its Yes and No below the screen)."""
    return sep.join(names[:most]) + (f"{sep}… and {len(names) - most} more" if len(names) > most else "")
