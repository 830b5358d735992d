"""A stage's settings as a form, generated from its config dataclass (workbench/forms.py).

Every widget carries the field's explanation as its tooltip. Values are checked by the stage's
own `validate()` as the user types (debounced); the field it names is outlined and its message
shown under the form, so a bad value is seen before Start, not after a failed launch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QPlainTextEdit, QSpinBox, QToolButton,
                               QVBoxLayout, QWidget)

from workbench.forms import LABELS, FieldSpec, check, field_specs

# (label, path) choices for an artifact field: "tokenizer" | "checkpoint" | "reward".
ArtifactSource = Callable[[str], list[tuple[str, Path]]]
NONE_LABEL = "(the checkpoint's own)"


class ArtifactPicker(QWidget):
    """A run of the project, or any folder or file picked with Browse."""
    changed = Signal()

    def __init__(self, spec: FieldSpec, source: ArtifactSource, parent=None):
        super().__init__(parent)
        self.spec, self.source = spec, source
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.combo.setMinimumContentsLength(24)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose a run folder, checkpoint folder or file")
        browse.clicked.connect(self._browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo, 1)
        lay.addWidget(browse)
        self.combo.currentTextChanged.connect(lambda _t: self.changed.emit())
        self.refresh()

    def refresh(self) -> None:
        current = self.value()
        self.combo.blockSignals(True)
        self.combo.clear()
        if self.spec.optional:
            self.combo.addItem(NONE_LABEL, None)
        for label, path in self.source(self.spec.artifact or ""):
            self.combo.addItem(label, str(path))
        self.combo.blockSignals(False)
        if current is not None:
            self.set_value(current)

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
        else:
            self.combo.setEditText(str(value))
        self.combo.lineEdit().setCursorPosition(0)     # the run's name, not the tail, in view

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, f"Choose {self.spec.name}")
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
        files, _ = QFileDialog.getOpenFileNames(self, f"Add {self.spec.name}", "",
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
        self.error = None
        # Values the panel supplies instead of an editor (the reward panel's rankings from the
        # store); the editor is disabled while it applies.
        self.overrides: dict = {}
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        basic = QFormLayout()
        basic.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        n_advanced = sum(not spec.basic for spec in self.specs)
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setText(f"Advanced settings ({n_advanced})")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setAutoRaise(True)
        self.advanced_box = QWidget()
        advanced = QFormLayout(self.advanced_box)
        advanced.setContentsMargins(12, 0, 0, 0)
        advanced.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.advanced_box.hide()
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        for spec in self.specs:
            editor = self._editor(spec, artifacts)
            editor.setToolTip(spec.help)
            label = QLabel(LABELS.get(spec.name, spec.name.replace("_", " ")) + ("*" if spec.required else ""))
            label.setToolTip(spec.help)
            (basic if spec.basic else advanced).addRow(label, editor)
            self.editors[spec.name] = editor
        outer.addLayout(basic)
        outer.addWidget(self.advanced_toggle)
        outer.addWidget(self.advanced_box)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setStyleSheet("color: #d9534f;")
        self.message.hide()
        outer.addWidget(self.message)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.validate)

    def _toggle_advanced(self, on: bool) -> None:
        self.advanced_box.setVisible(on)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

    def _editor(self, spec: FieldSpec, artifacts: ArtifactSource) -> QWidget:
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
                    w.setValue(int(v))
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
        for w in self.editors.values():
            if isinstance(w, ArtifactPicker):
                w.refresh()

    def set_editable(self, editable: bool) -> None:
        for w in self.editors.values():
            w.setEnabled(editable)

    # --- validation ---------------------------------------------------------------------------

    def validate(self):
        """Check the values with the stage's own rules; mark the field the error names."""
        values = self.values()
        for w in self.editors.values():
            w.setStyleSheet("")
        _cfg, error = check(self.stage, values)
        missing = [s.name for s in self.specs if s.required and s.name not in values]
        if error is None and missing:
            from engine.config import ConfigError
            error = ConfigError(missing[0], "is required")
        self.error = error
        if error is None:
            self.message.hide()
        else:
            field = getattr(error, "field", "").split(".")[0].split("[")[0]
            if field in self.editors:
                self.editors[field].setStyleSheet("border: 1px solid #d9534f; border-radius: 3px;")
            self.message.setText(str(error))
            self.message.show()
        self.validity.emit(error)
        return error


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
