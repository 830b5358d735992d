"""How far the rankings can be trusted: each annotator's self-consistency on hidden repeats,
Krippendorff's alpha between annotators (workbench.agreement), and, once a reward model
exists, the ranked pairs it disagrees with most, each one click from being ranked again.

Scoring answers with the reward model runs on a Worker thread; the store stays on the UI
thread (sqlite3 connections are not shared), so the items go to the worker as plain data.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog,
                               QHBoxLayout, QHeaderView, QLabel, QProgressBar, QPushButton,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ui.workers import Worker
from workbench.agreement import Agreement, agreement
from workbench.review import (Disagreement, disagreements, items_to_score, project_runs,
                              score_answers)
from workbench.store import Store

MAX_FIT_ROWS = 6        # a figure table taller than this scrolls
ALPHA_NOTE = ("Agreement: the share of answer pairs two rankings order the same way (a tie "
              "agrees only with a tie). Krippendorff's α: 1 perfect, 0 chance level; n/a when "
              "there is no disagreement to expect.")


def _fmt(x: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if x is None else pattern.format(x)


def _short(text: str, n: int = 90) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[:n - 1] + "…"


def _table(headers: list[str], stretch: tuple[int, ...] = ()) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.verticalHeader().setVisible(False)
    t.setEditTriggers(QAbstractItemView.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectRows)
    t.setWordWrap(False)
    header = t.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeToContents)
    for c in stretch:
        header.setSectionResizeMode(c, QHeaderView.Stretch)
    header.setStretchLastSection(False)
    return t


def _fill(table: QTableWidget, rows: list[list[str]], numeric: tuple[int, ...],
          fit: bool = False) -> None:
    """Rows of text; numeric columns right-aligned. `fit` makes the table exactly as tall as
    its rows, so small figure tables leave the room to the list below them."""
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            item = QTableWidgetItem(text)
            item.setToolTip(text)
            if c in numeric:
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
            table.setItem(r, c, item)
    if fit:
        table.resizeRowsToContents()
        height = table.horizontalHeader().height() + 2 * table.frameWidth() + sum(
            table.rowHeight(r) for r in range(min(table.rowCount(), MAX_FIT_ROWS)))
        table.setFixedHeight(height + 2)


def _heading(text: str) -> QLabel:
    label = QLabel(text)
    font = label.font()
    font.setBold(True)
    label.setFont(font)
    return label


def _stats(a: Agreement) -> list[str]:
    return [str(a.items), str(a.comparisons), _fmt(a.agreement, "{:.1%}"), _fmt(a.alpha)]


class AgreementView(QWidget):
    rerankRequested = Signal(int, int)      # batch id, item id
    scored = Signal(list)                   # the disagreements shown, after RM scoring

    def __init__(self, store: Store, project_dir: Path):
        super().__init__()
        self.store, self.project_dir = store, Path(project_dir)
        self.worker: Worker | None = None
        self.rows: list[Disagreement] = []
        self.batch = QComboBox()
        self.batch.currentIndexChanged.connect(lambda _: self.refresh_figures())
        self.simulated = QCheckBox("Include simulated annotators")
        self.simulated.toggled.connect(lambda _: self.refresh_figures())
        top = QHBoxLayout()
        top.addWidget(QLabel("Batch"))
        top.addWidget(self.batch, 1)
        top.addWidget(self.simulated)
        self.repeats = _table(["Annotator", "Items repeated", "Comparisons", "Agreement", "α"],
                              stretch=(0,))
        self.between = _table(["Annotators", "Items", "Comparisons", "Agreement", "α",
                               "α (interval)"], stretch=(0,))
        note = QLabel(ALPHA_NOTE)
        note.setWordWrap(True)

        self.rm = QComboBox()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.find = QPushButton("Find disagreements")
        self.find.clicked.connect(self._find)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.rm_status = QLabel("Pick a reward model run to list the ranked pairs it "
                                "disagrees with most.")
        self.rm_status.setWordWrap(True)
        self.pairs = _table(["Margin", "Annotator", "Prompt", "Ranked higher", "Ranked lower", ""],
                            stretch=(2, 3, 4))
        rm_row = QHBoxLayout()
        rm_row.addWidget(QLabel("Reward model"))
        rm_row.addWidget(self.rm, 1)
        rm_row.addWidget(browse)
        rm_row.addWidget(self.find)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(_heading("Self-consistency on hidden repeats"))
        lay.addWidget(self.repeats)
        lay.addWidget(_heading("Between annotators"))
        lay.addWidget(self.between)
        lay.addWidget(note)
        lay.addSpacing(8)
        lay.addWidget(_heading("Where the reward model disagrees with people"))
        lay.addLayout(rm_row)
        lay.addWidget(self.progress)
        lay.addWidget(self.rm_status)
        lay.addWidget(self.pairs, 1)

    # --- agreement figures -----------------------------------------------------------------------

    def batch_ids(self) -> list[int] | None:
        data = self.batch.currentData()
        return None if data is None else [data]

    def refresh(self) -> None:
        """Reload the batch and reward model lists, then the figures."""
        keep = self.batch.currentData()
        self.batch.blockSignals(True)
        self.batch.clear()
        self.batch.addItem("All batches", None)
        for b in self.store.batches():
            self.batch.addItem(b.name, b.id)
        self.batch.setCurrentIndex(max(0, self.batch.findData(keep)) if keep is not None else 0)
        self.batch.blockSignals(False)
        chosen = self.rm.currentData()
        self.rm.clear()
        for name, path in project_runs(self.project_dir, "reward"):
            self.rm.addItem(name, str(path))
        if chosen and self.rm.findData(chosen) < 0:
            self.rm.addItem(Path(chosen).name, chosen)
        if chosen:
            self.rm.setCurrentIndex(self.rm.findData(chosen))
        self.refresh_figures()

    def refresh_figures(self) -> None:
        sim = self.simulated.isChecked()
        names = [a.name for a in self.store.annotators() if sim or not a.simulated]
        kw = dict(batch_ids=self.batch_ids(), include_simulated=sim)
        rows = []
        for name in names:
            a = agreement(self.store, between="repeats", annotators=[name], **kw)
            if a.items:
                rows.append([name] + _stats(a))
        _fill(self.repeats, rows or [["no hidden repeats ranked yet", "", "", "", ""]],
              (1, 2, 3, 4), fit=True)
        rows = []
        for pair in combinations(names, 2):
            a = agreement(self.store, between="annotators", annotators=list(pair), **kw)
            if a.items:
                rows.append([" ~ ".join(pair)] + _stats(a) + [_fmt(a.alpha_interval)])
        if len(rows) > 1:
            a = agreement(self.store, between="annotators", annotators=names, **kw)
            rows.append(["all"] + _stats(a) + [_fmt(a.alpha_interval)])
        _fill(self.between, rows or [["no item ranked by two annotators yet", "", "", "", "", ""]],
              (1, 2, 3, 4, 5), fit=True)

    # --- the reward model ------------------------------------------------------------------------

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Reward model run or checkpoint",
                                                str(self.project_dir / "runs"))
        if path:
            self.rm.addItem(Path(path).name, path)
            self.rm.setCurrentIndex(self.rm.count() - 1)

    def _find(self) -> None:
        if self.rm.currentData():
            self.score_with(Path(self.rm.currentData()))
        else:
            self.rm_status.setText("⚠ Pick a reward model run first (Browse… for any folder).")

    def score_with(self, rm_path: Path) -> Worker | None:
        """Score every ranked item's answers with the reward model on a worker thread, then
        list the pairs it disagrees with most. Returns the worker (None if nothing to score)."""
        self.shutdown()
        items = items_to_score(self.store, batch_ids=self.batch_ids(),
                               include_simulated=self.simulated.isChecked())
        if not items:
            self.rm_status.setText("No ranked items to score yet.")
            return None
        self.rm_status.setText(f"Scoring the answers of {len(items)} ranked items with "
                               f"{Path(rm_path).name}…")
        self.progress.setRange(0, sum(len(it.answers) for it in items))
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.find.setEnabled(False)
        worker = self.worker = Worker(score_answers, rm_path, items)
        worker.progress.connect(lambda p: self.progress.setValue(p[0]))
        worker.finished.connect(lambda scores: self._show(worker, scores))
        worker.errored.connect(lambda text: self._failed(worker, text))
        return worker.start()

    def _show(self, worker: Worker, scores: dict) -> None:
        if worker is not self.worker:
            return          # a result that arrived after shutdown or a newer request
        self._idle()
        self.rows = disagreements(self.store, scores, batch_ids=self.batch_ids(),
                                  include_simulated=self.simulated.isChecked())
        self.rm_status.setText(
            f"{len(self.rows)} ranked pair(s) where the reward model prefers the answer people "
            "ranked lower, largest margin first (in reward standard deviations)."
            if self.rows else "The reward model agrees with every ranked pair.")
        _fill(self.pairs, [[f"{d.margin:+.2f}", d.annotator, _short(d.prompt), _short(d.better),
                            _short(d.worse), ""] for d in self.rows], (0,))
        for r, d in enumerate(self.rows):
            b = QPushButton("Re-rank")
            b.setToolTip("rank this item again in your session (your earlier ranking is kept "
                         "as withdrawn and offered for editing)")
            b.clicked.connect(lambda _=False, d=d: self.rerankRequested.emit(d.batch_id, d.item_id))
            self.pairs.setCellWidget(r, 5, b)
        self.scored.emit(self.rows)

    def _failed(self, worker: Worker, text: str) -> None:
        if worker is not self.worker:
            return
        self._idle()
        self.rm_status.setText(f"⚠ Scoring failed: {text}")

    def _idle(self) -> None:
        self.progress.setVisible(False)
        self.find.setEnabled(True)

    def shutdown(self) -> None:
        """Stop a scoring run and wait for its thread (before the store closes)."""
        if self.worker is not None:
            self.worker.cancel()
            self.worker.wait()
            self.worker = None
            self._idle()
