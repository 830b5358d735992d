"""A stage's settings as a form, generated from its config dataclass (workbench/forms.py).

Every widget carries the field's explanation as its tooltip. Values are checked by the stage's
own `validate()` as the user types (debounced); every field in error is outlined with its
message under it, in a line each field keeps free, so a bad value is seen before Start and the
form does not move as messages come and go. Fields wrap under their labels rather than run
past a narrow column.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QPlainTextEdit, QSpinBox, QToolButton,
                               QVBoxLayout, QWidget)

from engine.config import ConfigError
from ui import file_dialogs
from workbench.forms import LABELS, FieldSpec, check, field_specs

# (label, path) choices for an artifact field: "tokenizer" | "checkpoint" | "reward".
ArtifactSource = Callable[[str], list[tuple[str, Path]]]
NONE_LABEL = "(the checkpoint's own)"
ERROR_COLOR = "#d9534f"
# Stand-ins for required values the user has not given yet, so the form can go on to check the
# other fields; never sent anywhere.
_STAND_IN = {"files": ["-"], "lines": ["-"], "int": 1, "float": 1.0, "bool": False, "json": {}}


class WheelWhenFocused(QObject):
    """A spin or combo box under a wheel meant to scroll the form would change its value (a
    preset jumping from mini to base): it takes the wheel only once clicked into, and the
    scroll area above it gets the wheel otherwise (an ignored wheel event goes to the parent)."""

    def guard(self, box: QWidget) -> None:
        box.setFocusPolicy(Qt.FocusPolicy.StrongFocus)      # a wheel does not give it focus
        box.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Wheel and not obj.hasFocus():
            event.ignore()
            return True
        return False


def widen_popup(combo: QComboBox) -> None:
    """Make the list a combo box drops down as wide as its longest entry (the box itself may be
    narrower), and give each entry its full text as a tooltip."""
    fm = combo.view().fontMetrics()
    widest = 0
    for i in range(combo.count()):
        text = combo.itemText(i)
        combo.setItemData(i, text, Qt.ItemDataRole.ToolTipRole)
        widest = max(widest, fm.horizontalAdvance(text))
    combo.view().setMinimumWidth(widest + 2 * fm.averageCharWidth() + combo.view().verticalScrollBar().sizeHint().width())


class ArtifactPicker(QWidget):
    """A run of the project, or any folder or file picked with Browse."""
    changed = Signal()

    def __init__(self, spec: FieldSpec, source: ArtifactSource, parent=None):
        super().__init__(parent)
        self.spec, self.source = spec, source
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        # Small at least, as wide as the column allows: the form wraps a field under its label
        # before the box would cut a run's name (which comes first in its entry).
        self.combo.setMinimumContentsLength(12)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose a run folder, checkpoint folder or file")
        browse.clicked.connect(self._browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo, 1)
        lay.addWidget(browse)
        self.combo.currentTextChanged.connect(self._on_text)
        self.refresh()

    def refresh(self) -> bool:
        """Offer the runs there are now, keeping the current choice; True (and `changed`) when
        the value moved: an empty box now shows the first run, and the form must check it."""
        current = self.value()
        self.combo.blockSignals(True)
        self.combo.clear()
        if self.spec.optional:
            self.combo.addItem(NONE_LABEL, None)
        for label, path in self.source(self.spec.artifact or ""):
            self.combo.addItem(label, str(path))
        self.combo.blockSignals(False)
        widen_popup(self.combo)
        if current is not None:
            self.set_value(current)
        self._show_tip()
        if self.value() == current:
            return False
        self.changed.emit()
        return True

    def _on_text(self, _text: str) -> None:
        self._show_tip()
        self.changed.emit()

    def _show_tip(self) -> None:
        i = self.combo.findText(self.combo.currentText())
        path = self.combo.itemData(i) if i >= 0 else None
        full = self.combo.currentText() + (f"\n{path}" if path else "")
        self.combo.setToolTip(f"{full}\n\n{self.spec.help}" if full.strip() else self.spec.help)

    def value(self):
        text = self.combo.currentText().strip()
        if not text or text == NONE_LABEL:
            return None
        i = self.combo.findText(text)
        return self.combo.itemData(i) if i >= 0 else text

    def set_value(self, value) -> None:
        if value is None:
            self.combo.setCurrentIndex(0 if self.combo.count() else -1)
            return
        i = self.combo.findData(str(value))
        if i >= 0:
            self.combo.setCurrentIndex(i)
            self.combo.lineEdit().setCursorPosition(0)     # the run's name, not the tail, in view
        else:
            self.combo.setEditText(str(value))             # a folder: its own name, at the end

    def _browse(self) -> None:
        path = file_dialogs.existing_dir(self, f"Choose {self.spec.name}")
        if path:
            self.set_value(path)


class FilesPicker(QWidget):
    """One or more data files or folders, as paths separated by ';'."""
    changed = Signal()

    def __init__(self, spec: FieldSpec, parent=None):
        super().__init__(parent)
        self.spec = spec
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("files or folders, separated by ;")
        add = QToolButton()
        add.setText("…")
        add.setToolTip("Add files")
        add.clicked.connect(self._browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(add)
        self.edit.textChanged.connect(lambda _t: self.changed.emit())

    def value(self):
        parts = [p.strip() for p in self.edit.text().split(";") if p.strip()]
        if self.spec.kind == "file":
            return parts[0] if parts else None
        return parts

    def set_value(self, value) -> None:
        if value is None:
            value = []
        self.edit.setText("; ".join([value] if isinstance(value, str) else [str(v) for v in value]))
        self.edit.setCursorPosition(0)

    def _browse(self) -> None:
        files = file_dialogs.open_files(self, f"Add {self.spec.name}", "",
                                        "Data (*.txt *.jsonl *.json);;All files (*)")
        if files:
            current = [] if self.spec.kind == "file" else self.value()
            self.set_value(files[:1] if self.spec.kind == "file" else current + files)


class ConfigForm(QWidget):
    """The settings of one stage. `values()` is a dict the stage's config accepts."""
    changed = Signal()
    validity = Signal(object)      # None when valid, else the ConfigError

    def __init__(self, stage: str, artifacts: ArtifactSource, parent=None):
        super().__init__(parent)
        self.stage = stage
        self.specs = field_specs(stage)
        self.editors: dict[str, QWidget] = {}
        self.messages: dict[str, QLabel] = {}       # the line under each field for its error
        self.error = None                           # the first of `errors`, or a form-wide one
        self.errors: dict[str, ConfigError] = {}    # field -> what is wrong with it, form order
        self.unreadable: dict[str, ConfigError] = {}  # fields whose loaded value no editor could hold
        # Values the panel supplies instead of an editor (the reward panel's rankings from the
        # store); the editor is disabled while it applies.
        self.overrides: dict = {}
        # What else would end a run of these values at its start (runfolder.preflight: the
        # inputs' checkpoints, the device), asked once the form's own rules pass.
        self.preflight: Optional[Callable[[dict], Optional[ConfigError]]] = None
        self._wheel = WheelWhenFocused(self)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        basic = _form_layout()
        n_advanced = sum(not spec.basic for spec in self.specs)
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setText(f"Advanced settings ({n_advanced})")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setAutoRaise(True)
        self.advanced_box = QWidget()
        advanced = _form_layout()
        self.advanced_box.setLayout(advanced)
        advanced.setContentsMargins(12, 0, 0, 0)
        self.advanced_box.hide()
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        for spec in self.specs:
            editor = self._editor(spec, artifacts)
            editor.setToolTip(spec.help)
            label = QLabel(LABELS.get(spec.name, spec.name.replace("_", " ")) + ("*" if spec.required else ""))
            label.setToolTip(spec.help)
            (basic if spec.basic else advanced).addRow(label, self._with_message(spec.name, editor))
            self.editors[spec.name] = editor
        outer.addLayout(basic)
        outer.addWidget(self.advanced_toggle)
        outer.addWidget(self.advanced_box)
        # An error no field owns (a setting the form does not show) is said under the form.
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setStyleSheet(f"color: {ERROR_COLOR};")
        self.message.hide()
        outer.addWidget(self.message)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.validate)

    def _with_message(self, name: str, editor: QWidget) -> QWidget:
        """The editor with a line under it for its error, kept free while there is none."""
        message = QLabel()
        message.setWordWrap(True)
        message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        font = message.font()
        font.setPointSizeF(font.pointSizeF() * 0.85)
        message.setFont(font)
        message.setStyleSheet(f"color: {ERROR_COLOR};")
        message.setText("Xg")                  # one line's height, with or without a message
        message.setMinimumHeight(message.sizeHint().height())
        message.clear()
        self.messages[name] = message
        # Editors may shrink below their content's width: the form wraps a row before a field
        # is cut, and a narrow column never needs a horizontal scrollbar.
        if not isinstance(editor, (ArtifactPicker, FilesPicker)):     # these size their own parts
            editor.setMinimumWidth(min(editor.minimumSizeHint().width(),
                                       12 * editor.fontMetrics().averageCharWidth()))
        box = QWidget()
        col = QVBoxLayout(box)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(0)
        col.addWidget(editor)
        col.addWidget(message)
        return box

    def _toggle_advanced(self, on: bool) -> None:
        self.advanced_box.setVisible(on)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

    def _show_advanced_for(self, name: str) -> None:
        if not next(spec.basic for spec in self.specs if spec.name == name):
            self.advanced_toggle.setChecked(True)

    def _label_advanced(self) -> None:
        """The toggle names the advanced settings in error: folded away, they kept Start off
        with no mark on screen."""
        n = sum(not spec.basic for spec in self.specs)
        bad = [spec.name for spec in self.specs if not spec.basic and spec.name in self.errors]
        self.advanced_toggle.setText(f"Advanced settings ({n})" + (
            f" · fix {', '.join(LABELS.get(b, b.replace('_', ' ')) for b in bad)}" if bad else ""))
        self.advanced_toggle.setStyleSheet(f"color: {ERROR_COLOR};" if bad else "")

    def _editor(self, spec: FieldSpec, artifacts: ArtifactSource) -> QWidget:
        w = self._make_editor(spec, artifacts)
        for box in [w.combo] if isinstance(w, ArtifactPicker) else [w]:
            if isinstance(box, (QSpinBox, QComboBox)):
                self._wheel.guard(box)
        return w

    def _make_editor(self, spec: FieldSpec, artifacts: ArtifactSource) -> QWidget:
        notify = lambda *_: (self.changed.emit(), self._debounce.start())
        if spec.kind == "artifact":
            w = ArtifactPicker(spec, artifacts)
            w.changed.connect(notify)
        elif spec.kind in ("file", "files"):
            w = FilesPicker(spec)
            w.changed.connect(notify)
        elif spec.kind == "bool":
            w = QCheckBox()
            w.toggled.connect(notify)
        elif spec.kind == "int" and not spec.optional:
            w = QSpinBox()
            w.setRange(0, 2_000_000_000)
            w.setGroupSeparatorShown(True)
            w.valueChanged.connect(notify)
        elif spec.kind == "choice":
            w = QComboBox()
            w.addItems(spec.choices or [])
            w.currentTextChanged.connect(notify)
        elif spec.kind == "lines":
            w = QPlainTextEdit()
            w.setTabChangesFocus(True)              # a form: Tab goes to the next field
            w.setMaximumHeight(70)
            w.textChanged.connect(notify)
        else:   # float, optional int, str, json: typed text, parsed on read
            w = QLineEdit()
            if spec.optional:
                w.setPlaceholderText("none")
            w.textChanged.connect(notify)
        return w

    # --- values -------------------------------------------------------------------------------

    def values(self) -> dict:
        out = {}
        for spec in self.specs:
            w = self.editors[spec.name]
            if isinstance(w, (ArtifactPicker, FilesPicker)):
                v = w.value()
                if v is None and spec.optional:
                    out[spec.name] = None
                    continue
                if v is None and spec.required:
                    continue
                out[spec.name] = v if v is not None else spec.default
            elif isinstance(w, QCheckBox):
                out[spec.name] = w.isChecked()
            elif isinstance(w, QSpinBox):
                out[spec.name] = w.value()
            elif isinstance(w, QComboBox):
                out[spec.name] = w.currentText()
            elif isinstance(w, QPlainTextEdit):
                out[spec.name] = [_unescape(line) for line in w.toPlainText().splitlines() if line.strip()]
            else:
                out[spec.name] = _parse(spec, w.text())
        out.update(self.overrides)
        return out

    def set_override(self, name: str, value) -> None:
        """Supply `name` from outside the form (None: the editor's value again)."""
        if self.overrides.get(name) == value and (value is not None or name not in self.overrides):
            return      # unchanged: validating the whole form again costs milliseconds
        if value is None:
            self.overrides.pop(name, None)
        else:
            self.overrides[name] = value
        self.editors[name].setEnabled(value is None)
        self.validate()

    def set_values(self, values: dict) -> None:
        # A value an editor cannot hold (a null or a word where a whole number goes, as a
        # config.json written by hand or by another version may have) leaves the editor as it
        # was and is named under the field, instead of failing the page.
        self.unreadable = {}
        for spec in self.specs:
            if spec.name not in values:
                continue
            v = values[spec.name]
            w = self.editors[spec.name]
            w.blockSignals(True)
            try:
                if isinstance(w, (ArtifactPicker, FilesPicker)):
                    w.set_value(v)
                elif isinstance(w, QCheckBox):
                    w.setChecked(bool(v))
                elif isinstance(w, QSpinBox):
                    try:
                        w.setValue(int(v))
                    except (TypeError, ValueError, OverflowError):
                        self.unreadable[spec.name] = ConfigError(
                            spec.name, f"config.json holds {json.dumps(v)}, not a whole number: "
                                       f"{w.value()} is shown")
                elif isinstance(w, QComboBox):
                    i = w.findText(str(v))
                    w.setCurrentIndex(i if i >= 0 else 0)
                elif isinstance(w, QPlainTextEdit):
                    w.setPlainText("\n".join(_escape(item) for item in v or []))
                else:
                    w.setText(_format(spec, v))
            finally:
                w.blockSignals(False)
        self.validate()

    def refresh_choices(self) -> None:
        moved = [w.refresh() for w in self.editors.values() if isinstance(w, ArtifactPicker)]
        if any(moved):
            self.validate()     # at once: an error about an empty box must not outlive it

    def set_editable(self, editable: bool) -> None:
        for w in self.editors.values():
            w.setEnabled(editable)

    # --- validation ---------------------------------------------------------------------------

    def validate(self):
        """Check the values with the stage's own rules; mark every field in error and say what
        is wrong under it. Returns (and emits) the first error, None when all is well."""
        values = self.values()
        self.errors, other = self._find_errors(values)
        self.errors = {**self.errors, **self.unreadable}
        if not self.errors and other is None and self.preflight is not None:
            problem = self.preflight(values)
            if problem is not None and problem.field in self.editors:
                self.errors[problem.field] = problem
            else:
                other = problem
        self._show_errors(other)
        return self.error

    def refuse(self, problem: ConfigError) -> None:
        """Show a refusal that came from elsewhere (a resume the run cannot take) on its field,
        until the next validation; the values stay valid for a new run."""
        if problem.field in self.editors:
            self._show_advanced_for(problem.field)
            _mark(self.editors[problem.field], True)
            self.messages[problem.field].setText(problem.message)
        else:
            self.message.setText(str(problem))
            self.message.setVisible(True)

    def _show_errors(self, other: Optional[ConfigError]) -> None:
        for name, editor in self.editors.items():
            error = self.errors.get(name)
            _mark(editor, error is not None)
            self.messages[name].setText(error.message if error else "")
            self.messages[name].setToolTip(str(error) if error else "")
        self.error = next(iter(self.errors.values()), other)
        self._label_advanced()
        self.message.setText(str(other) if other else "")
        self.message.setVisible(other is not None)
        self.validity.emit(self.error)

    def _find_errors(self, values: dict) -> tuple[dict[str, ConfigError], ConfigError | None]:
        """Every field's error, not only the first the config's validation meets: each field it
        names gets its default (or a stand-in, if required) and the check runs again. Returns
        ({field: error} in form order, an error no field of the form owns)."""
        found: dict[str, ConfigError] = {}
        trial = dict(values)
        for spec in self.specs:
            if spec.required and trial.get(spec.name) in (None, "", []):
                found[spec.name] = ConfigError(spec.name, "is required")
                trial[spec.name] = _STAND_IN.get(spec.kind, "-")
        by_name = {spec.name: spec for spec in self.specs}
        other = None
        for _ in range(len(self.specs) + 1):
            _cfg, error = check(self.stage, trial)
            if error is None:
                break
            name = str(getattr(error, "field", "")).split(".")[0].split("[")[0]
            if name not in by_name:
                other = error
                break
            if name in found:       # its stand-in is refused too: the rest stay unchecked
                break
            found[name] = error
            spec = by_name[name]
            trial[name] = _STAND_IN.get(spec.kind, "-") if spec.required else spec.default
        return {name: found[name] for name in self.editors if name in found}, other


