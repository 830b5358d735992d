"""Compare mode: one prompt, two checkpoints answering side by side, and a vote that is kept.

Both answers stream at once, each from its own Worker: the user reads them as they grow at
the same pace, and neither side gets the advantage of being read first while the other is
still waiting. (On a small CPU the two share the cores, so each runs at about half speed; the
total time is the same as one after the other.)

Blind mode (on by default, since it is what makes a vote usable as preference data) labels the
panes "A" and "B" and puts the two models on a random side for every prompt; the names appear
after the vote. A vote is stored at once in the project's annotation store (see
workbench.comparisons), where the reward model's dataset and the preference exports find it.
"""
from __future__ import annotations

import getpass
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QPalette, QShortcut, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QFrame, QGridLayout, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QSplitter, QVBoxLayout, QWidget)

from engine.chat import ChatSession
from ui.chat_widgets import (EMPTY_ANSWER, Banner, Checkpoints, CheckpointPicker, PromptEdit, button,
                             error_text, input_row, tokens)
from ui.sampling_controls import SamplingControls
from ui.workers import Worker
from workbench import comparisons
from workbench.model_cache import ModelCache, Reply, run_reply, short_name
from workbench.store import DB_NAME, Store, StoreError

SIDES = ("left", "right")
# The vote keys: Alt, because the main window's View menu owns Ctrl+1..9 and Ctrl+0 (two shortcuts on one
# key fire neither), and plain keys would type into the prompt box, where the focus is after
# sending. (button text, key)
VOTES = {"left": ("◀  Left is better", "Alt+1"), "tie": ("Tie", "Alt+2"),
         "right": ("Right is better  ▶", "Alt+3")}


