"""The methods side by side: PPO, DPO and GRPO runs from one SFT model, evaluated against it on
the same held-out prompts (workbench.methods), as a table and a plot of win rate against KL.

The evaluation runs on a Worker (it answers a few hundred prompts with each model: seconds to a
minute on a CPU); the last result is read back from the project's methods.json, so the page
shows it when the app opens. "Blind A/B" hands the selected method and its SFT model to the
Compare tab, where a person judges the two answer by answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QSpinBox,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from engine.runio import format_duration
from ui.plots import COLORS
from ui.workers import Worker
from workbench import methods, stages
from workbench.project import Project

COLUMNS = ("Method", "Run", "Win rate vs SFT", "W / T / L", "Task accuracy", "RM score", "KL to SFT (nats)",
           "Training time")


def row_cells(r: dict) -> list[str]:
    acc = (f"{methods.percent(r.get('base_accuracy'))} → {methods.percent(r['accuracy'])}"
           if r.get("accuracy") is not None else "–")
    score = f"{r['base_score']:+.3f} → {r['score']:+.3f}" if "score" in r else "–"
    secs = format_duration(r["seconds"]) if r.get("seconds") is not None else "–"
    return [stages.spec(r["method"]).title, r["run"], f"{r['win_rate']:.1%}",
            f"{r['wins']} / {r['ties']} / {r['losses']}", acc, score, f"{r['kl']:.2f}", secs]


class MethodsView(QWidget):
    abRequested = Signal(object, object)      # (SFT run folder, method run folder)

    def __init__(self, project_dir: Path, runs: Callable[[], list], parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.project_dir = Path(project_dir)
        self.runs = runs                        # the project's runs now (ProjectContext.run_list)
        self.result: Optional[dict] = None
        self.gone: set[str] = set()             # runs of the shown result that were deleted
        self.worker: Optional[Worker] = None
        intro = QLabel("Each alignment method's newest run from one SFT model, against that model on the "
                       "same held-out tasks: how often the simulated annotator prefers it, its task "
                       "accuracy and reward-model score, and how far it moved (KL, measured the same way "
                       "for every method). Train PPO, DPO or GRPO from the same SFT run first.")
        intro.setWordWrap(True)
        self.prompts = QSpinBox()
        self.prompts.setRange(1, 10000)
        self.prompts.setValue(methods.DEFAULT_PROMPTS)
        self.prompts.setToolTip("held-out tasks each model answers")
        self.compare_btn = QPushButton("Compare methods")
        self.compare_btn.clicked.connect(self.start)
        self.ab_btn = QPushButton("Blind A/B against SFT")
        self.ab_btn.setToolTip("judge the selected method against its SFT model in the Compare tab")
        self.ab_btn.clicked.connect(self._ab)
        self.status = QLabel()
        self.status.setWordWrap(True)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Held-out prompts"))
        controls.addWidget(self.prompts)
        controls.addWidget(self.compare_btn)
        controls.addWidget(self.ab_btn)
        controls.addStretch(1)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setTabKeyNavigation(False)     # Tab moves on to the next control
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "KL to SFT (nats per answer)")
        self.plot.setLabel("left", "win rate vs SFT (%)")
        # Percent as it is: pyqtgraph would otherwise rescale 73 to "730 (x0.1)" and the like.
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        self.plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.plot.setBackground(self.palette().color(QPalette.Base))
        self.plot.addLine(y=50, pen=pg.mkPen("#888", style=Qt.DashLine))     # a tie with SFT
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        col = QVBoxLayout(self)
        col.addWidget(intro)
        col.addLayout(controls)
        col.addWidget(self.status)
        col.addWidget(self.table, 1)
        col.addWidget(self.plot, 2)
        self.refresh()

    def refresh(self) -> None:
        """Called whenever the Chat page changes tab: redrawn only when methods.json changed, so
        a selected row survives a visit to the Compare tab; what the result no longer shows of
        the project (a run deleted, a newer one) is said each time."""
        if self.worker is None:
            result = methods.read_result(self.project_dir)
            if result != self.result or result is None:
                self.show_result(result)
            else:
                self._say_status()

    def runs_changed(self) -> None:
        """The project's runs changed (every few seconds while a job streams): the note on the
        result shown is said again, methods.json is not read again."""
        if self.worker is None and self.result is not None and self.isVisible():
            self._say_status()

    def show_result(self, result: Optional[dict]) -> None:
        self.result = result
        rows = result["rows"] if result else []
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, text in enumerate(row_cells(r)):
                item = QTableWidgetItem(text)
                if j >= 2:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(i, j, item)
        self._draw(rows)
        self._say_status()

    def _say_status(self) -> None:
        result = self.result
        if not result:
            self.gone = set()
            self.status.setText("No comparison yet: train two or more methods from one SFT run, then Compare.")
            self._update_buttons()
            return
        self.gone, notes = methods.out_of_date(result, self.runs())
        for i, r in enumerate(result["rows"]):
            item = self.table.item(i, 1)
            if item is not None:
                item.setText(r["run"] + (" (deleted)" if r["run"] in self.gone else ""))
        judge = f", scored by {result['reward_model']}" if result.get("reward_model") else ""
        text = f"Against {result['sft']} on {result['prompts']} held-out prompts{judge}."
        if notes:
            text += " Out of date: " + "; ".join(notes) + ". Compare methods again to see the project as it is."
        self.status.setText(text)
        self._update_buttons()

    def _draw(self, rows: list[dict]) -> None:
        for item in [i for i in self.plot.getPlotItem().items if isinstance(i, (pg.ScatterPlotItem, pg.TextItem))]:
            self.plot.removeItem(item)
        for i, r in enumerate(rows):
            color = COLORS[i % len(COLORS)]
            self.plot.addItem(pg.ScatterPlotItem([r["kl"]], [100 * r["win_rate"]], size=12,
                                                 brush=pg.mkBrush(color), pen=pg.mkPen(color)))
            label = pg.TextItem(stages.spec(r["method"]).title, color=color, anchor=(0, 1))
            label.setPos(r["kl"], 100 * r["win_rate"])
            self.plot.addItem(label)
        if rows:
            # Room for the labels, which sit above and right of their points, and the 50% line.
            kls, wins = [r["kl"] for r in rows], [100 * r["win_rate"] for r in rows]
            span = max(max(kls) - min(kls), 0.5)
            self.plot.setXRange(min(0.0, min(kls)), max(kls) + 0.25 * span, padding=0.02)
            self.plot.setYRange(min(45.0, min(wins) - 5), max(wins) + 8, padding=0)

    def selected(self) -> Optional[dict]:
        rows = self.table.selectionModel().selectedRows()
        return self.result["rows"][rows[0].row()] if rows and self.result else None

    def _update_buttons(self) -> None:
        r = self.selected()
        # A deleted run (or SFT model) has nothing left to answer with.
        usable = r is not None and not {r["run"], self.result["sft"]} & self.gone
        self.ab_btn.setEnabled(usable and self.worker is None)
        self.compare_btn.setEnabled(self.worker is None)

    def start(self) -> None:
        self.worker = Worker(self._compare, self.prompts.value())
        self.worker.progress.connect(lambda text: self.status.setText(text))
        self.worker.finished.connect(self._finished)
        self.worker.errored.connect(self._failed)
        self.status.setText("Evaluating …")
        self._update_buttons()
        self.worker.start()

    def _compare(self, n_prompts: int, emit, cancelled) -> dict:
        project = Project.open(self.project_dir)
        return methods.compare_methods(project, None, n_prompts, on_progress=lambda i, n, m: emit(
            f"Evaluating {stages.spec(m).title} ({i + 1} of {n}) on {n_prompts} held-out prompts …"))

    def _finished(self, result: dict) -> None:
        self.worker = None
        self.show_result(result)

    def _failed(self, text: str) -> None:
        self.worker = None
        self._update_buttons()
        self.status.setText(text.split(": ", 1)[-1] if text.startswith("MethodsError") else text)

    def _ab(self) -> None:
        r = self.selected()
        if r is not None:
            runs = self.project_dir / "runs"
            self.abRequested.emit(runs / self.result["sft"], runs / r["run"])

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.worker.wait()