def _mark(editor: QWidget, invalid: bool) -> None:
    """Tint an invalid editor's background red. Through the palette, not a style sheet: a
    border set by style sheet makes Qt draw a spin box's arrows and a combo's button its own
    plain way."""
    if not invalid:
        editor.setPalette(QPalette())       # nothing set: the editor inherits again
        return
    pal = QPalette(editor.palette())
    base, red = pal.color(QPalette.ColorRole.Base), QColor(ERROR_COLOR)
    t = 0.22
    pal.setColor(QPalette.ColorRole.Base, QColor.fromRgbF(*(a * (1 - t) + b * t for a, b in (
        (base.redF(), red.redF()), (base.greenF(), red.greenF()), (base.blueF(), red.blueF())))))
    editor.setPalette(pal)


def _form_layout() -> QFormLayout:
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    form.setVerticalSpacing(2)      # each field's message line already spaces the rows
    return form


def _parse(spec: FieldSpec, text: str):
    """Form text -> a value of the field's type; unparsable text is passed on as text, so the
    stage's validation names the field rather than the form silently keeping an old value."""
    text = text.strip()
    if not text:
        return None if spec.optional else ("" if spec.kind == "str" else text)
    try:
        if spec.kind == "int":
            return int(text)
        if spec.kind == "float":
            return float(text)
        if spec.kind == "json":
            return json.loads(text)
    except ValueError:
        return text
    return text


def _escape(item: str) -> str:
    # One item per line: an item's own newlines are shown as \n (JSON string escapes).
    return json.dumps(str(item), ensure_ascii=False)[1:-1]


def _unescape(line: str) -> str:
    try:
        return json.loads(f'"{line}"')
    except json.JSONDecodeError:
        return line


def _format(spec: FieldSpec, value) -> str:
    if value is None:
        return ""
    if spec.kind == "json":
        return json.dumps(value)
    if spec.kind == "float":
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return str(value)
