"""Chat with any checkpoint: a streamed transcript, sampling controls, plain completion mode.

The conversation lives in an engine ChatSession (the same template and context handling as
`workbench chat`); the view renders it. Replies run on a Worker thread and stream their text
deltas to the UI thread through queued signals, so the window stays responsive; Stop reaches
the session through its thread-safe stop().

Models come from a ModelCache (shared with compare mode when the main window passes one). The
session borrows its model for one reply at a time and lets go of it after, so switching the
checkpoint, or the cache evicting one, really frees the old weights. The widgets compare mode
uses too (checkpoint picker, prompt box, banner) are in ui/chat_widgets.py.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QEvent, QTimer, QUrl, Signal
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import (QCheckBox, QHBoxLayout, QLabel, QPlainTextEdit, QSplitter, QTextBrowser,
                               QVBoxLayout, QWidget)

from engine.chat import ChatSession, cut_note
from ui.chat_widgets import (EMPTY_ANSWER, Banner, Checkpoints, CheckpointPicker, PromptEdit, button,
                             error_text, input_row, tokens)
from ui.sampling_controls import SamplingControls
from ui.workers import Worker
from workbench import stages
from workbench.model_cache import ModelCache, Reply, describe, model_info, run_reply, short_name

RENDER_INTERVAL_MS = 40     # streamed text is drawn at most 25 times a second


# --- shared widgets ---------------------------------------------------------------------------

# --- the transcript -------------------------------------------------------------------------

@dataclass
class Entry:
    role: str                   # system, user, assistant, completion
    text: str
    edit: Optional[int] = None  # the index "edit" hands back, for messages that can be edited
    prompt: str = ""            # completion mode: the text that was continued
    streaming: bool = False
    by: str = ""                # an answer's model, said when the chat holds answers of several


def _mix(a: QColor, b: QColor, t: float) -> str:
    return QColor.fromRgbF(*(x + (y - x) * t for x, y in zip(a.getRgbF()[:3], b.getRgbF()[:3]))).name()


def _body(text: str) -> str:
    return html.escape(text, quote=False)


class Transcript(QTextBrowser):
    """The conversation as rich text in the palette's colours; "edit" links on user messages."""

    editRequested = Signal(int)
    NAMES = {"system": "System prompt", "user": "You", "assistant": "Assistant",
             "completion": "Completion"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self._entries: list[Entry] = []
        self._hint = ""

    def show_entries(self, entries: list[Entry], hint: str = "") -> None:
        self._entries, self._hint = entries, hint
        bar = self.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        keep = bar.value()
        self.setHtml(self._html())
        bar.setValue(bar.maximum() if at_end else keep)

    def changeEvent(self, e) -> None:
        super().changeEvent(e)
        if e.type() == QEvent.PaletteChange:
            self.show_entries(self._entries, self._hint)

    def _html(self) -> str:
        pal = self.palette()
        base, text = pal.color(QPalette.Base), pal.color(QPalette.Text)
        accent = pal.color(QPalette.Highlight)
        muted = _mix(text, base, 0.45)
        fills = {"user": _mix(base, accent, 0.16), "assistant": _mix(base, text, 0.06),
                 "system": base.name(), "completion": _mix(base, text, 0.06)}
        mark = _mix(base, accent, 0.35)
        if not self._entries:
            return f'<p style="color:{muted}">{_body(self._hint)}</p>'
        parts = []
        for e in self._entries:
            head = f'<b>{self.NAMES[e.role]}</b>' + (f" · {_body(e.by)}" if e.by else "")
            if e.edit is not None:
                head += f' &nbsp;<a href="edit:{e.edit}" style="color:{muted}">edit</a>'
            if e.role == "completion":
                body = f'{_body(e.prompt)}<span style="background-color:{mark}">{_body(e.text)}</span>'
            elif e.role == "system":
                body = f'<i>{_body(e.text)}</i>'
            elif not e.text.strip() and not e.streaming:
                body = f'<i style="color:{muted}">{EMPTY_ANSWER}</i>'
            else:
                body = _body(e.text)
            if e.streaming:
                body += f'<span style="color:{muted}">▍</span>'
            parts.append(
                f'<table width="100%" cellspacing="0" cellpadding="8" border="0" '
                f'bgcolor="{fills[e.role]}"><tr><td><span style="color:{muted}">{head}</span>'
                # pre-wrap: answers keep their indentation and line breaks (code, lists)
                f'<div style="white-space:pre-wrap">{body}</div></td></tr></table>'
                f'<p style="font-size:4pt">&nbsp;</p>')
        return "".join(parts)

    def _on_anchor(self, url: QUrl) -> None:
        kind, _, index = url.toString().partition(":")
        if kind == "edit" and index.isdigit():
            self.editRequested.emit(int(index))


# --- the view ---------------------------------------------------------------------------------

@dataclass
class _Pending:
    action: str                 # send, regenerate, complete
    text: str                   # the user message, or the text to complete
    replace: bool = False       # the answer replaces the last one (regenerate)
    # The turns on screen while it streams: the worker adds to the session's own list when the
    # answer is complete, a moment before the UI hears of it.
    turns: tuple = ()
    partial: str = ""
    started: float = 0.0
    n: int = 0


class ChatView(QWidget):
    """Chat (or plain completion) with one checkpoint at a time."""

    modelLoaded = Signal(dict)          # model_info of the checkpoint now selected
    replyFinished = Signal(object)      # Reply, once the view is ready for the next message
    errorShown = Signal(str)

    def __init__(self, project_dir: Path, checkpoints: Checkpoints,
                 cache: Optional[ModelCache] = None, parent=None):
        super().__init__(parent)
        self.project_dir = Path(project_dir)
        self.cache = cache if cache is not None else ModelCache()
        self.session = ChatSession(None, None)
        self.completions: list[tuple[str, str]] = []     # completion mode's (prompt, text)
        self.written_by: dict[int, str] = {}    # chat turn index -> the model that wrote that answer
        self._worker: Optional[Worker] = None
        self._pending: Optional[_Pending] = None
        self._editing: Optional[int] = None
        self._info: Optional[dict] = None
        self._loaded_once = False
        self._loading = False
        self._send_queued = False       # Enter pressed while the model was loading
        self._finished: Optional[Reply] = None

        self.picker = CheckpointPicker(checkpoints)
        self.completion = QCheckBox("Completion mode")
        self.completion.setToolTip("Continue plain text with no chat template: for base "
                                   "(pretrained) models, which have not learned the chat format.")
        self.transcript = Transcript()
        self.system = QPlainTextEdit()
        self.system.setTabChangesFocus(True)        # Tab moves on to the message box, as in a form
        self.system.setPlaceholderText("Optional: instructions the model sees before the conversation")
        self.system.setMaximumHeight(5 * self.system.fontMetrics().lineSpacing() + 14)
        self.sampling = SamplingControls()
        self.banner = Banner()
        self.input = PromptEdit("Message (Enter sends, Shift+Enter for a new line)")
        self.send_button = button("Send", "Send the message (Enter)")
        self.stop_button = button("Stop", "Stop the answer (Esc); the text so far stays")
        self.regen_button = button("Regenerate", "A new answer to the last message, replacing this one")
        self.clear_button = button("Clear", "Forget the conversation (the system prompt stays)")
        self.model_label = QLabel()
        # Wrapped: a long description (a base model's advice) must not widen the window past
        # the screen and push Send and the settings out of reach.
        self.model_label.setWordWrap(True)
        self.stats = QLabel()
        for label in (self.model_label, self.stats):
            label.setForegroundRole(QPalette.PlaceholderText)
        self._layout()

        self._render_timer = QTimer(self, singleShot=True, interval=RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render)
        self.picker.pathChanged.connect(self._on_checkpoint)
        self.completion.toggled.connect(self._on_mode)
        self.system.textChanged.connect(self._render)
        self.transcript.editRequested.connect(self.edit_message)
        self.input.submitted.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.regen_button.clicked.connect(self.regenerate)
        self.clear_button.clicked.connect(self.clear)
        self.banner.closed.connect(self._on_banner_closed)
        self.input.escaped.connect(self._on_escape)
        self._update()
        self._render()

    def _layout(self) -> None:
        top = QHBoxLayout()
        top.addWidget(QLabel("Checkpoint"))
        top.addWidget(self.picker, 1)
        top.addWidget(self.completion)

        side = QWidget()
        col = QVBoxLayout(side)
        col.setContentsMargins(8, 0, 0, 0)
        for w in (QLabel("<b>System prompt</b>"), self.system, QLabel("<b>Sampling</b>"), self.sampling):
            col.addWidget(w)
        col.insertSpacing(2, 10)
        col.addStretch(1)
        split = QSplitter()
        split.addWidget(self.transcript)
        split.addWidget(side)
        split.setStretchFactor(0, 1)
        split.setCollapsible(0, False)
        split.setSizes([800, 280])

        bottom = QHBoxLayout()
        bottom.addWidget(self.regen_button)
        bottom.addWidget(self.clear_button)
        bottom.addSpacing(12)
        bottom.addWidget(self.model_label, 1)
        bottom.addWidget(self.stats)

        outer = QVBoxLayout(self)
        outer.addLayout(top)
        outer.addWidget(split, 1)
        outer.addWidget(self.banner)
        outer.addLayout(input_row(self.input, self.send_button, self.stop_button))
        outer.addLayout(bottom)

    # --- public API ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._worker is not None

    @property
    def partial_text(self) -> str:
        """The answer streaming now ("" when none is)."""
        return self._pending.partial if self._pending else ""

    def refresh(self) -> None:
        self.picker.refresh()

    def load(self) -> None:
        """Load the selected checkpoint now (replies load it anyway): shows what it is, or why
        it cannot be used, before the first message."""
        path = self.picker.path()
        if path is None or self.busy:
            return
        self._loaded_once = self._loading = True
        self.model_label.setText(f"Loading {short_name(path)}…")
        self._start(Worker(lambda emit, cancelled: model_info(self.cache.get(path))),
                    self._show_info)

    def send(self) -> None:
        text = self.input.toPlainText()
        if self._loading and text.strip():
            self._send_queued = True
            return
        if self.busy or not text.strip() or self.picker.path() is None:
            return
        if self.completion.isChecked():
            if self._editing is not None:
                del self.completions[self._editing:]
            self._reply("complete", text)
        else:
            if self._editing is not None:
                self.session.truncate(self._editing)
                self.written_by = {i: m for i, m in self.written_by.items() if i < self._editing}
            self.session.set_system(self.system.toPlainText().strip() or None)
            self._reply("send", text)
        self.input.clear()
        self._end_edit()

    def regenerate(self) -> None:
        if self.busy:
            return
        if self.completion.isChecked():
            if self.completions:
                self._reply("complete", self.completions[-1][0], replace=True)
        elif self.session.can_regenerate:
            self.session.set_system(self.system.toPlainText().strip() or None)
            self._reply("regenerate", "", replace=True)

    def stop(self) -> None:
        if self._pending is not None and self._worker is not None:
            self._worker.cancel()
            self.session.stop()

    def clear(self) -> None:
        if self.busy:
            return
        completion = self.completion.isChecked()
        if completion:
            kept, n, what = list(self.completions), len(self.completions), "completion"
            self.completions.clear()
        else:
            kept, n, what = (self._turns(), dict(self.written_by)), len(self._turns()), "message"
            self.session.reset()
            self.written_by = {}
        self._end_edit()
        self.stats.clear()
        self._render()
        self._update()
        if n:
            # No question before a Clear; a way back after it, until the next one is sent.
            self.banner.show_message(f"Cleared {n} {what}{'s' * (n != 1)}.", "info",
                                     ("Undo", lambda: self._undo_clear(completion, kept)))

    def _undo_clear(self, completion: bool, kept) -> None:
        if self.busy or (self.completions if completion else self._turns()):
            return          # something new was said since: it is not overwritten
        if completion:
            self.completions[:] = kept
        else:
            self.session.restore(kept[0])
            self.written_by = kept[1]
        self._render()
        self._update()

    def edit_message(self, index: int) -> None:
        """Put message `index` (a user turn, or a completion's prompt) back in the input box;
        sending replaces it and drops everything after it."""
        if self.busy:
            return
        text = self.completions[index][0] if self.completion.isChecked() else self._turns()[index]["content"]
        self._editing = index
        self.input.setPlainText(text)
        self.input.setFocus()
        self.banner.show_message("Editing a message: Send replaces it and everything after it. "
                                 "Esc or ✕ cancels.", "info")
        self._render()

    def shutdown(self) -> None:
        """Stop the reply in progress and wait for the worker thread to end."""
        worker = self._worker
        if worker is not None:
            self.stop()
            worker.wait()

    # --- replies -------------------------------------------------------------------------
    def _reply(self, action: str, text: str, replace: bool = False) -> None:
        self.session.settings = self.sampling.settings()
        turns = self._turns()
        if replace and action == "regenerate":
            turns = turns[:-1]  # the answer being replaced goes; the new one streams in its place
        self._pending = _Pending(action, text, replace, tuple(turns), started=time.perf_counter())
        worker = Worker(run_reply, self.session, self.cache, self.picker.path(), action, text)
        worker.progress.connect(self._on_token)
        if self.banner.kind == "error" or not self.banner.action.isHidden():
            self.banner.dismiss()
        self._start(worker, self._on_reply)
        self._render()

    def _start(self, worker: Worker, on_result) -> None:
        self._worker = worker
        worker.finished.connect(on_result)
        worker.errored.connect(self._on_error)
        worker.done.connect(self._on_done)
        worker.start()
        self._update()

    def _on_token(self, delta: str) -> None:
        if self._pending is None:
            return
        self._pending.partial += delta
        self._pending.n += 1
        dt = time.perf_counter() - self._pending.started
        self.stats.setText(f"{tokens(self._pending.n)} · {self._pending.n / max(dt, 1e-6):.1f} tokens/s")
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _on_reply(self, reply: Optional[Reply]) -> None:
        pending, self._pending = self._pending, None
        if reply is None:
            self.stats.setText("stopped before it began")
            return
        if pending is not None and pending.action == "complete":
            if pending.replace:
                self.completions[-1] = (pending.text, reply.text)
            else:
                self.completions.append((pending.text, reply.text))
        self._show_info(reply.info)
        rate = reply.n_tokens / reply.seconds if reply.seconds > 0 else 0.0
        notes = [tokens(reply.n_tokens), f"{rate:.1f} tokens/s"]
        if reply.stopped:
            notes.append("stopped")
        elif reply.cut:
            notes.append(cut_note(reply.cut, reply.info["context"]))
        if pending is not None and pending.action != "complete" and reply.dropped_turns:
            notes.append(f"{reply.dropped_turns} oldest turn(s) left out: context full")
        self.stats.setText(" · ".join(notes))
        if pending is not None and pending.action != "complete":
            self.written_by[len(self._turns()) - 1] = short_name(reply.info["checkpoint"])
        self._finished = reply

    def _show_info(self, info: dict) -> None:
        self._info = info
        text = describe(info)
        if info["stage"] in stages.NAMES and not stages.fine_tunes(info["stage"]) and not self.completion.isChecked():
            text += " — a base model: completion mode suits it better"
        self.model_label.setText(text)
        self.model_label.setToolTip(info["checkpoint"])
        self.modelLoaded.emit(info)

    def _on_error(self, text: str) -> None:
        self._pending = None
        self._send_queued = False
        text = error_text(text)
        self.banner.show_message(text, "error")
        if self.model_label.text().startswith("Loading"):
            self.model_label.setText("")
        self.errorShown.emit(text)

    def _on_done(self) -> None:
        self._worker = None
        self._loading = False
        self._render()
        self._update()
        # Announced only now that the view is idle, so a listener may send the next message.
        reply, self._finished = self._finished, None
        if reply is not None:
            self.replyFinished.emit(reply)
        if self._send_queued:
            self._send_queued = False
            self.send()

    # --- state -> widgets ------------------------------------------------------------------
    def _on_checkpoint(self, path: Optional[Path]) -> None:
        self._info = None
        self.model_label.setText("")
        self.stats.clear()      # the last reply's speed was the other model's
        if path is not None and self._loaded_once:
            self.load()
        self._update()

    def _on_mode(self) -> None:
        self._end_edit()
        self.stats.clear()
        if self._info is not None:
            self._show_info(self._info)
        # Each mode keeps its own transcript; the one being hidden would look wiped without a word.
        completion = self.completion.isChecked()
        hidden = len(self._turns()) if completion else len(self.completions)
        if hidden:
            what = (f"Your chat ({hidden} message{'s' * (hidden != 1)}) is kept: untick Completion "
                    "mode to go back to it." if completion else
                    f"Your completions ({hidden}) are kept: tick Completion mode to see them again.")
            self.banner.show_message(what, "info")
        elif self.banner.kind == "info":
            self.banner.dismiss()
        self._render()
        self._update()

    def _on_escape(self) -> None:
        if self.busy:
            self.stop()
        else:
            self.banner.dismiss()

    def _on_banner_closed(self) -> None:
        if self._editing is not None:
            self._end_edit()
            self.input.clear()

    def _end_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            if self.banner.kind == "info":
                self.banner.dismiss()
            self._render()

    def showEvent(self, e) -> None:
        super().showEvent(e)
        if not self._loaded_once:
            self.load()

    def _turns(self) -> list[dict]:
        return self.session.messages[bool(self.session.system_prompt):]

    def _update(self) -> None:
        busy, have = self.busy, self.picker.path() is not None
        completion = self.completion.isChecked()
        self.send_button.setEnabled(not busy and have)
        self.stop_button.setEnabled(self._pending is not None)
        self.regen_button.setEnabled(not busy and have and (
            bool(self.completions) if completion else self.session.can_regenerate))
        self.clear_button.setEnabled(not busy)
        for w in (self.picker, self.completion):
            w.setEnabled(not busy)
        self.system.setEnabled(not completion)

    def _render(self) -> None:
        self._render_timer.stop()
        p, editable = self._pending, not self.busy
        entries: list[Entry] = []
        if self.completion.isChecked():
            done = self.completions[:-1] if p is not None and p.replace else self.completions
            entries = [Entry("completion", t, i if editable else None, prompt=pr)
                       for i, (pr, t) in enumerate(done)]
            if p is not None:
                entries.append(Entry("completion", p.partial, prompt=p.text, streaming=True))
            hint = "Type text for the model to continue (no chat template), then Enter."
        else:
            system = self.system.toPlainText().strip()
            if system:
                entries.append(Entry("system", system))
            turns = list(p.turns) if p is not None else self._turns()
            if self._editing is not None:
                turns = turns[:self._editing]
            # Which model wrote each answer, once answers of two or more are in the chat.
            by = self.written_by if len(set(self.written_by.values())) > 1 else {}
            entries += [Entry(m["role"], m["content"],
                              i if editable and m["role"] == "user" else None, by=by.get(i, ""))
                        for i, m in enumerate(turns)]
            if p is not None:
                if p.action == "send":
                    entries.append(Entry("user", p.text))
                entries.append(Entry("assistant", p.partial, streaming=True))
            hint = "Send a message to start. Enter sends, Shift+Enter starts a new line."
        self.transcript.show_entries(entries, hint)
