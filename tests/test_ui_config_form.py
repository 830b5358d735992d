"""A stage's settings form as a person meets it: every invalid field says why under itself,
the form does not move as messages come and go, it fits a narrow column, and a run picker
that fills in is checked at once, with names that are not cut off."""
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QScrollArea

from ui.config_form import ConfigForm
from workbench.runfolder import defaults

RUN = "pretrain-20250301-101500 (completed, step 2000)"


def make_form(qtbot, runs, width=420):
    form = ConfigForm("sft", lambda kind: list(runs) if kind == "checkpoint" else [])
    form.set_values({**defaults("sft"), "data": ["sft.jsonl"]})      # as the stage panel does
    scroll = QScrollArea()          # as the stage panel holds it
    scroll.setWidget(form)
    scroll.setWidgetResizable(True)
    scroll.resize(width, 900)
    qtbot.addWidget(scroll)
    scroll.show()
    qtbot.waitExposed(scroll)
    return form, scroll


def retype(qtbot, editor, text):
    editor.setFocus()
    qtbot.keyClick(editor, Qt.Key_A, Qt.ControlModifier)
    qtbot.keyClicks(editor, text)


def rows_at(form):
    return {name: e.mapTo(form, QPoint(0, 0)).y() for name, e in form.editors.items() if e.isVisible()}


def test_every_invalid_field_says_why_and_the_form_does_not_move(qtbot, tmp_path):
    form, _ = make_form(qtbot, [(RUN, tmp_path / "run")])
    assert form.error is None
    before, height = rows_at(form), form.height()
    retype(qtbot, form.editors["lr"], "abc")
    retype(qtbot, form.editors["batch_size"], "0")
    qtbot.waitUntil(lambda: set(form.errors) == {"batch_size", "lr"}, timeout=10_000)
    assert form.messages["lr"].text() == "expected a number, got 'abc'"
    assert "positive" in form.messages["batch_size"].text()
    assert all(form.messages[n].isVisible() for n in ("lr", "batch_size"))
    assert form.messages["max_steps"].text() == ""
    assert form.error is form.errors["batch_size"]      # the first in the form's order
    assert rows_at(form) == before and form.height() == height
    retype(qtbot, form.editors["lr"], "0.001")
    qtbot.waitUntil(lambda: set(form.errors) == {"batch_size"}, timeout=10_000)
    assert form.messages["lr"].text() == "" and rows_at(form) == before


def test_a_required_input_left_empty_and_a_bad_value_are_both_shown(qtbot):
    form, _ = make_form(qtbot, [])
    retype(qtbot, form.editors["lr"], "x")
    qtbot.waitUntil(lambda: "lr" in form.errors, timeout=10_000)
    assert form.messages["init"].text() == "is required" and form.error.field == "init"


def test_the_advanced_settings_fit_a_narrow_column(qtbot, tmp_path):
    form, scroll = make_form(qtbot, [(RUN, tmp_path / "run")], width=360)
    qtbot.mouseClick(form.advanced_toggle, Qt.LeftButton)
    assert form.advanced_box.isVisible()
    qtbot.waitUntil(lambda: scroll.verticalScrollBar().maximum() > 0, timeout=10_000)
    assert scroll.horizontalScrollBar().maximum() == 0
    right = scroll.viewport().width()
    for name, editor in form.editors.items():
        assert editor.mapTo(form, QPoint(editor.width(), 0)).x() <= right, name


def test_a_picker_that_fills_in_is_checked_at_once_and_shows_whole_names(qtbot, tmp_path):
    runs = []
    form, _ = make_form(qtbot, runs)
    assert form.error is not None and form.error.field == "init"
    runs.append((RUN, tmp_path / "run"))
    form.refresh_choices()                  # what the panel does when a run appears
    assert form.error is None and form.values()["init"] == str(tmp_path / "run")
    picker = form.editors["init"]
    assert RUN in picker.combo.toolTip() and str(tmp_path / "run") in picker.combo.toolTip()
    widest = picker.combo.view().fontMetrics().horizontalAdvance(RUN)
    assert picker.combo.view().minimumWidth() >= widest      # the drop-down list is not cut
    # A folder picked with Browse shows its own name, the end of its path, in the box.
    folder = tmp_path / "somewhere" / "deep" / "imported-model"
    picker.set_value(str(folder))
    edit = picker.combo.lineEdit()
    assert edit.cursorPosition() == len(str(folder))


