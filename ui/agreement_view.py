"""How far the rankings can be trusted, on three sub-tabs of the Rank page's Agreement tab:

  Annotators: each annotator's progress and agreement with the rest (and alpha without them),
    every annotator pair, and each one's self-consistency on hidden repeats;
  Items: the items people disagree on most, with Kendall's W, each one click from re-ranking;
  Reward model: its held-out accuracy drawn against the human-human ceiling, and the ranked
    pairs it disagrees with most, each one click from re-ranking.

The figures are workbench.agreement.figures over the chosen batch (or all of them). Scoring
answers with the reward model runs on a Worker thread; the store stays on the UI thread
(sqlite3 connections are not shared), so the items go to the worker as plain data.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox,
                               QHBoxLayout, QHeaderView, QLabel, QProgressBar, QPushButton,
                               QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from ui import file_dialogs
from ui.workers import Worker
from workbench.agreement import Agreement, Figures, agreement, figures
from workbench.review import (Disagreement, RewardAccuracy, disagreements, items_to_score,
                              project_runs, reward_accuracy, score_answers)
from workbench.store import Store

MAX_FIT_ROWS = 8        # a figure table taller than this scrolls
# Disputed items listed (the most disagreed first): a row and a button each, and a class's
# project has thousands ranked twice; more are for `workbench agreement`, not a list to read.
MAX_ITEMS = 200
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
    t.setTabKeyNavigation(False)     # Tab moves on to the next control
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


def _note(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def _rerank_button() -> QPushButton:
    b = QPushButton("Re-rank")
    b.setToolTip("rank this item again in your session (your earlier ranking is kept as "
                 "withdrawn and offered for editing)")
    return b


class CeilingBars(QWidget):
    """Two bars on a 0-100 % scale: the reward model's held-out pairwise accuracy and the
    human-human ceiling, with a dashed line at the ceiling across both and a dotted one at
    50 % (a coin flip), so "how close to people" reads at a glance."""
    ROW, LABEL = 38, 190        # a row holds two lines of label

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, float | None]] = []
        self.setMinimumHeight(2 * self.ROW + 8)

    def set_values(self, rm: float | None, ceiling: float | None, label: str = "Human-human ceiling") -> None:
        self.rows = [("Reward model, held out", rm), (label, ceiling)]
        self.setToolTip("\n".join(f"{label}: {_fmt(v, '{:.1%}')}" for label, v in self.rows))
        self.update()

    def label_width(self) -> int:
        """As wide as the longest label, up to half the widget: a longer one wraps onto a second
        line (its whole text is in the tooltip too)."""
        fm = self.fontMetrics()
        widest = max((fm.horizontalAdvance(label) for label, _ in self.rows), default=0) + 12
        return max(self.LABEL, min(widest, self.width() // 2))

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        left = self.label_width()
        width = max(40, self.width() - left - 70)
        colours = [pal.color(QPalette.Highlight), QColor(120, 160, 90)]
        for i, (label, value) in enumerate(self.rows):
            y = 4 + i * self.ROW
            p.setPen(pal.color(QPalette.WindowText))
            p.drawText(QRectF(0, y, left - 8, self.ROW - 6),
                       Qt.AlignRight | Qt.AlignVCenter | Qt.TextWordWrap, label)
            p.fillRect(QRectF(left, y + 3, width, self.ROW - 12), pal.color(QPalette.Midlight))
            if value is not None:
                p.fillRect(QRectF(left, y + 3, width * value, self.ROW - 12), colours[i])
            p.drawText(QRectF(left + width + 6, y, 64, self.ROW - 6), Qt.AlignLeft | Qt.AlignVCenter,
                       _fmt(value, "{:.1%}"))
        bottom = 4 + len(self.rows) * self.ROW - 6
        for value, style in ((0.5, Qt.DotLine), (self.rows[1][1] if self.rows else None, Qt.DashLine)):
            if value is not None:
                p.setPen(QPen(pal.color(QPalette.WindowText), 1, style))
                p.drawLine(int(left + width * value), 2, int(left + width * value), bottom)
        p.end()


class AgreementView(QWidget):
    rerankRequested = Signal(int, int)      # batch id, item id
    scored = Signal(list)                   # the disagreements shown, after RM scoring

    def __init__(self, store: Store, project_dir: Path):
        super().__init__()
        self.store, self.project_dir = store, Path(project_dir)
        self.worker: Worker | None = None
        self.rows: list[Disagreement] = []
        self.figures: Figures | None = None
        self.rm_accuracy: RewardAccuracy | None = None
        self.batch = QComboBox()
        self.batch.currentIndexChanged.connect(lambda _: self.refresh_figures())
        self.simulated = QCheckBox("Include simulated annotators")
        self.simulated.toggled.connect(lambda _: self.refresh_figures())
        top = QHBoxLayout()
        top.addWidget(QLabel("Batch"))
        top.addWidget(self.batch, 1)
        top.addWidget(self.simulated)
        self.summary = _note("")
        self.sections = QTabWidget()
        self.sections.addTab(self._annotators_page(), "Annotators")
        self.sections.addTab(self._items_page(), "Items")
        self.sections.addTab(self._reward_page(), "Reward model")
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.summary)
        lay.addWidget(self.sections, 1)

    def _annotators_page(self) -> QWidget:
        self.annotators = _table(["Annotator", "Ranked", "Assigned", "All items", "Shared items",
                                  "Comparisons", "Agreement with the rest", "α without them"],
                                 stretch=(0,))
        self.between = _table(["Annotators", "Items", "Comparisons", "Agreement", "α",
                               "α (interval)", "Same pick when both prefer"], stretch=(0,))
        self.repeats = _table(["Annotator", "Items repeated", "Comparisons", "Agreement", "α"],
                              stretch=(0,))
        page = QWidget()
        lay = QVBoxLayout(page)
        lay.addWidget(_heading("Each annotator: progress, and agreement with the rest"))
        lay.addWidget(self.annotators)
        lay.addWidget(_heading("Annotator pairs"))
        lay.addWidget(self.between)
        lay.addWidget(_heading("Self-consistency on hidden repeats"))
        lay.addWidget(self.repeats)
        lay.addWidget(_note(ALPHA_NOTE + " α without them: Krippendorff's α of everyone else; "
                            "well above the overall α, that annotator is out of step."))
        lay.addStretch(1)
        return page

    def _items_page(self) -> QWidget:
        self.items = _table(["Agreement", "Kendall's W", "Rankers", "Batch", "Prompt", ""],
                            stretch=(4,))
        self.items_status = _note("")
        page = QWidget()
        lay = QVBoxLayout(page)
        lay.addWidget(self.items_status)
        lay.addWidget(self.items, 1)
        return page

    def _reward_page(self) -> QWidget:
        self.ceiling = CeilingBars()
        self.ceiling_note = _note("")
        self.rm = QComboBox()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.find = QPushButton("Find disagreements")
        self.find.clicked.connect(self._find)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.rm_status = _note("Pick a reward model run to list the ranked pairs it disagrees "
                               "with most.")
        self.pairs = _table(["Margin", "Annotator", "Prompt", "Ranked higher", "Ranked lower", ""],
                            stretch=(2, 3, 4))
        rm_row = QHBoxLayout()
        rm_row.addWidget(QLabel("Reward model"))
        rm_row.addWidget(self.rm, 1)
        rm_row.addWidget(browse)
        rm_row.addWidget(self.find)
        page = QWidget()
        lay = QVBoxLayout(page)
        self.ceiling_heading = _heading("The reward model against the human-human ceiling")
        lay.addWidget(self.ceiling_heading)
        lay.addWidget(self.ceiling)
        lay.addWidget(self.ceiling_note)
        lay.addSpacing(8)
        lay.addWidget(_heading("Where the reward model disagrees with people"))
        lay.addLayout(rm_row)
        lay.addWidget(self.progress)
        lay.addWidget(self.rm_status)
        lay.addWidget(self.pairs, 1)
        return page

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
        self.rm_accuracy = reward_accuracy(self.project_dir)
        self.refresh_figures()

    def refresh_figures(self) -> None:
        sim = self.simulated.isChecked()
        f = self.figures = figures(self.store, batch_ids=self.batch_ids(), include_simulated=sim)
        self._show_summary(f)
        self._show_annotators(f)
        self._show_repeats([a.name for a in f.annotators])
        self._show_items(f)
        self._show_ceiling(f)

    def _show_summary(self, f: Figures) -> None:
        o = f.overall
        if not o.items:
            self.summary.setText(f"{len(f.annotators)} annotator(s); no item has been ranked by "
                                 "two of them yet.")
            return
        self.summary.setText(
            f"{len(f.annotators)} annotators · {o.items} items ranked by two or more · "
            f"agreement {_fmt(o.agreement, '{:.1%}')} · α {_fmt(o.alpha)} · Kendall's W "
            f"{_fmt(f.kendall_w)} (mean over items) · {f.ceiling_name} "
            f"{_fmt(f.ceiling, '{:.1%}')} of {f.tally.strict_total} comparisons")

    def _show_annotators(self, f: Figures) -> None:
        rows = [[a.name + (" (simulated)" if a.simulated else ""), str(a.done), str(a.assigned),
                 str(a.total), str(a.items), str(a.tally.total),
                 _fmt(a.tally.agreement, "{:.1%}"), _fmt(a.alpha_without)] for a in f.annotators]
        _fill(self.annotators, rows or [["nobody has ranked these items yet"] + [""] * 7],
              tuple(range(1, 8)), fit=True)
        rows = [[" ~ ".join(p.names), str(p.items), str(p.tally.total),
                 _fmt(p.tally.agreement, "{:.1%}"), _fmt(p.alpha), _fmt(p.alpha_interval),
                 f"{_fmt(p.tally.strict, '{:.1%}')} of {p.tally.strict_total}"] for p in f.pairs]
        if len(rows) > 1:
            o = f.overall
            rows.append(["all", *_stats(o), _fmt(o.alpha_interval),
                         f"{_fmt(f.ceiling, '{:.1%}')} of {f.tally.strict_total}"])
        _fill(self.between, rows or [["no item ranked by two annotators yet"] + [""] * 6],
              tuple(range(1, 7)), fit=True)

    def _show_repeats(self, names: list[str]) -> None:
        kw = dict(batch_ids=self.batch_ids(), include_simulated=self.simulated.isChecked())
        rows = []
        for name in names:
            a = agreement(self.store, between="repeats", annotators=[name], **kw)
            if a.items:
                rows.append([name] + _stats(a))
        _fill(self.repeats, rows or [["no hidden repeats ranked yet", "", "", "", ""]],
              (1, 2, 3, 4), fit=True)

    def _show_items(self, f: Figures) -> None:
        names = {b.id: b.name for b in self.store.batches()}
        shown = f.items[:MAX_ITEMS]
        self.items_status.setText(
            ("Items ranked by two or more people, the most disagreed first (lowest share of "
             "answer pairs their rankings order the same way; Kendall's W: 1 the same order, 0 "
             "unrelated). Discuss them, re-rank them, or leave them out of training with the "
             "reward page's agreement threshold."
             + (f" The {len(shown)} most disagreed of {len(f.items):,} are listed." if len(shown) < len(f.items)
                else "")) if f.items else
            "No item has been ranked by two people yet.")
        _fill(self.items, [[_fmt(it.agreement, "{:.1%}"), _fmt(it.w),
                            f"{len(it.rankers)}: {', '.join(it.rankers)}",
                            names.get(it.batch_id, str(it.batch_id)), _short(it.prompt), ""]
                           for it in shown], (0, 1))
        for r, it in enumerate(shown):
            b = _rerank_button()
            b.clicked.connect(lambda _=False, it=it: self.rerankRequested.emit(it.batch_id,
                                                                               it.item_id))
            self.items.setCellWidget(r, 5, b)

    def _show_ceiling(self, f: Figures) -> None:
        rm = self.rm_accuracy
        name = f.ceiling_name
        self.ceiling.set_values(rm.accuracy if rm else None, f.ceiling, name[0].upper() + name[1:])
        self.ceiling_heading.setText(f"The reward model against the {name}")
        where = (f"{rm.run}, on {rm.rankings} held-out rankings" if rm and rm.rankings is not None
                 else rm.run if rm else "")
        self.ceiling_note.setText(
            # The run's rankings may be simulated ones (the pipeline's are): not "the person".
            ("Reward model: " + (f"{rm.accuracy:.1%} of held-out answer pairs ordered as they were "
                                 f"ranked ({where}; human or simulated, as the run was started)."
                                 if rm else
                                 "no reward run has finished yet (Reward model page).")
             + " Ceiling: where two annotators both preferred one answer of a pair, how often "
             f"they chose the same one ({f.tally.strict_total} comparisons in the batch chosen "
             "above). A model near the ceiling agrees with a person about as often as another "
             "person does. Dotted line: 50 %, a coin flip."))

    # --- the reward model ------------------------------------------------------------------------

    def _browse(self) -> None:
        path = file_dialogs.existing_dir(self, "Reward model run or checkpoint",
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
            b = _rerank_button()
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
