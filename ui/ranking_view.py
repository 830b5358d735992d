"""The ranking session view: a prompt and its K answers as cards, ranked by keyboard or drag.

A thin layer over workbench.annotation.AnnotationSession, which knows the queue, the recorded
shuffled order, skip, undo, resume and progress, and stores each ranking in one transaction
the moment it is submitted. So the view holds nothing worth saving: closing it at any point
loses no submitted ranking, and a new view resumes at the item the old one was showing.

Keys (ui/ranking_keys.py has the grammar; the legend line on screen repeats it):

    1..K        rank answers best first; after K-1 the last one is implied (K=4: 3 keys + Enter)
    = / Space   tie the next answer with the previous one
    Enter       submit                     Ctrl+Enter  submit the cards' order (after a drag)
    Backspace   take back the last answer  Esc         clear the ranking
    F n i|m|h|o toggle a flag on answer n  G n 1-7     score answer n (0 clears)
    N           write a note               S           skip (the item comes back at the end)
    Ctrl+Z / U  undo the last ranking      F1 / ?      guidelines

Keys are handled by the view itself (buttons never take focus, cards hand focus to the view),
so nothing has to be clicked first, and a test sends keys to the view.
"""
from __future__ import annotations

import getpass
import time
import threading
import weakref
from html import escape
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QObject, QEvent, Qt, QTimer, Signal
from PySide6.QtWidgets import QMessageBox, QStackedWidget, QTabWidget, QVBoxLayout, QWidget

from ui.agreement_view import AgreementView
from ui.pack_dialogs import make_packs, merge_pack_files
from ui.ranking_cards import ordinal
from ui.ranking_dialogs import NewBatchDialog, show_error
from ui.ranking_files import PreferenceFiles
from ui.ranking_keys import LEGEND, RankInput
from ui.ranking_pages import GuidelinesPage, SessionPage, StartPage
from ui.workers import Worker
from workbench import guidelines
from workbench.annotation import AnnotationSession, Current, MovedOn
from workbench.review import (batch_progress, existing_session, project_runs, put_back,
                              recent_session, reopen_item)
from workbench.samples import import_sample_run
from workbench.simulated import DEFAULT_NAME, DEMO_PREFERENCE_TEXT, rank_batch
from workbench.store import RankingError, Store, StoreError


# Keys that scroll the answer cards (K = 8 long answers do not fit a laptop's screen).
SCROLL_KEYS = {Qt.Key_PageDown: "page-down", Qt.Key_PageUp: "page-up", Qt.Key_Down: "down",
               Qt.Key_Up: "up"}


def key_token(event) -> str | None:
    """A key event as a RankInput token, None for keys the view leaves alone."""
    mods = event.modifiers() & ~Qt.KeypadModifier
    key = event.key()
    ctrl = bool(mods & Qt.ControlModifier)
    if key == Qt.Key_Z and ctrl:
        return "undo"
    if key == Qt.Key_W and ctrl:
        return "end"
    if key in (Qt.Key_Return, Qt.Key_Enter):
        return "submit-order" if ctrl else "enter"
    named = {Qt.Key_Backspace: "backspace", Qt.Key_Escape: "escape", Qt.Key_F1: "help",
             Qt.Key_Space: " ", **SCROLL_KEYS}
    if key in named:
        return named[key]
    if mods & (Qt.ControlModifier | Qt.AltModifier | Qt.MetaModifier):
        return None
    text = event.text().lower()
    return text if len(text) == 1 and text.isprintable() else None


def _close_on_owner_thread(store: Store, owner: int) -> None:
    # A collector pass on a worker thread may run this; sqlite refuses a close from there,
    # and the connection then closes when it is itself collected.
    if threading.get_ident() == owner:
        store.close()


def _rank_simulated(project_dir: Path, batch_id: int, *, emit, cancelled) -> int:
    # On a worker thread: sqlite connections stay on the thread that opened them.
    with Store.for_project(project_dir) as store:
        return rank_batch(store, batch_id, DEFAULT_NAME, cancelled=cancelled,
                          progress=lambda done, total: emit((done, total)))


