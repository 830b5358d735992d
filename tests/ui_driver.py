"""Driving the real window as a person does: clicks on the sidebar, tabs and buttons, keys typed
into the settings form's own editors, dialogs answered by clicking their buttons."""
from __future__ import annotations

import json

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QApplication, QCheckBox, QComboBox, QLineEdit, QMessageBox,
                               QPlainTextEdit, QSpinBox, QTabWidget)

JOB_TIMEOUT_MS = 180_000
TINY_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 64}
# What a person types on each page to make its run tiny (everything else is the page's own).
TINY = {
    "tokenizer": dict(vocab_size=320, max_train_chars=60_000),
    "pretrain": dict(preset="tiny", model=TINY_MODEL, max_steps=6, batch_size=4, warmup_steps=1, eval_every=3,
                     eval_batches=1, sample_every=3, sample_tokens=4, checkpoint_every=6, log_every=1, device="cpu"),
    "sft": dict(max_steps=4, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1, eval_task_limit=3,
                task_tokens=4, sample_every=2, sample_tokens=4, checkpoint_every=4, log_every=1, device="cpu"),
    "sample": dict(n_prompts=6, k=3, max_new_tokens=4, batch_size=18, device="cpu"),
    "reward": dict(epochs=1.0, batch_size=2, eval_every=1, log_every=1, device="cpu"),
    "ppo": dict(steps=2, rollout_batch_size=4, minibatch_size=2, max_new_tokens=4, probe_every=1, probe_tokens=4,
                checkpoint_every=2, device="cpu"),
    "dpo": dict(epochs=1.0, batch_size=2, eval_every=1, log_every=1, kl_prompts=2, kl_tokens=4, sample_every=0,
                device="cpu"),
    "grpo": dict(steps=2, prompts_per_step=2, group_size=2, minibatch_size=4, max_new_tokens=4, eval_every=2,
                 eval_task_limit=3, probe_every=2, probe_tokens=4, checkpoint_every=2, device="cpu"),
}


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def go(qtbot, window, key: str) -> None:
    """Click the page's row in the sidebar."""
    from ui.main_window import SIDEBAR
    row = [k for k, _ in SIDEBAR].index(key)
    item = window.sidebar.item(row)
    window.sidebar.scrollToItem(item)
    qtbot.mouseClick(window.sidebar.viewport(), Qt.MouseButton.LeftButton,
                     pos=window.sidebar.visualItemRect(item).center())
    assert window.sidebar.currentRow() == row


def sidebar_text(window, key: str) -> str:
    """What the sidebar says under the page's title."""
    from ui.main_window import SIDEBAR
    return window.sidebar.item([k for k, _ in SIDEBAR].index(key)).text()


def click_tab(qtbot, tabs: QTabWidget, title: str) -> None:
    bar = tabs.tabBar()
    index = next(i for i in range(tabs.count()) if tabs.tabText(i) == title)
    qtbot.mouseClick(bar, Qt.MouseButton.LeftButton, pos=bar.tabRect(index).center())
    assert tabs.currentIndex() == index


def replace_text(qtbot, edit, text: str) -> None:
    """Select what a line or text box holds and type `text` over it."""
    edit.setFocus()
    qtbot.keyClick(edit, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
    if text:
        qtbot.keyClicks(edit, text)
    else:
        qtbot.keyClick(edit, Qt.Key.Key_Delete)


def type_setting(qtbot, panel, name: str, value) -> None:
    """Type a setting into the panel's form, opening Advanced settings when it lives there."""
    form = panel.form
    editor = form.editors[name]
    if not editor.isVisibleTo(form) and not form.advanced_toggle.isChecked():
        click(qtbot, form.advanced_toggle)
    if isinstance(editor, QSpinBox):
        replace_text(qtbot, editor.lineEdit(), str(value))
    elif isinstance(editor, QCheckBox):
        if editor.isChecked() != bool(value):
            click(qtbot, editor)
    elif isinstance(editor, QComboBox):
        editor.setFocus()
        qtbot.keyClicks(editor, str(value))
        assert editor.currentText() == str(value), (name, editor.currentText())
    elif isinstance(editor, (QLineEdit, QPlainTextEdit)):
        replace_text(qtbot, editor, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    else:   # a picker: its own line edit
        line = editor.combo.lineEdit() if hasattr(editor, "combo") else editor.edit
        replace_text(qtbot, line, str(value))


def type_settings(qtbot, panel, values: dict, valid: bool = True) -> None:
    """Type each setting, then wait for the form to have checked them (and, with `valid`,
    to have found nothing wrong)."""
    for name, value in values.items():
        type_setting(qtbot, panel, name, value)
    form = panel.form
    qtbot.waitUntil(lambda: not form._debounce.isActive() and (form.error is None or not valid), timeout=5_000)


def answer_next_dialog(qtbot, button=QMessageBox.StandardButton.Yes) -> None:
    """Click `button` of the next message box that opens (a modal dialog blocks the caller)."""
    def press():
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            qtbot.mouseClick(box.button(button), Qt.MouseButton.LeftButton)
        else:
            QTimer.singleShot(20, press)
    QTimer.singleShot(0, press)


def wait_preview(qtbot, panel) -> None:
    qtbot.waitUntil(lambda: not panel._preview_timer.isActive() and not panel.preview.busy, timeout=30_000)


def start_and_wait(qtbot, window, panel, button_name: str = "start_btn"):
    """Click Start (or Resume) and wait for the job it launched to end; returns the job."""
    ctx = window.ctx
    with qtbot.waitSignal(ctx.jobStarted, timeout=10_000) as started:
        click(qtbot, getattr(panel, button_name))
    job = started.args[0]
    if job.running:
        with qtbot.waitSignal(job.finished, timeout=JOB_TIMEOUT_MS):
            pass
    return job


def press(qtbot, window, key, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    """A key press as the window gets it: made active, the key goes to its focused widget (a
    window's shortcuts, Ctrl+Q or Ctrl+3, only fire in the active window)."""
    if not window.isActiveWindow():
        with qtbot.waitActive(window, timeout=5_000):
            window.activateWindow()
    target = QApplication.focusWidget() or window
    qtbot.keyClick(target, key, modifier)
