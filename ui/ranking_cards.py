"""The prompt and the answer cards of the ranking view, and dragging cards into an order.

Cards are plain widgets in a vertical layout, not items of a QListWidget: item widgets do not
survive QListWidget's internal moves, and a drag done with press, move and release on the card
itself (no QDrag, whose nested event loop cannot be driven from a test) lets a test drag cards
with the same mouse events a person makes. The card follows the pointer through the list live,
so the order being made is always the order on screen.

Colours come from the palette (highlight, base, mid) or are translucent, so the cards read in
light and dark themes alike.
"""
from __future__ import annotations

from html import escape

from PySide6.QtCore import QPoint, Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QApplication, QFrame, QHBoxLayout, QLabel, QScrollArea,
                               QSizePolicy, QVBoxLayout, QWidget)

from ui.ranking_keys import FLAG_NAMES
from workbench.annotation import answer_copies

STYLE = """
QFrame#card { background: palette(base); border: 1px solid palette(mid); border-radius: 6px; }
QFrame#card[ranked="true"] { border: 2px solid palette(highlight); }
QFrame#card[targeted="true"] { border: 2px dashed palette(highlight); }
QFrame#card[dragging="true"] { background: palette(alternate-base); border: 2px solid palette(highlight); }
QLabel#number { color: palette(highlight); }
QLabel#badge { background: palette(highlight); color: palette(highlighted-text);
               border-radius: 4px; padding: 1px 8px; }
QLabel#flags { background: rgba(220, 60, 50, 45); border-radius: 4px; padding: 1px 6px; }
QLabel#score { background: rgba(60, 140, 220, 45); border-radius: 4px; padding: 1px 6px; }
QLabel#meta { color: palette(placeholder-text); }
"""


def ordinal(n: int) -> str:
    return {1: "best", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def scaled_font(widget: QWidget, factor: float, bold: bool = False) -> QFont:
    font = QFont(widget.font())
    font.setPointSizeF(font.pointSizeF() * factor)
    font.setBold(bold)
    return font


def _repolish(widget: QWidget) -> None:
    """Dynamic properties feed the style sheet only when the widget is polished again."""
    widget.style().unpolish(widget)
    widget.style().polish(widget)


class AnswerCard(QFrame):
    """One answer: its display number, the rank given to it, its flags and score, the text."""

    def __init__(self, number: int, text: str, meta: dict, cards: "CardList",
                 same_as: int | None = None):
        super().__init__()
        self.number, self._cards = number, cards
        self._press: QPoint | None = None
        self._dragging = False
        self.setObjectName("card")
        self.setCursor(Qt.OpenHandCursor)
        self.number_label = QLabel(str(number), objectName="number")
        self.number_label.setFont(scaled_font(self, 1.9, bold=True))
        self.number_label.setAlignment(Qt.AlignHCenter | Qt.AlignTop)
        self.number_label.setMinimumWidth(self.number_label.fontMetrics().horizontalAdvance("00"))
        self.badge = QLabel(objectName="badge")
        self.flags_label = QLabel(objectName="flags")
        self.score_label = QLabel(objectName="score")
        self.text_label = QLabel(text.rstrip() if text.strip() else "(empty answer)")
        self.text_label.setTextFormat(Qt.PlainText)
        self.text_label.setWordWrap(True)
        self.text_label.setFont(scaled_font(self, 1.1))
        self.text_label.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Minimum)
        if not text.strip():
            self.text_label.setEnabled(False)
        # An answer that never produced the end token was cut off: say so, since the cut is
        # easy to miss at the end of a long text and it matters for the ranking.
        cut = meta.get("finished") is False
        self.meta_label = QLabel(f"cut off after {meta.get('n_tokens', '?')} tokens" if cut else "",
                                 objectName="meta")
        self.meta_label.setVisible(cut)
        # A copy of an earlier card's text is ranked with it: say so, or a person hunts for a
        # difference between "6" and "6".
        self.same_label = QLabel(f"same answer as {same_as}" if same_as else "", objectName="meta")
        self.same_label.setVisible(same_as is not None)
        for w in (self.number_label, self.badge, self.flags_label, self.score_label,
                  self.text_label, self.meta_label, self.same_label):
            w.setAttribute(Qt.WA_TransparentForMouseEvents)   # the card handles the drag

        head = QHBoxLayout()
        head.setContentsMargins(0, 0, 0, 0)
        head.addWidget(self.badge)
        head.addWidget(self.flags_label)
        head.addWidget(self.score_label)
        head.addStretch(1)
        head.addWidget(self.same_label)
        head.addWidget(self.meta_label)
        body = QVBoxLayout()
        body.setSpacing(4)
        body.addLayout(head)
        body.addWidget(self.text_label)
        row = QHBoxLayout(self)
        row.setContentsMargins(10, 8, 12, 10)
        row.setSpacing(10)
        row.addWidget(self.number_label)
        row.addLayout(body, 1)
        self.show_state(None, set(), None, False)

    def show_state(self, rank: str | None, flags: set[str], score: int | None,
                   targeted: bool) -> None:
        self.badge.setText(rank or "")
        self.badge.setVisible(bool(rank))
        names = [FLAG_NAMES[f] for f in sorted(flags)]
        self.flags_label.setText("⚑ " + ", ".join(names) if names else "")
        self.flags_label.setVisible(bool(names))
        self.score_label.setText(f"score {score}/7" if score else "")
        self.score_label.setVisible(bool(score))
        self.setProperty("ranked", bool(rank))
        self.setProperty("targeted", targeted)
        _repolish(self)

    # --- dragging --------------------------------------------------------------------------------

    def mousePressEvent(self, event) -> None:
        if event.button() == Qt.LeftButton:
            self._press = event.position().toPoint()
            self._dragging = False
        event.accept()

    def mouseMoveEvent(self, event) -> None:
        if self._press is None:
            return
        pos = event.position().toPoint()
        if not self._dragging and (pos - self._press).manhattanLength() >= \
                QApplication.startDragDistance():
            self._dragging = True
            self.setCursor(Qt.ClosedHandCursor)
            self._cards.begin_drag(self)
        if self._dragging:
            self._cards.drag_to(self, self._cards.mapFromGlobal(event.globalPosition().toPoint()))

    def mouseReleaseEvent(self, event) -> None:
        if self._dragging:
            self.setCursor(Qt.OpenHandCursor)
            self._cards.end_drag(self)
        self._press, self._dragging = None, False