class RankingView(PreferenceFiles, QWidget):
    """Rank a batch's answers. `checkpoints` lists (name, folder) for the new-batch dialog
    (default: the project's sft, ppo and pretrain runs)."""

    sampleRequested = Signal(object)    # engine.sample.SampleConfig for the main window to run
    rankingSubmitted = Signal(int)      # the stored ranking's id

    def __init__(self, project_dir: Path, parent: QWidget | None = None, *,
                 checkpoints: Callable[[], list[tuple[str, Path]]] | None = None,
                 store: Store | None = None, guides=None):
        super().__init__(parent)
        self.project_dir = Path(project_dir)
        # An annotation pack (ui/pack_window.py) passes its own store and guidelines.
        self.store = store if store is not None else Store.for_project(self.project_dir)
        self.guides = guides if guides is not None else guidelines.ProjectGuidelines(self.project_dir)
        store = self.store
        # A view dropped without close_store() still closes its connection. Not through the
        # destroyed signal: a lambda on it fails in PySide when the wrapper is collected late.
        weakref.finalize(self, _close_on_owner_thread, store, threading.get_ident())
        self.checkpoints = checkpoints or (
            lambda: project_runs(self.project_dir, "checkpoint"))
        self.session: AnnotationSession | None = None
        self._reopened: int | None = None     # the ranking Re-rank withdrew, until its item is ranked
        self._status_for: int | None = None   # the batch the start page's status line is about
        self.current: Current | None = None
        self.simulating: Worker | None = None
        self.input = RankInput(2)
        self._shown_at = time.monotonic()     # when the item on screen was first shown
        self._guide_opened = self._shown_at
        self._pace = ""
        self.setFocusPolicy(Qt.StrongFocus)

        self.start = StartPage()
        self.guide = GuidelinesPage()
        self.page = SessionPage(self)
        self.page.note.done.connect(self.setFocus)  # Enter or Esc in the note returns to ranking
        self.stack = QStackedWidget()
        for w in (self.start, self.guide, self.page):
            self.stack.addWidget(w)
        self.agreement = AgreementView(self.store, self.project_dir)
        self.tabs = QTabWidget()
        self.tabs.setFocusPolicy(Qt.NoFocus)
        self.tabs.tabBar().setFocusPolicy(Qt.NoFocus)
        self.tabs.addTab(self.stack, "Rank")
        self.tabs.addTab(self.agreement, "Agreement")
        self.tabs.currentChanged.connect(self._tab_changed)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.tabs)

        self.start.startRequested.connect(self.start_selected)
        self.start.newBatchRequested.connect(self.new_batch)
        self.start.importRequested.connect(self.import_clicked)
        self.start.exportRequested.connect(self.export_clicked)
        self.start.guidelinesRequested.connect(self.show_guidelines)
        self.start.simulateRequested.connect(self.simulate_selected)
        self.start.packsRequested.connect(lambda: make_packs(self))
        self.start.mergeRequested.connect(lambda: merge_pack_files(self))
        self.start.selectionChanged.connect(self._selection_changed)
        self.guide.continueRequested.connect(self._guidelines_done)
        self.guide.saved.connect(self.set_guidelines)
        self.page.cards.reordered.connect(self._dragged)
        self.agreement.rerankRequested.connect(self.rerank)
        self._clock = QTimer(self, interval=1000)
        self._clock.timeout.connect(self._tick)
        self.refresh()

    # --- batches and sessions --------------------------------------------------------------------

    def refresh(self, select: int | None = None) -> None:
        """Reload batches, annotators and agreement figures from the store; `select` a batch
        (default: the one selected, else the one ranked last)."""
        recent = recent_session(self.store)
        names = [a.name for a in self.store.annotators() if not a.simulated]
        name = self.start.name() or (recent[0] if recent else getpass.getuser())
        if select is None and self.start.selected_batch() is None and recent:
            select = recent[1]
        self.start.populate(batch_progress(self.store), select)
        self.start.set_annotators(names, name)
        self._selection_changed()
        if self.tabs.currentIndex() == 1:    # else when the tab is opened: it reads every ranking
            self.agreement.refresh()

    def _status(self, batch_id: int, text: str) -> None:
        """A line on the start page about one batch: it goes when another batch is picked."""
        self._status_for = batch_id
        self.start.set_status(text)

    def _selection_changed(self) -> None:
        batch, name = self.start.selected_batch(), self.start.name()
        # (None: the list is being refilled, and its selection comes back)
        if self.simulating is None and batch is not None and self._status_for not in (None, batch):
            self._status_for = None
            self.start.set_status("")
        self.start.show_repeats(existing_session(self.store, batch, name)
                                if batch is not None and name else None)

    def start_selected(self) -> None:
        batch, name = self.start.selected_batch(), self.start.name()
        try:
            if self.start.batches.topLevelItemCount() == 0:
                raise ValueError("There is no batch to rank yet: make one with New batch… (answers "
                                 "sampled from a model), or import one.")
            if batch is None:
                raise ValueError("Pick a batch in the list first.")
            if not name:
                raise ValueError("Type your name first: your rankings are kept under it.")
            self.open_session(batch, name, self.start.repeats.value() / 100)
        except ValueError as e:     # also: a name taken by a simulated annotator
            show_error(self, "Start ranking", e)

    def open_session(self, batch_id: int, annotator: str,
                     repeat_fraction: float | None = None) -> AnnotationSession:
        """Start or resume `annotator`'s session on the batch; the guidelines come first when
        this annotator has not seen their current text for this batch. `repeat_fraction`
        applies to a new session only (a resumed one keeps its own)."""
        self._put_back()
        if existing_session(self.store, batch_id, annotator) is not None:
            repeat_fraction = None
        self.session = AnnotationSession(self.store, batch_id, annotator, kind="human",
                                         repeat_fraction=repeat_fraction)
        self.tabs.setCurrentIndex(0)
        self._load()
        if self.guides.needs_showing(annotator, batch_id):
            self.show_guidelines()
        else:
            self.stack.setCurrentWidget(self.page)
        self.setFocus()
        return self.session

    def _put_back(self) -> None:
        """A ranking Re-rank withdrew comes back if its item was left unranked."""
        put_back(self.store, self._reopened)
        self._reopened = None

    def end_session(self) -> None:
        self._put_back()
        self.session = self.current = None
        self._clock.stop()
        self.refresh()
        self.stack.setCurrentWidget(self.start)

    def import_sample_run(self, run_dir: Path) -> int:
        """Import a finished sample run as a batch and open a session on it (as the annotator
        named on the start page, when there is one). Returns the batch id."""
        batch_id = import_sample_run(self.store, Path(run_dir))
        self.refresh(select=batch_id)
        name = self.session.annotator.name if self.session else self.start.name()
        if name:
            self.open_session(batch_id, name, self.start.repeats.value() / 100)
        return batch_id

    def simulate_selected(self) -> None:
        """Rank the selected batch with the simulated annotator, after saying what it does."""
        batch_id = self.start.selected_batch()
        row = next((r for r in batch_progress(self.store) if r.batch.id == batch_id), None)
        if row is None:
            show_error(self, "Simulated ranking", ValueError("Pick a batch first."))
            return
        left = row.batch.n_items - row.ranked.get(DEFAULT_NAME, 0)
        if left <= 0:
            self._status(batch_id, f"The simulated annotator has ranked every item of {row.batch.name!r}.")
            return
        if QMessageBox.question(self, "Simulated ranking", (
                f"Rank the {left} item(s) of {row.batch.name!r} not yet ranked by the simulated "
                f"annotator {DEFAULT_NAME!r}?\n\nIt prefers {DEMO_PREFERENCE_TEXT}, and flags "
                "wrong answers to demo tasks. Its rankings are stored as simulated: exports and "
                "the reward model leave them out unless you include them.")) != QMessageBox.Yes:
            return
        self.rank_simulated(batch_id)

    def rank_simulated(self, batch_id: int) -> Worker:
        """Start the simulated annotator on the batch, off the UI thread; returns its worker."""
        self._stop_simulated()
        name = self.store.batch(batch_id).name
        self.start.simulate.setEnabled(False)
        self.start.set_status(f"Ranking {name!r} with the simulated annotator…")
        worker = self.simulating = Worker(_rank_simulated, self.project_dir, batch_id)
        worker.progress.connect(lambda p: self.start.set_status(
            f"Ranking {name!r} with the simulated annotator: {p[0]} of {p[1]} items…"))
        worker.finished.connect(lambda n: self._simulated_done(
            worker, batch_id, f"The simulated annotator ranked {n} item(s) of {name!r}."))
        worker.errored.connect(lambda text: self._simulated_done(
            worker, batch_id, f"⚠ Simulated ranking failed: {text}"))
        return worker.start()

    def _simulated_done(self, worker: Worker, batch_id: int, text: str) -> None:
        if worker is not self.simulating:
            return
        self.simulating = None
        self.start.simulate.setEnabled(True)
        self.refresh(select=batch_id)
        self._status(batch_id, text)

    def _stop_simulated(self) -> None:
        if self.simulating is not None:
            self.simulating.cancel()        # what it ranked so far stays: each chunk commits
            self.simulating.wait()
            self.simulating = None
            self.start.simulate.setEnabled(True)

    def new_batch(self) -> None:
        dialog = NewBatchDialog(self.project_dir, self.checkpoints, self)
        if dialog.exec():
            self.request_sample(dialog.config())

    def request_sample(self, config) -> None:
        self.sampleRequested.emit(config)

    def rerank(self, batch_id: int, item_id: int) -> None:
        """Open `item_id` for ranking again in the current annotator's session on its batch."""
        name = self.session.annotator.name if self.session else self.start.name()
        if not name:
            show_error(self, "Re-rank", ValueError("Type your name on the Rank tab first."))
            return
        if self.session is None or self.session.batch.id != batch_id or \
                self.session.annotator.name != name:
            self.open_session(batch_id, name)
        self._put_back()
        self._reopened = reopen_item(self.session, item_id)
        self._load()
        self.tabs.setCurrentIndex(0)
        if self.stack.currentWidget() is not self.guide:
            self.stack.setCurrentWidget(self.page)
        self.setFocus()

    # --- guidelines ------------------------------------------------------------------------------

    def show_guidelines(self) -> None:
        in_session = self.session is not None
        first = in_session and self.guides.needs_showing(self.session.annotator.name,
                                                         self.session.batch.id)
        heading = (f"Before you start: the guidelines for {self.session.batch.name!r}" if first
                   else "Ranking guidelines")
        self.guide.edit.setVisible(self.guides.editable)
        self.guide.show_text(self.guides.read(), heading,
                             "Start ranking" if first else ("Back to ranking" if in_session else "Back"))
        self.tabs.setCurrentIndex(0)
        self.stack.setCurrentWidget(self.guide)
        self._guide_opened = time.monotonic()
        self.setFocus()

    def set_guidelines(self, text: str) -> None:
        self.guides.write(text)

    def _guidelines_done(self) -> None:
        if self.session is None:
            self.stack.setCurrentWidget(self.start)
            return
        try:
            self.guides.mark_seen(self.session.annotator.name, self.session.batch.id)
        except OSError:
            pass        # the folder moved away: they show again next time, and ranking goes on
        self.stack.setCurrentWidget(self.page)
        self._shown_at += time.monotonic() - self._guide_opened   # reading them is not ranking
        self.setFocus()

    # --- the item on screen ----------------------------------------------------------------------

    def _load(self) -> None:
        cur = self.current = self.session.current()
        self._shown_at = time.monotonic()
        page = self.page
        page.title.setText(f"{self.session.batch.name}  ·  {self.session.annotator.name}")
        page.scroll.setVisible(cur is not None)
        page.done.setVisible(cur is None)
        if cur is None:
            p = self.session.progress()
            page.prompt.set_prompt("Every item is ranked.", None)
            checks = (f" ({p.repeats_total} of them a second time, unannounced, to measure how "
                      "consistent the rankings are)" if p.repeats_total else "")
            page.done.setText(f"All {p.total} items of this batch are ranked and stored{checks}.\n"
                              "Ctrl+Z undoes the last ranking; the Agreement tab shows how "
                              "consistent the rankings are; End session picks another batch.")
            page.cards.set_answers([])
            page.note.clear()
            self.input = RankInput(2)
        else:
            page.prompt.set_prompt(cur.prompt, cur.messages)
            page.cards.set_answers(cur.answers)
            self.input = RankInput(cur.k, [a.text for a in cur.answers])
            prev = cur.previous
            if prev is not None:
                self.input.prefill(prev.ordering, prev.flags, prev.scores)
            page.note.setText(prev.note if prev else "")
        # Once every item is ranked, only taking a ranking back, the guidelines and leaving remain.
        for w in (page.skip_button, page.order_button, page.note):
            w.setEnabled(cur is not None)
        legend = LEGEND if cur is not None else [(k, w) for k, w in LEGEND if k in ("Ctrl+Z", "F1")]
        page.legend.setText("  ·  ".join(f"<b>{escape(keys.format(k=cur.k if cur else 'K'))}"
                                         f"</b>&nbsp;{escape(what)}" for keys, what in legend))
        self._render()
        self._show_progress()
        self._clock.start()

    def _render(self, message: str = "", error: bool = False) -> None:
        page, inp = self.page, self.input
        rank, place = {}, 1
        for group in inp.ordering() or inp.groups:
            for n in group:
                rank[n] = ("= " if len(group) > 1 else "") + ordinal(place)
            place += len(group)
        for card in page.cards.cards:
            card.show_state(rank.get(card.number), inp.flags.get(card.number, set()),
                            inp.scores.get(card.number), inp.target == card.number)
            if inp.target == card.number:
                page.scroll.ensureWidgetVisible(card)    # a label is being given to it
        if self.current is None:
            page.ranking.setText("")
        elif inp.complete:
            page.ranking.setText(f"Ranking:  {inp.describe()}   — Enter submits")
        elif inp.groups:
            nth = ordinal(len(inp.placed) + 1)
            page.ranking.setText(f"Ranking:  {inp.describe()} {'=' if inp.tie else '>'} …   "
                                 f"— type the {'answer tied with it' if inp.tie else nth}")
        else:
            page.ranking.setText(f"Type the answers best first (1–{inp.k}), or drag the cards")
        page.submit_button.setEnabled(inp.complete and self.current is not None)
        text = inp.prompt() or message
        page.status.setText(("⚠ " if error and text else "") + text)

    def _show_progress(self) -> None:
        """The progress bar and pace from the store: after each change, not on every tick."""
        p = self.session.progress()
        self.page.bar.setRange(0, max(1, p.rankings_total))
        self.page.bar.setValue(p.rankings_done)
        text = p.ranked
        self.page.bar.setFormat(text)
        self.page.bar.setMinimumWidth(self.page.bar.fontMetrics().horizontalAdvance(text) + 24)
        self.page.bar.setToolTip(f"{p.total} items, and {p.repeats_total} of them shown a second "
                                 "time, unannounced, to measure how consistent the rankings are"
                                 if p.repeats_total else f"{p.total} items")
        parts = [f"{p.skipped} skipped"] if p.skipped else []
        if p.mean_seconds is not None:
            parts.append(f"{p.mean_seconds:.1f} s per item")
        self._pace = "  ·  ".join(parts)
        self._tick()

    def _tick(self) -> None:
        mine = (f"this item {time.monotonic() - self._shown_at:.0f} s"
                if self.current is not None else "")
        self.page.pace.setText("  ·  ".join(x for x in (self._pace, mine) if x))

    # --- actions ---------------------------------------------------------------------------------

    def submit(self) -> int | None:
        """Store the typed ranking with its labels and note, then show the next item."""
        ordering = self.input.ordering()
        if self.session is None or self.current is None or ordering is None:
            return None
        try:
            # The time on screen, not since the session object first fetched the item: the
            # guidelines may have stood in front of it.
            rid = self.session.submit(
                ordering, flags={n: sorted(f) for n, f in self.input.flags.items()},
                scores=self.input.scores, note=self.page.note.text().strip(),
                duration_s=round(max(0.0, time.monotonic() - self._shown_at), 3), shown=self.current)
        except MovedOn as e:
            self._load()
            self._render(str(e), error=True)
            return None
        except (RankingError, StoreError) as e:
            # A busy or full project database: the typed ranking stays, to submit again.
            self._render(str(e), error=True)
            return None
        self.rankingSubmitted.emit(rid)
        self._load()
        self._render("Saved." + (" Next item." if self.current is not None else ""))
        return rid

    def submit_card_order(self) -> int | None:
        if self.current is None:
            return None
        self.input.set_order(self.page.cards.order())
        return self.submit()

    def _dragged(self, order: list[int]) -> None:
        self.input.set_order(order, moved=self.page.cards.moved)
        # Copies of the dragged answer tie with it: their cards go beside it, so the cards read
        # as the ranking that will be stored.
        self.page.cards.arrange(self.input.placed)
        self._render("Ordered by dragging: Enter or Ctrl+Enter submits this order.")
        self.setFocus()

    def skip(self) -> None:
        if self.session is None or self.current is None:
            return
        try:
            self.session.skip(shown=self.current)
        except MovedOn as e:
            self._load()
            self._render(str(e), error=True)
            return
        except StoreError as e:
            self._render(str(e), error=True)
            return
        self._load()
        self._render("Skipped: the item comes back at the end.")

    def undo(self) -> None:
        if self.session is None:
            return
        try:
            undone = self.session.undo()
        except StoreError as e:
            self._render(str(e), error=True)
            return
        if undone is None:
            self._render("Nothing to undo in this session.", error=True)
            return
        self._load()
        self._render("Your last ranking is taken back: edit it and submit again (Enter).")
        if self.stack.currentWidget() is self.page:
            self.setFocus()

    # --- keys ------------------------------------------------------------------------------------

    def _session_keys(self) -> bool:
        return self.tabs.currentIndex() == 0 and self.stack.currentWidget() is self.page

    def event(self, event) -> bool:
        # Claim our keys before application shortcuts (an Edit menu's Ctrl+Z) see them.
        if event.type() == QEvent.ShortcutOverride and self._session_keys() \
                and key_token(event) is not None:
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event) -> None:
        token = key_token(event)
        if token is None or self.tabs.currentIndex() != 0:
            return super().keyPressEvent(event)
        page = self.stack.currentWidget()
        if page is self.start:
            # Enter in the name field or the batch list arrives here too: they pass it on.
            if token == "enter":
                self.start_selected()
            elif token == "help":
                self.show_guidelines()
            return
        if page is self.guide:
            if token in ("enter", "escape") and not self.guide.editing:
                self._guidelines_done()
            return
        self._session_key(token)

    def _session_key(self, token: str) -> None:
        if token in SCROLL_KEYS.values():
            bar = self.page.scroll.verticalScrollBar()
            step = bar.pageStep() if token.startswith("page") else bar.singleStep() * 3
            bar.setValue(bar.value() + (step if token in ("page-down", "down") else -step))
            return
        if token == "end":
            self.end_session()
            return
        if token == "submit-order":
            self.submit_card_order()
            return
        if token == "undo":
            self.undo()
            return
        if self.current is None:
            if token in ("u", "help", "?"):
                (self.undo if token == "u" else self.show_guidelines)()
            return
        outcome = self.input.press(token)
        actions = {"submit": self.submit, "skip": self.skip, "undo": self.undo,
                   "help": self.show_guidelines, "note": self.page.note.setFocus}
        if outcome.action in actions:
            actions[outcome.action]()
        else:
            self._render(outcome.message, outcome.error)

    # --- lifetime --------------------------------------------------------------------------------

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._session_keys():
            self.setFocus()     # shown mid-session (the main window switched to it): keys work

    def _tab_changed(self, index: int) -> None:
        if index == 1:
            self.agreement.refresh()
        else:
            if self.stack.currentWidget() is self.start:
                self.refresh()          # batches another process made meanwhile (the CLI, a job)
            self.setFocus()

    def _silence(self) -> None:
        # The pages' signals call this view's methods. When the garbage collector frees a
        # dropped view, its children are destroyed after its Python side, and a tree clearing
        # its selection would call into a view that is gone (PySide: "Slot not found").
        for w in self.findChildren(QObject):
            w.blockSignals(True)

    def closeEvent(self, event) -> None:
        self._silence()
        super().closeEvent(event)

    def close_store(self) -> None:
        """Stop the clock and any scoring worker and close the store. Every submitted ranking
        is already committed; this only releases the database."""
        self._silence()
        self._clock.stop()
        self._stop_simulated()
        self.agreement.shutdown()
        self._put_back()
        self.session = None
        self.store.close()
