"""The pages of the ranking view: where a session starts (batch, annotator, hidden repeats),
the guidelines (read, edit, continue) and the session itself (prompt, cards, progress).

They only show and collect; RankingView connects them to the work and fills them.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFormLayout, QFrame, QHBoxLayout,
                               QHeaderView, QLabel, QLineEdit, QMenu, QPlainTextEdit, QProgressBar,
                               QPushButton, QScrollArea, QSpinBox, QTextBrowser, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from ui.ranking_cards import CardList, PromptView, scaled_font
from workbench.review import BatchProgress


class KeyButton(QPushButton):
    """A button reached with Tab, which Enter presses as Space does (outside a dialog a
    QPushButton leaves Enter to its parent, and the ranking view would start a session)."""

    def keyPressEvent(self, event) -> None:
        if event.key() in (Qt.Key_Return, Qt.Key_Enter):
            self.click()
            return
        super().keyPressEvent(event)


def button(text: str, slot, tip: str = "", focus: bool = False) -> QPushButton:
    """A button; in a ranking session one that never takes keyboard focus (keys belong to the
    ranking view, and each of its actions has a key), elsewhere (`focus`) one Tab reaches."""
    b = KeyButton(text) if focus else QPushButton(text)
    if not focus:
        b.setFocusPolicy(Qt.NoFocus)
    b.setToolTip(tip)
    b.clicked.connect(slot)
    return b



class NoteEdit(QLineEdit):
    """The item's note. Enter or Esc returns to ranking (`done`), consumed here: passed on,
    Enter would reach the view and submit, which a person finishing a note does not expect.
    A subclass rather than an event filter on the view: a filter object that is itself being
    destroyed makes PySide fail ("Slot not found") on the events of its dying children."""
    done = Signal()

    def keyPressEvent(self, event) -> None:
        if event.key() in (Qt.Key_Escape, Qt.Key_Return, Qt.Key_Enter):
            self.done.emit()
            return
        super().keyPressEvent(event)

class StartPage(QWidget):
    startRequested = Signal()
    newBatchRequested = Signal()
    importRequested = Signal()
    exportRequested = Signal()
    guidelinesRequested = Signal()
    simulateRequested = Signal()
    packsRequested = Signal()
    mergeRequested = Signal()
    selectionChanged = Signal()

    def __init__(self):
        super().__init__()
        self.title = title = QLabel("Rank sampled answers")
        title.setFont(scaled_font(self, 1.5, bold=True))
        self.intro = intro = QLabel(
            "Pick a batch and who you are, then rank each prompt's answers best first. Every "
            "ranking is stored the moment you submit it; a session resumes where it was left.")
        intro.setWordWrap(True)
        self.batches = QTreeWidget()
        self.batches.setHeaderLabels(["Batch", "K", "Items", "Ranked by"])
        self.batches.setRootIsDecorated(False)
        self.batches.setSelectionMode(QAbstractItemView.SingleSelection)
        self.batches.header().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.batches.header().setStretchLastSection(True)
        self.batches.itemSelectionChanged.connect(self.selectionChanged)
        self.batches.itemDoubleClicked.connect(lambda *_: self.startRequested.emit())
        self.annotator = QComboBox()
        self.annotator.setEditable(True)
        self.annotator.lineEdit().setPlaceholderText("your name")
        self.annotator.currentTextChanged.connect(lambda _: self.selectionChanged.emit())
        self.repeats = QSpinBox(minimum=0, maximum=50, value=10, suffix=" %")
        self.repeats.setToolTip("A share of the items comes back once more, unannounced, to "
                                "measure how consistently you rank (Agreement tab). Fixed when "
                                "a session starts.")
        self.start = button("Start ranking  ⏎", self.startRequested, focus=True)
        self.start.setDefault(True)
        form = QFormLayout()
        form.addRow("Annotator", self.annotator)
        form.addRow("Hidden repeats", self.repeats)
        actions = QHBoxLayout()
        actions.addWidget(self.start)
        actions.addStretch(1)
        for text, signal, tip in (
                ("New batch…", self.newBatchRequested, "sample K answers per prompt from a checkpoint"),
                ("Import…", self.importRequested, "K-way rankings, pairs, transcripts, Hugging Face "
                 "(JSONL or Parquet), Label Studio or Argilla exports"),
                ("Export…", self.exportRequested, "K-way rankings or {prompt, chosen, rejected} pairs"),
                ("Guidelines…", self.guidelinesRequested, "read or edit this project's ranking guidelines")):
            actions.addWidget(button(text, signal, tip, focus=True))
        packs = button("Packs…", lambda: None, "a class ranks this batch on their own machines: "
                       "one pack file per annotator, merged back here", focus=True)
        menu = QMenu(packs)
        menu.addAction("Make annotation packs for this batch…", self.packsRequested.emit)
        menu.addAction("Merge annotation packs…", self.mergeRequested.emit)
        packs.setMenu(menu)
        actions.addWidget(packs)
        self.simulate = button("Simulated ranking…", self.simulateRequested,
                               "rank the selected batch with the demo's simulated annotator; "
                               "its rankings are labelled simulated, never passed off as a person's",
                               focus=True)
        actions.addWidget(self.simulate)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setVisible(False)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addWidget(intro)
        lay.addWidget(self.batches, 1)
        lay.addLayout(form)
        lay.addLayout(actions)
        lay.addWidget(self.status)

    def set_pack_mode(self, annotator: str, path: str) -> None:
        """An annotation pack: one batch, one annotator, none of the project's actions."""
        self.title.setText(f"Annotation pack for {annotator}")
        self.intro.setText(f"This is an annotation pack ({path}): every ranking you submit is "
                           "saved into it at once. When you are done, send the file back.")
        for w in self.findChildren(QPushButton):
            w.setVisible(w is self.start)
        self.annotator.setEditText(annotator)
        self.annotator.setEnabled(False)
        self.repeats.setEnabled(False)

    def set_status(self, text: str) -> None:
        self.status.setText(text)
        self.status.setVisible(bool(text))

    def populate(self, rows: list[BatchProgress], select: int | None = None) -> None:
        keep = select if select is not None else self.selected_batch()
        self.batches.clear()
        for row in rows:
            b = row.batch
            who = ", ".join(f"{name}{' (simulated)' if name in row.simulated else ''} "
                            f"{n}/{row.assigned.get(name, b.n_items)}"
                            for name, n in row.ranked.items()) or "–"
            item = QTreeWidgetItem([b.name, str(b.k or "mixed"), str(b.n_items), who])
            item.setData(0, Qt.UserRole, b.id)
            self.batches.addTopLevelItem(item)
            if b.id == keep:
                self.batches.setCurrentItem(item)
        if self.batches.currentItem() is None and self.batches.topLevelItemCount():
            self.batches.setCurrentItem(self.batches.topLevelItem(self.batches.topLevelItemCount() - 1))

    def selected_batch(self) -> int | None:
        item = self.batches.currentItem()
        return item.data(0, Qt.UserRole) if item is not None else None

    def set_annotators(self, names: list[str], current: str) -> None:
        self.annotator.blockSignals(True)
        self.annotator.clear()
        self.annotator.addItems(names)
        self.annotator.setEditText(current)
        self.annotator.blockSignals(False)

    def name(self) -> str:
        return self.annotator.currentText().strip()

    def show_repeats(self, stored: dict | None) -> None:
        """An existing session keeps the share it started with; only a new one can choose."""
        self.repeats.setEnabled(stored is None)
        if stored is not None:
            self.repeats.setValue(round(100 * stored.get("repeat_fraction", 0.0)))