def test_dpo_offers_its_losses_and_forms_as_choices_and_refuses_a_bad_pair(qtbot):
    from PySide6.QtWidgets import QComboBox
    form = ConfigForm("dpo", lambda kind: [])
    form.set_values({**defaults("dpo"), "init": "sft", "data": ["r.jsonl"]})
    qtbot.addWidget(form)
    form.show()
    loss, shape = form.editors["loss"], form.editors["form"]
    assert isinstance(loss, QComboBox) and [loss.itemText(i) for i in range(loss.count())] == ["sigmoid", "ipo"]
    assert [shape.itemText(i) for i in range(shape.count())] == ["pairwise", "plackett_luce"]
    loss.setCurrentText("ipo")
    shape.setCurrentText("plackett_luce")
    assert form.values()["loss"] == "ipo" and form.values()["form"] == "plackett_luce"
    qtbot.waitUntil(lambda: "loss" in form.errors, timeout=10_000)
    assert "pairwise loss" in form.messages["loss"].text()



def wheel(widget, notches: int) -> bool:
    """A wheel turn over `widget`; whether it took it. (Sent, not spontaneous: Qt gives a sent
    wheel event to the widget alone, so an ignored one is not seen passing to the scroll area
    here, as it does under a real wheel.)"""
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication
    at = QPointF(widget.rect().center())
    event = QWheelEvent(at, QPointF(widget.mapToGlobal(at.toPoint())), QPoint(0, 0), QPoint(0, -120 * notches),
                        Qt.NoButton, Qt.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)
    return event.isAccepted()


def test_a_wheel_over_a_box_is_left_to_the_form_unless_the_box_was_clicked_into(qtbot):
    # Scrolling a short window's form over the preset box moved it from mini to base.
    form = ConfigForm("pretrain", lambda kind: [])
    form.set_values(defaults("pretrain"))
    scroll = QScrollArea()
    scroll.setWidget(form)
    scroll.setWidgetResizable(True)
    scroll.resize(420, 300)
    qtbot.addWidget(scroll)
    scroll.show()
    qtbot.waitExposed(scroll)
    preset, steps = form.editors["preset"], form.editors["max_steps"]
    before = preset.currentText()
    assert not wheel(preset, 3) and not wheel(steps, 3)          # ignored: for the scroll area
    assert preset.currentText() == before and steps.value() == defaults("pretrain")["max_steps"]
    scroll.activateWindow()
    preset.setFocus(Qt.FocusReason.MouseFocusReason)            # as a click into it gives
    qtbot.waitUntil(preset.hasFocus, timeout=5_000)
    assert wheel(preset, 1) and preset.currentText() != before


def test_a_folded_advanced_setting_in_error_is_named_on_the_toggle(qtbot, tmp_path):
    from PySide6.QtWidgets import QLineEdit
    from ui.config_form import LABELS
    form, _ = make_form(qtbot, [(RUN, tmp_path / "run")])
    assert not form.advanced_toggle.isChecked()
    name = next(spec.name for spec in form.specs if not spec.basic and type(form.editors[spec.name]) is QLineEdit)
    before = form.advanced_toggle.text()
    form.advanced_toggle.setChecked(True)
    retype(qtbot, form.editors[name], "abc")
    form.advanced_toggle.setChecked(False)
    qtbot.waitUntil(lambda: form.error is not None, timeout=5_000)
    assert form.advanced_toggle.text() == f"{before} · fix {LABELS.get(name, name.replace('_', ' '))}"
    form.advanced_toggle.setChecked(True)
    retype(qtbot, form.editors[name], "1")
    qtbot.waitUntil(lambda: form.error is None, timeout=5_000)
    assert form.advanced_toggle.text() == before