class CardList(QWidget):
    """The answer cards, top to bottom; dragging a card emits `reordered` with the new order."""

    reordered = Signal(list)          # display numbers, top (best) first

    def __init__(self, scroll: QScrollArea | None = None):
        super().__init__()
        self.scroll = scroll
        self.setStyleSheet(STYLE)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(2, 2, 2, 2)
        self._layout.setSpacing(8)
        self._layout.addStretch(1)
        self.cards: list[AnswerCard] = []
        self._before: list[int] = []
        self.moved: int | None = None       # the card the last drag moved

    def set_answers(self, answers) -> None:
        """Replace the cards with `answers` (ShownAnswer: number, text, meta) in display order."""
        for card in self.cards:
            self._layout.removeWidget(card)
            card.deleteLater()
        copies = answer_copies([a.text for a in answers])
        self.cards = [AnswerCard(a.number, a.text, a.meta, self,
                                 same_as=copies[a.number][0] if copies[a.number][0] != a.number else None)
                      for a in answers]
        for i, card in enumerate(self.cards):
            self._layout.insertWidget(i, card)

    def card(self, number: int) -> AnswerCard:
        return next(c for c in self.cards if c.number == number)

    def order(self) -> list[int]:
        return [c.number for c in self.cards]

    def arrange(self, numbers: list[int]) -> None:
        """Put the cards in this order (display numbers, top first)."""
        self.cards.sort(key=lambda c: numbers.index(c.number))
        for i, card in enumerate(self.cards):
            self._layout.removeWidget(card)
            self._layout.insertWidget(i, card)

    def begin_drag(self, card: AnswerCard) -> None:
        self._before = self.order()
        card.setProperty("dragging", True)
        _repolish(card)

    def drag_to(self, card: AnswerCard, pos: QPoint) -> None:
        """Move `card` to the place the pointer is at: before the first other card whose
        middle is below the pointer."""
        others = [c for c in self.cards if c is not card]
        index = sum(1 for c in others if c.geometry().center().y() < pos.y())
        if self.cards.index(card) != index:
            self.cards.remove(card)
            self.cards.insert(index, card)
            self._layout.removeWidget(card)
            self._layout.insertWidget(index, card)
            self._layout.activate()      # fresh geometry for the next move's comparison
        if self.scroll is not None:
            self.scroll.ensureVisible(pos.x(), pos.y(), 0, 40)

    def end_drag(self, card: AnswerCard) -> None:
        card.setProperty("dragging", False)
        _repolish(card)
        if self.order() != self._before:
            self.moved = card.number        # its copies follow it, wherever it went
            self.reordered.emit(self.order())


class PromptView(QScrollArea):
    """The prompt (or the turns of a multi-turn prompt), scrolling when it is long so the
    answers stay in view."""

    MAX_HEIGHT = 220

    def __init__(self):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.label.setFocusPolicy(Qt.NoFocus)
        self.label.setFont(scaled_font(self, 1.25, bold=True))
        self.label.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.setWidget(self.label)
        self.setFocusPolicy(Qt.NoFocus)
        # The window's own background, not the scroll area's: the prompt reads as a heading.
        self.viewport().setAutoFillBackground(False)
        self.label.setAutoFillBackground(False)

    def set_prompt(self, prompt: str, messages: list | None) -> None:
        """A plain prompt in bold; a conversation turn by turn, the last (the one the answers
        reply to) in bold and the earlier ones as context in normal weight."""
        if messages:
            turns = [f"<div style='white-space: pre-wrap; margin-bottom: 6px; font-weight: "
                     f"{700 if i == len(messages) - 1 else 400}'><i>{escape(m['role'])}:</i> "
                     f"{escape(m['content'])}</div>" for i, m in enumerate(messages)]
            self.label.setTextFormat(Qt.RichText)
            self.label.setText("".join(turns))
        else:
            self.label.setTextFormat(Qt.PlainText)
            self.label.setText(prompt)
        self._fit()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        width = max(100, self.viewport().width())
        needed = self.label.heightForWidth(width) + 4
        self.setFixedHeight(min(self.MAX_HEIGHT, max(needed, self.label.fontMetrics().height() + 8)))