class AnswerPane(QFrame):
    """One side: a title, what is known about its model, the streaming answer, its numbers."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QFrame.StyledPanel)
        self.title = QLabel()
        font = self.title.font()
        font.setPointSizeF(font.pointSizeF() * 1.25)
        font.setBold(True)
        self.title.setFont(font)
        self.subtitle = QLabel()
        self.subtitle.setForegroundRole(QPalette.PlaceholderText)
        self.subtitle.setWordWrap(True)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setFrameShape(QFrame.NoFrame)
        self.stats = QLabel()
        self.stats.setForegroundRole(QPalette.PlaceholderText)
        col = QVBoxLayout(self)
        col.addWidget(self.title)
        col.addWidget(self.subtitle)
        col.addWidget(self.text, 1)
        col.addWidget(self.stats)

    def reset(self, title: str, subtitle: str) -> None:
        self.title.setText(title)
        self.subtitle.setText(subtitle)
        self.text.clear()
        self.text.setPlaceholderText("")
        self.stats.clear()

    def append(self, delta: str) -> None:
        bar = self.text.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        cursor = QTextCursor(self.text.document())
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(delta)
        if at_end:
            bar.setValue(bar.maximum())

    def answer(self) -> str:
        return self.text.toPlainText()


@dataclass
class _Run:
    """One side of the current round."""
    model: str                  # "Model 1" or "Model 2": which picker it came from
    path: Path
    label: str
    session: ChatSession
    worker: Optional[Worker] = None
    reply: Optional[Reply] = None
    error: str = ""


@dataclass
class _Round:
    prompt: str
    system: Optional[str]
    settings: dict
    blind: bool
    runs: dict                  # side -> _Run
    finished_at: Optional[float] = None
    verdict: Optional[str] = None


class CompareView(QWidget):
    """Two checkpoints, one prompt, a blind vote stored as a preference pair."""

    roundFinished = Signal()            # both answers are in (or failed)
    voteStored = Signal(object)         # comparisons.Stored
    errorShown = Signal(str)

    def __init__(self, project_dir: Path, checkpoints: Checkpoints,
                 cache: Optional[ModelCache] = None, parent=None):
        super().__init__(parent)
        self.project_dir = Path(project_dir)
        self.cache = cache if cache is not None else ModelCache()
        self.rng = random.Random()
        self.round: Optional[_Round] = None

        # Two different models from the start: the newest and the one before it.
        self.pickers = (CheckpointPicker(checkpoints), CheckpointPicker(checkpoints, default_index=1))
        self.blind = QCheckBox("Blind")
        self.blind.setChecked(True)
        self.blind.setToolTip("Hide which model wrote which answer, and put them on random sides, "
                              "until you have voted")
        self.annotator = QLineEdit(_user_name())
        self.annotator.setToolTip("Your name in the annotation store: votes are kept as yours")
        self.annotator.setMaximumWidth(160)
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (optional)")
        self.sampling = SamplingControls(columns=4)
        self.panes = {side: AnswerPane() for side in SIDES}
        self.vote_buttons = {verdict: button(f"{text}   {key}", f"Store this judgement ({key})")
                             for verdict, (text, key) in VOTES.items()}
        for verdict, b in self.vote_buttons.items():
            b.clicked.connect(lambda _=False, v=verdict: self.vote(v))
            QShortcut(QKeySequence(VOTES[verdict][1]), self, lambda v=verdict: self.vote(v),
                      context=Qt.WidgetWithChildrenShortcut)
        self.legend = QLabel("  ·  ".join(f"<b>{key}</b>&nbsp;{text.strip('◀▶ ').lower()}"
                                          for text, key in VOTES.values())
                             + "  ·  <b>Enter</b>&nbsp;sends  ·  <b>Esc</b>&nbsp;stops")
        self.legend.setForegroundRole(QPalette.PlaceholderText)
        self.status = QLabel("Ask both models the same question, then say which answer is better.")
        self.status.setForegroundRole(QPalette.PlaceholderText)
        self.status.setWordWrap(True)       # a long status wraps rather than widen the window
        self.banner = Banner()
        self.input = PromptEdit("Prompt for both models (Enter sends, Shift+Enter for a new line)")
        self.send_button = button("Send", "Ask both models (Enter)")
        self.stop_button = button("Stop", "Stop both answers (Esc)")
        self._layout()

        self.input.submitted.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        for picker in self.pickers:
            picker.pathChanged.connect(self._on_models_changed)
        self.input.escaped.connect(self.stop)
        self._clear_panes()
        self._update()

    def _clear_panes(self) -> None:
        for side in SIDES:
            self.panes[side].reset("Left" if side == "left" else "Right", "")

    def _layout(self) -> None:
        models = QGridLayout()
        for i, picker in enumerate(self.pickers):
            models.addWidget(QLabel(f"Model {i + 1}"), 0, 2 * i)
            models.addWidget(picker, 0, 2 * i + 1)
            models.setColumnStretch(2 * i + 1, 1)
        models.addWidget(self.blind, 0, 4)
        models.addWidget(QLabel("Annotator"), 0, 5)
        models.addWidget(self.annotator, 0, 6)

        split = QSplitter()
        for side in SIDES:
            split.addWidget(self.panes[side])
            split.setCollapsible(split.count() - 1, False)

        votes = QHBoxLayout()
        votes.addWidget(self.status, 1)
        for b in self.vote_buttons.values():
            votes.addWidget(b)

        outer = QVBoxLayout(self)
        outer.addLayout(models)
        outer.addWidget(self.sampling)
        outer.addWidget(self.system)
        outer.addWidget(split, 1)
        outer.addLayout(votes)
        outer.addWidget(self.banner)
        outer.addLayout(input_row(self.input, self.send_button, self.stop_button))
        outer.addWidget(self.legend)

    # --- public API ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.round is not None and any(r.worker is not None for r in self.round.runs.values())

    @property
    def can_vote(self) -> bool:
        r = self.round
        return (r is not None and not self.busy and r.verdict is None
                and all(run.reply is not None for run in r.runs.values()))

    @property
    def identical(self) -> bool:
        """Both answers are in and are one text."""
        r = self.round
        return (r is not None and all(run.reply is not None for run in r.runs.values())
                and len({run.reply.text for run in r.runs.values()}) == 1)

    def refresh(self) -> None:
        for picker in self.pickers:
            picker.refresh()

    def showEvent(self, event) -> None:
        # Votes go under the name the person last ranked as on the Rank page, unless they typed
        # one here (their login name stood in, and a vote was kept as someone else's).
        if not self.annotator.isModified():
            name = _recent_annotator(self.project_dir)
            if name:
                self.annotator.setText(name)
        super().showEvent(event)

    def send(self) -> None:
        prompt = self.input.toPlainText().strip()
        paths = [p.path() for p in self.pickers]
        if self.busy or not prompt:
            return
        if None in paths:
            self._error("Pick a checkpoint for both models first.")
            return
        blind = self.blind.isChecked()
        system = self.system.text().strip() or None
        runs = [_Run(f"Model {i + 1}", paths[i], self.pickers[i].label(),
                     ChatSession(None, None, system_prompt=system, settings=self.sampling.settings()))
                for i in range(2)]
        if blind and self.rng.random() < 0.5:
            runs.reverse()
        self.round = _Round(prompt, system, asdict(self.sampling.settings()), blind,
                            dict(zip(SIDES, runs)))
        for side, letter in zip(SIDES, "AB"):
            run = self.round.runs[side]
            if blind:
                self.panes[side].reset(letter, "which model this is stays hidden until you vote")
            else:
                self.panes[side].reset(run.label, run.model)
            run.worker = Worker(run_reply, run.session, self.cache, run.path, "send", prompt)
            run.worker.progress.connect(self.panes[side].append)
            run.worker.finished.connect(lambda reply, s=side: self._on_reply(s, reply))
            run.worker.errored.connect(lambda text, s=side: self._on_error(s, text))
            run.worker.done.connect(lambda s=side: self._on_done(s))
        if self.banner.kind == "error":
            self.banner.dismiss()
        self.status.setText("Both models are answering…")
        for run in runs:
            run.worker.start()
        self._update()

    def stop(self) -> None:
        if self.round is None:
            return
        for run in self.round.runs.values():
            if run.worker is not None:
                run.worker.cancel()
                run.session.stop()

    def vote(self, verdict: str) -> None:
        """Store the judgement ("left", "right" or "tie") and reveal the models."""
        if not self.can_vote:
            return
        r = self.round
        name = self.annotator.text().strip()
        if not name:
            self._error("Enter your name as the annotator first: votes are stored as yours.")
            return
        left, right = (self._side(s) for s in SIDES)
        waited = time.monotonic() - r.finished_at if r.finished_at is not None else None
        try:
            with Store.for_project(self.project_dir) as store:
                stored = comparisons.record(store, r.prompt, left, right, verdict, annotator=name,
                                            blind=r.blind, system_prompt=r.system,
                                            settings=r.settings, duration_s=waited)
                tally = comparisons.tally(store, left.checkpoint, right.checkpoint)
        except Exception as e:  # noqa: BLE001 - a vote that cannot be kept is said so in the view
            self._error(f"The vote was not stored: {e}")
            return
        r.verdict = verdict
        for side, letter in zip(SIDES, "AB"):
            run = r.runs[side]
            if r.blind:
                self.panes[side].title.setText(f"{letter}: {run.label}")
            self.panes[side].subtitle.setText(f"{run.model} · {run.path}")
        said = {"left": "left is better", "right": "right is better", "tie": "a tie"}[verdict]
        # By model, not by side: a blind round puts each model on either side.
        names = (short_name(r.runs["left"].path), short_name(r.runs["right"].path))
        score = (f"{names[0]} {tally.wins[0]} · {names[1]} {tally.wins[1]} · tie {tally.ties}"
                 if left.checkpoint != right.checkpoint else f"{tally.votes} vote(s), one model against itself")
        self.status.setText(f"Stored: {said}. These two so far: {score} "
                            f"({tally.total} comparison(s) in the store).")
        if self.banner.kind == "error":
            self.banner.dismiss()          # an earlier refusal no longer holds
        self.input.selectAll()
        self.input.setFocus()
        self._update()
        self.voteStored.emit(stored)

    def shutdown(self) -> None:
        """Stop both answers and wait for their threads to end."""
        if self.round is None:
            return
        self.stop()
        for run in self.round.runs.values():
            if run.worker is not None:
                run.worker.wait()

    # --- the round -----------------------------------------------------------------------
    def _side(self, side: str) -> comparisons.Side:
        run = self.round.runs[side]
        reply = run.reply
        return comparisons.Side(reply.text, reply.info["checkpoint"], run.label, {
            "model": run.model, "n_tokens": reply.n_tokens, "seed": reply.seed,
            "stopped": reply.stopped})

    def _on_reply(self, side: str, reply: Optional[Reply]) -> None:
        run = self.round.runs[side]
        if reply is None:
            run.error = "stopped before it began"
            self.panes[side].stats.setText(run.error)
            return
        run.reply = reply
        if not reply.text.strip():
            self.panes[side].text.setPlaceholderText(EMPTY_ANSWER)
        rate = reply.n_tokens / reply.seconds if reply.seconds > 0 else 0.0
        self.panes[side].stats.setText(f"{tokens(reply.n_tokens)} · {rate:.1f} tokens/s"
                                       + (" · stopped" if reply.stopped else ""))

    def _on_error(self, side: str, text: str) -> None:
        run = self.round.runs[side]
        run.error = error_text(text)
        self.panes[side].stats.setText("failed")
        who = dict(zip(SIDES, "AB"))[side] if self.round.blind else run.label
        self._error(f"{who}: {run.error}")

    def _on_done(self, side: str) -> None:
        self.round.runs[side].worker = None
        if not self.busy:
            self.round.finished_at = time.monotonic()
            if self.can_vote and self.identical:
                self.status.setText("The two answers are identical: only a tie can be stored.")
            elif self.can_vote:
                self.status.setText("Which answer is better?")
            else:
                self.status.setText("No vote this time: an answer is missing. Send again.")
            self.roundFinished.emit()
        self._update()

    def _on_models_changed(self, *_) -> None:
        """Other models picked: the last round's answers, named after the models before, go
        (in a blind round they would even name two models that are no longer the pair)."""
        if self.round is not None and not self.busy:
            self.round = None
            self._clear_panes()
            self.status.setText("Send a prompt to compare these two models.")
        self._update()

    def _error(self, text: str) -> None:
        self.banner.show_message(text, "error")
        self.errorShown.emit(text)

    def _update(self) -> None:
        busy = self.busy
        both = all(p.path() is not None for p in self.pickers)
        self.send_button.setEnabled(not busy and both)
        self.stop_button.setEnabled(busy)
        for verdict, b in self.vote_buttons.items():
            # Two identical answers can only be a tie (comparisons.record refuses the rest).
            b.setEnabled(self.can_vote and (verdict == "tie" or not self.identical))
        for w in (*self.pickers, self.blind, self.sampling, self.system):
            w.setEnabled(not busy)


def _recent_annotator(project_dir: Path) -> str | None:
    """Who ranked last in this project (a person), to vote under the same name."""
    if not (project_dir / DB_NAME).exists():
        return None
    try:
        with Store.for_project(project_dir) as store:
            recent = store.recent_session("human")
    except StoreError:
        return None
    return recent[0] if recent else None


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (some containers): the user types one
        return ""
