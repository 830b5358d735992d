"""Widgets the chat and compare views share: the checkpoint picker, the prompt box, the error
banner, and small helpers for buttons and counts."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QLabel, QPlainTextEdit,
                               QPushButton, QStyle, QToolButton, QVBoxLayout, QWidget)

from ui import file_dialogs
from workbench.model_cache import short_name

Checkpoints = Callable[[], "list[tuple[str, Path]]"]
BROWSE = "Browse…"


def button(text: str, tip: str) -> QPushButton:
    b = QPushButton(text)
    b.setToolTip(tip)
    return b


def input_row(edit: QWidget, send: QPushButton, stop: QPushButton) -> QHBoxLayout:
    """The prompt box with Send and Stop stacked at its right."""
    col = QVBoxLayout()
    col.addWidget(send)
    col.addWidget(stop)
    col.addStretch(1)
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    row.addLayout(col)
    return row


def tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


# What an answer the model ended at once shows, in Chat and Compare: a blank box looks broken.
EMPTY_ANSWER = "(empty answer: the model ended it at once)"


def error_text(text: str) -> str:
    """The Worker's 'Type: message' without the type where the message is written for users."""
    for prefix in ("ModelCacheError: ", "OutOfMemory: ", "ConfigError: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class CheckpointPicker(QComboBox):
    """The project's checkpoints, plus any folder the user browses to (imported checkpoints).

    Until the user picks one, it follows the list: the entry at `default_index` (the newest
    fine-tuned model first, as the project lists them), so a model trained since the page was
    built is the one offered."""

    pathChanged = Signal(object)       # Path, or None when there is nothing to pick

    def __init__(self, checkpoints: Checkpoints, parent=None, default_index: int = 0):
        super().__init__(parent)
        self._checkpoints = checkpoints
        self._browsed: list[tuple[str, Path]] = []
        self._current: Optional[Path] = None
        self._chosen = False            # the user picked the current entry
        self.default_index = default_index
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(24)
        self.setToolTip("A checkpoint or run folder (a run uses its best checkpoint, else its newest)")
        self.setPlaceholderText("Choose a checkpoint…")
        self.activated.connect(self._on_activated)
        self.refresh()

    def path(self) -> Optional[Path]:
        return self._current

    def label(self) -> str:
        return self.currentText() if self._current is not None else ""

    def refresh(self) -> None:
        """Re-read the choices, keeping the user's choice when it is still offered."""
        keep = self._current if self._chosen else None
        self.blockSignals(True)
        self.clear()
        for label, path in [*self._checkpoints(), *self._browsed]:
            self.addItem(label, str(path))
        self.addItem(BROWSE, None)
        self.blockSignals(False)
        i = self.findData(str(keep)) if keep is not None else -1
        if i < 0:
            self._chosen = False
            choices = self.count() - 1
            i = min(self.default_index, choices - 1) if choices else -1
        self.select_index(i)

    def set_path(self, path: Path, label: Optional[str] = None) -> None:
        """Select `path`, adding it as a browsed choice if it is not offered."""
        self._chosen = True
        i = self.findData(str(path))
        if i < 0:
            self._browsed.append((label or f"{short_name(path)} (folder)", Path(path)))
            self.refresh()
            i = self.findData(str(path))
        self.select_index(i)

    def select_index(self, i: int) -> None:
        new = Path(self.itemData(i)) if i >= 0 and self.itemData(i) else None
        self.setCurrentIndex(i if new is not None else -1)
        if new != self._current:
            self._current = new
            self.pathChanged.emit(new)

    def _on_activated(self, i: int) -> None:
        if self.itemData(i) is not None:
            self._chosen = True
            self.select_index(i)
            return
        folder = file_dialogs.existing_dir(self, "Choose a checkpoint or run folder")
        if folder:
            self._chosen = True
            self.set_path(Path(folder))
        else:
            self.setCurrentIndex(self.findData(str(self._current)) if self._current is not None else -1)


class PromptEdit(QPlainTextEdit):
    """Enter submits, Shift+Enter starts a new line, Esc is passed on (to stop an answer)."""

    submitted = Signal()
    escaped = Signal()

    def __init__(self, placeholder: str, parent=None):
        super().__init__(parent)
        self.setPlaceholderText(placeholder)
        self.setTabChangesFocus(True)
        lines = self.fontMetrics().lineSpacing()
        self.setMinimumHeight(2 * lines + 14)
        self.setMaximumHeight(4 * lines + 14)

    def keyPressEvent(self, e) -> None:
        if e.key() in (Qt.Key_Return, Qt.Key_Enter) and not e.modifiers() & Qt.ShiftModifier:
            self.submitted.emit()
            return
        if e.key() == Qt.Key_Escape:
            self.escaped.emit()
            return
        super().keyPressEvent(e)


class Banner(QFrame):
    """An error or a note inside the view, with a button that dismisses it."""

    closed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QFrame.StyledPanel)
        self.setAutoFillBackground(True)
        self.setBackgroundRole(QPalette.AlternateBase)
        self.icon, self.text = QLabel(), QLabel()
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        close = QToolButton()
        close.setAutoRaise(True)
        close.setIcon(self.style().standardIcon(QStyle.SP_TitleBarCloseButton))
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        # One action the message offers (Undo); it dismisses the banner when clicked.
        self.action = QPushButton()
        self.action.clicked.connect(self._act)
        self.action.hide()
        self._on_action: Optional[Callable[[], None]] = None
        row = QHBoxLayout(self)
        row.setContentsMargins(8, 4, 4, 4)
        row.addWidget(self.icon)
        row.addWidget(self.text, 1)
        row.addWidget(self.action, 0, Qt.AlignTop)
        row.addWidget(close, 0, Qt.AlignTop)
        self.kind = ""
        self.hide()

    def show_message(self, text: str, kind: str = "error",
                     action: Optional[tuple[str, Callable[[], None]]] = None) -> None:
        icon = QStyle.SP_MessageBoxWarning if kind == "error" else QStyle.SP_MessageBoxInformation
        self.icon.setPixmap(self.style().standardIcon(icon).pixmap(20, 20))
        self.text.setText(text)
        self.kind = kind
        self.action.setText(action[0] if action else "")
        self.action.setVisible(action is not None)
        self._on_action = action[1] if action else None
        self.show()

    def _act(self) -> None:
        act, self._on_action = self._on_action, None
        self.dismiss()
        if act is not None:
            act()

    def dismiss(self) -> None:
        if not self.isHidden():
            self.hide()
            self.closed.emit()