class GuidelinesPage(QWidget):
    continueRequested = Signal()
    saved = Signal(str)

    def __init__(self):
        super().__init__()
        self.heading = QLabel()
        self.heading.setFont(scaled_font(self, 1.2, bold=True))
        self.view = QTextBrowser()
        self.view.setOpenExternalLinks(True)
        self.view.setFocusPolicy(Qt.NoFocus)
        self.editor = QPlainTextEdit()
        self.editor.setVisible(False)
        self.editing = False
        self._markdown = ""
        self.edit = button("Edit", self._toggle_edit, "change this project's guidelines (markdown)")
        self.cancel = button("Cancel", self._cancel)
        self.cancel.setVisible(False)
        self.go = button("Continue  ⏎", self.continueRequested)
        row = QHBoxLayout()
        row.addWidget(self.edit)
        row.addWidget(self.cancel)
        row.addStretch(1)
        row.addWidget(self.go)
        lay = QVBoxLayout(self)
        lay.addWidget(self.heading)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.editor, 1)
        lay.addLayout(row)

    def show_text(self, markdown: str, heading: str, go: str) -> None:
        self.heading.setText(heading)
        self.go.setText(f"{go}  ⏎")
        self.view.setMarkdown(markdown)
        self._markdown = markdown
        self._editing(False)

    def _editing(self, on: bool) -> None:
        self.editing = on
        self.editor.setVisible(on)
        self.view.setVisible(not on)
        self.cancel.setVisible(on)
        self.go.setEnabled(not on)
        self.edit.setText("Save" if on else "Edit")
        if on:
            self.editor.setPlainText(self._markdown)
            self.editor.setFocus()

    def _toggle_edit(self) -> None:
        if not self.editing:
            self._editing(True)
            return
        self._markdown = self.editor.toPlainText()
        self.view.setMarkdown(self._markdown)
        self._editing(False)
        self.saved.emit(self._markdown)

    def _cancel(self) -> None:
        self._editing(False)


class SessionPage(QWidget):
    """What the annotator looks at while ranking. `view` (the RankingView) gets the focus
    from clicks here and provides the buttons' actions; it fills the page."""

    def __init__(self, view: QWidget):
        super().__init__()
        # A click anywhere here that no child takes (cards, labels) gives the keys to the view.
        self.setFocusPolicy(Qt.ClickFocus)
        self.setFocusProxy(view)
        self.title = QLabel()
        self.title.setFont(scaled_font(self, 1.05, bold=True))
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        # Centred in every style: some draw it at the left, under the fill while few are ranked.
        self.bar.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.bar.setMaximumWidth(260)
        self.pace = QLabel()
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addStretch(1)
        head.addWidget(self.bar)
        head.addWidget(self.pace)
        self.skip_button = button("Skip", view.skip, "S: the item comes back at the end")
        for b in (button("Guidelines", view.show_guidelines, "F1"), self.skip_button,
                  button("Undo", view.undo, "Ctrl+Z: take back your last ranking"),
                  button("End session", view.end_session, "Ctrl+W: back to the batch list")):
            head.addWidget(b)

        self.prompt = PromptView()
        self.ranking = QLabel()
        self.ranking.setFont(scaled_font(self, 1.15, bold=True))
        rank_row = QHBoxLayout()
        rank_row.addWidget(self.ranking, 1)
        self.submit_button = button("Submit  ⏎", view.submit)
        rank_row.addWidget(self.submit_button)
        self.order_button = button("Submit card order  Ctrl+⏎", view.submit_card_order,
                                   "rank the answers in the cards' order, top first")
        rank_row.addWidget(self.order_button)

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setFocusPolicy(Qt.NoFocus)
        self.scroll.viewport().setAutoFillBackground(False)
        self.cards = CardList(self.scroll)
        self.scroll.setWidget(self.cards)
        self.done = QLabel()
        self.done.setWordWrap(True)
        self.done.setAlignment(Qt.AlignCenter)
        self.done.setFont(scaled_font(self, 1.2))

        self.note = NoteEdit()
        self.note.setPlaceholderText("Note on this item (N to write, Enter to return to ranking)")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.legend = QLabel()
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setWordWrap(True)
        self.legend.setForegroundRole(QPalette.PlaceholderText)

        lay = QVBoxLayout(self)
        lay.addLayout(head)
        lay.addWidget(self.prompt)
        lay.addLayout(rank_row)
        lay.addWidget(self.scroll, 1)
        lay.addWidget(self.done, 1)
        lay.addWidget(self.note)
        lay.addWidget(self.status)
        lay.addWidget(self.legend)
