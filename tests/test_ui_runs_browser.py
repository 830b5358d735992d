"""The runs table: newest first, sorted by a click on a header (times and durations as numbers),
a reward model's accuracy with the number of held-out rankings it rests on, and Export report…"""
import json
import time

import pytest
from PySide6.QtCore import QObject, QPoint, Qt, Signal

from ui import file_dialogs
from ui.runs_browser import COLUMNS, RunsBrowser, result_text
from workbench.runs import RunInfo

T0 = time.mktime((2025, 3, 1, 9, 0, 0, 0, 0, -1))


class Runs(QObject):
    """What the browser asks of the project: its runs, and a signal when they change."""
    runsChanged = Signal()

    def __init__(self, infos):
        super().__init__()
        self.infos = infos

    def run_list(self):
        return list(self.infos)

    def run(self, name):
        return next((i for i in self.infos if i.name == name), None)

    def job_for(self, _name):
        return None

    @property
    def runs(self):     # the project's run store, as ProjectContext.runs
        return self

    def delete(self, name):
        self.infos = [i for i in self.infos if i.name != name]

    def children(self, name):
        return [i for i in self.infos if name in i.parents.values()]

    def sync(self):
        self.runsChanged.emit()


def info(tmp_path, name, stage, started, seconds, **metrics):
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return RunInfo(name, stage, path, "completed", {}, created_at=started, started_at=started,
                   ended_at=started + seconds, metrics=metrics)


@pytest.fixture
def browser(qtbot, tmp_path):
    runs = Runs([info(tmp_path, "tokenizer-20250301-090000", "tokenizer", T0, 5),
                 info(tmp_path, "pretrain-20250301-100000", "pretrain", T0 + 3600, 7200),
                 info(tmp_path, "sft-20250301-120000", "sft", T0 + 3 * 3600, 90)])
    runs.runs_dir = tmp_path
    b = RunsBrowser(runs)
    qtbot.addWidget(b)
    b.resize(1200, 700)
    b.show()
    qtbot.waitExposed(b)
    return b


def names(b):
    return [b.table.item(r, 0).text() for r in range(b.table.rowCount())]


def click_header(qtbot, b, title):
    header = b.table.horizontalHeader()
    col = COLUMNS.index(title)
    x = header.sectionViewportPosition(col) + header.sectionSize(col) // 2
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(x, header.height() // 2))


def test_newest_first_and_each_header_sorts_by_its_value(qtbot, browser):
    b = browser
    assert names(b) == ["sft-20250301-120000", "pretrain-20250301-100000", "tokenizer-20250301-090000"]
    click_header(qtbot, b, "Duration")            # 5s, 1m30s, 2h00m: by time, not by text
    first = names(b)
    assert ascending(b, first) == ["tokenizer-20250301-090000", "sft-20250301-120000",
                                   "pretrain-20250301-100000"]
    click_header(qtbot, b, "Duration")            # the same header again: the other way
    assert names(b) == first[::-1]
    click_header(qtbot, b, "Run")
    assert ascending(b, names(b)) == ["pretrain-20250301-100000", "sft-20250301-120000",
                                      "tokenizer-20250301-090000"]
    order = names(b)
    b.ctx.runsChanged.emit()                      # a refresh keeps the order the user chose
    assert names(b) == order


def ascending(b, rows):
    """The rows in ascending order, whichever way the header now sorts (a style may sort a newly
    clicked column either way first)."""
    order = b.table.horizontalHeader().sortIndicatorOrder()
    return rows if order == Qt.SortOrder.AscendingOrder else rows[::-1]


def test_reward_accuracy_says_how_many_held_out_rankings_it_rests_on(tmp_path):
    few = info(tmp_path, "reward-a", "reward", T0, 60, **{"val/accuracy": 0.8333, "val/margin": 0.4})
    (few.path / "summary.json").write_text(json.dumps({"val_rankings": 6, "val/accuracy": 0.8333}))
    text = result_text(few)
    assert text.split(", ")[0] == "val acc 83.3% on only 6 held-out rankings (too few to go by)"
    assert result_text(few, short=True).split(", ")[0] == "val acc 83.3% (only 6 held out)"   # the sidebar's
    many = info(tmp_path, "reward-b", "reward", T0, 60, **{"val/accuracy": 0.86})
    (many.path / "summary.json").write_text(json.dumps({"val_rankings": 246}))
    assert result_text(many) == "val acc 86.0% on 246 held-out rankings"
    running = info(tmp_path, "reward-c", "reward", T0, 60, **{"val/accuracy": 0.5})
    assert result_text(running) == "val acc 50.0%"      # no summary yet: no count to give


def test_a_failed_run_shows_why_in_its_result(tmp_path):
    failed = info(tmp_path, "grpo-a", "grpo", T0, 1)
    failed.status, failed.error = "failed", "config field 'user_reward': r.py: no such file\nmore"
    assert result_text(failed) == "failed: config field 'user_reward': r.py: no such file"


def pretrain_folder(path):
    """A finished pretraining run's folder, as the engine writes one: settings, events, samples."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"max_steps": 4, "lr": 0.002}))
    events = [{"type": "start", "time": T0, "stage": "pretrain", "config": {"max_steps": 4, "lr": 0.002}, "pid": 1}]
    events += [{"type": "metrics", "time": T0 + s, "step": s, "train/loss": 5.0 - s / 2, "train/lr": 0.002}
               for s in range(1, 5)]
    events += [{"type": "sample", "time": T0 + 4, "step": 4, "prompt": "The <b>", "text": "cat <script>"},
               {"type": "done", "time": T0 + 5, "status": "completed", "error": None}]
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def click_run(qtbot, b, name):
    row = names(b).index(name)
    rect = b.table.visualItemRect(b.table.item(row, 0))
    qtbot.mouseClick(b.table.viewport(), Qt.LeftButton, pos=rect.center())
    assert b.selected_names() == [name]


def test_export_report_asks_where_and_writes_the_page(qtbot, browser, tmp_path, monkeypatch):
    b = browser
    run = "pretrain-20250301-100000"
    pretrain_folder(tmp_path / run)
    out = tmp_path / "hand-in" / "report.html"
    asked = []

    def save_as(parent, title, start, filters):
        asked.append(start)
        return str(out)

    monkeypatch.setattr(file_dialogs, "save_file", save_as)
    click_run(qtbot, b, run)
    assert b.report_btn.isEnabled()
    qtbot.mouseClick(b.report_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: "written to" in b.hint.text(), timeout=20_000)
    qtbot.waitUntil(lambda: not b.report_worker.running and b.report_btn.isEnabled(), timeout=5_000)
    assert asked == [str(tmp_path / run / "report.html")]      # proposed beside the run
    page = out.read_text(encoding="utf-8")
    assert "train/loss" in page and "<svg" in page and "cat &lt;script&gt;" in page
    assert str(out) in b.hint.text()


def test_a_report_that_cannot_be_written_says_why_in_one_line(qtbot, browser, tmp_path, monkeypatch):
    b = browser
    run = "pretrain-20250301-100000"
    pretrain_folder(tmp_path / run)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(file_dialogs, "save_file", lambda *a: str(tmp_path / "a-file" / "report.html"))
    warnings = []
    monkeypatch.setattr("ui.runs_browser.QMessageBox.warning", lambda _p, title, text: warnings.append((title, text)))
    click_run(qtbot, b, run)
    qtbot.mouseClick(b.report_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: bool(warnings), timeout=20_000)
    qtbot.waitUntil(lambda: not b.report_worker.running, timeout=5_000)
    (title, text), = warnings
    assert title == "Report not written" and text.startswith("cannot write") and "\n" not in text


def test_delete_asks_first_and_deletes_only_on_yes(qtbot, browser, monkeypatch):
    # The button's clicked(bool) once arrived as confirm=False: a click deleted at once.
    from PySide6.QtWidgets import QMessageBox
    b, run = browser, "pretrain-20250301-100000"
    b.ctx.run("sft-20250301-120000").parents["init"] = run
    answers, asked = [QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes], []
    monkeypatch.setattr("ui.runs_browser.QMessageBox.question",
                        lambda _p, title, text, buttons, default: asked.append((text, default)) or answers.pop(0))
    click_run(qtbot, b, run)
    qtbot.mouseClick(b.delete_btn, Qt.LeftButton)
    (text, default), = asked
    assert "This cannot be undone" in text and run in names(b)
    # the runs made from it are named, and Enter answers No
    assert "1 other run(s) started from them and will lose their input: sft-20250301-120000" in text
    assert default == QMessageBox.StandardButton.No
    qtbot.mouseClick(b.delete_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: run not in names(b), timeout=5_000)
    assert len(asked) == 2
    # Nothing is selected in its place, and no plots of the deleted run stay beside another name.
    assert b.selected_names() == [] and b.plots is None


def test_a_running_run_is_not_deleted_and_no_question_is_asked_first(qtbot, browser, monkeypatch):
    from PySide6.QtWidgets import QMessageBox
    b, run = browser, "pretrain-20250301-100000"
    b.ctx.run(run).status = "running"
    asked, warned = [], []
    monkeypatch.setattr("ui.runs_browser.QMessageBox.question", lambda *a: asked.append(a) or QMessageBox.Yes)
    monkeypatch.setattr("ui.runs_browser.QMessageBox.warning", lambda _p, _t, text: warned.append(text))
    click_run(qtbot, b, run)
    qtbot.mouseClick(b.delete_btn, Qt.LeftButton)
    assert asked == [] and warned == [f"{run} is running: stop it before deleting it. Nothing was deleted."]
    assert run in names(b)


def test_show_folder_says_the_path_when_no_file_manager_opens_it(qtbot, browser, monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr("ui.runs_browser.QDesktopServices.openUrl", lambda url: False)
    monkeypatch.setattr("ui.runs_browser.QMessageBox.information", lambda _p, title, text: shown.append(text))
    click_run(qtbot, browser, "sft-20250301-120000")
    qtbot.mouseClick(browser.folder_btn, Qt.LeftButton)
    assert len(shown) == 1 and shown[0].endswith(str(tmp_path / "sft-20250301-120000"))


def test_the_export_dialog_keeps_a_typed_path_across_formats(qtbot, tmp_path):
    from ui.export_dialog import ExportDialog
    d = ExportDialog(tmp_path / "runs" / "sft-1")
    qtbot.addWidget(d)
    exports = tmp_path / "exports" / "sft-1"
    assert d.path.text() == str(exports)                               # the default, per format
    d.format.setCurrentIndex(1)                                        # Hugging Face, bfloat16
    assert d.path.text() == f"{exports}-bfloat16"
    d.format.setCurrentIndex(3)
    assert d.path.text() == f"{exports}-q8_0.gguf"
    d.path.clear()
    qtbot.keyClicks(d.path, "/data/mine/model.gguf")
    d.format.setCurrentIndex(0)                                        # typed: kept, as a folder
    assert d.path.text() == "/data/mine/model"
    d.format.setCurrentIndex(2)
    assert d.path.text() == "/data/mine/model.gguf"


def test_a_failed_run_selected_says_why_above_its_plots(qtbot, browser):
    b = browser
    failed = b.ctx.run("sft-20250301-120000")
    failed.status, failed.error = "failed", "config field 'user_reward': r.py: no such file"
    b.ctx.runsChanged.emit()
    row = names(b).index(failed.name)
    qtbot.mouseClick(b.table.viewport(), Qt.LeftButton, pos=b.table.visualItemRect(b.table.item(row, 0)).center())
    assert b.note.isVisible()
    assert b.note.text() == ("sft-20250301-120000 failed: config field 'user_reward': r.py: no such file\n"
                             "It reported no metrics: it ended before its first logged step.")
    row = names(b).index("pretrain-20250301-100000")
    qtbot.mouseClick(b.table.viewport(), Qt.LeftButton, pos=b.table.visualItemRect(b.table.item(row, 0)).center())
    assert not b.note.isVisible()


def test_the_filter_shows_the_runs_with_every_word_typed(qtbot, browser):
    b = browser
    b.ctx.run("sft-20250301-120000").status = "failed"
    b.ctx.runsChanged.emit()
    row = names(b).index("pretrain-20250301-100000")
    qtbot.mouseClick(b.table.viewport(), Qt.LeftButton, pos=b.table.visualItemRect(b.table.item(row, 0)).center())
    qtbot.keyClicks(b.filter, "fail")
    shown = [n for r, n in enumerate(names(b)) if not b.table.isRowHidden(r)]
    assert shown == ["sft-20250301-120000"] and b.selected_names() == []   # a hidden run is not selected
    b.filter.clear()
    qtbot.keyClicks(b.filter, "2025 token")
    assert [n for r, n in enumerate(names(b)) if not b.table.isRowHidden(r)] == ["tokenizer-20250301-090000"]
    b.ctx.runsChanged.emit()                       # a refresh keeps the filter
    assert [n for r, n in enumerate(names(b)) if not b.table.isRowHidden(r)] == ["tokenizer-20250301-090000"]


def test_the_table_is_walked_by_keys_tab_leaves_it_enter_opens_delete_asks(qtbot, browser, monkeypatch):
    from PySide6.QtWidgets import QApplication, QMessageBox
    b, run = browser, "pretrain-20250301-100000"
    opened, asked = [], []
    b.openRun.connect(lambda stage, name: opened.append((stage, name)))
    monkeypatch.setattr("ui.runs_browser.QMessageBox.question",
                        lambda *a: asked.append(a[2]) or QMessageBox.StandardButton.No)
    click_run(qtbot, b, run)
    b.table.setFocus()
    qtbot.keyClick(b.table, Qt.Key_Return)
    assert opened == [("pretrain", run)]
    qtbot.keyClick(b.table, Qt.Key_Delete)
    assert len(asked) == 1 and run in asked[0] and run in names(b)
    qtbot.keyClick(b.table, Qt.Key_Tab)                 # out of the table, to the next control
    assert QApplication.focusWidget() is not b.table and b.selected_names() == [run]


def test_deleting_many_runs_asks_with_a_question_that_fits(qtbot, browser, monkeypatch):
    from PySide6.QtWidgets import QMessageBox
    from ui.runs_browser import _listed
    many = [f"pretrain-2025030{i % 10}-1{i:05d}" for i in range(150)]
    text = _listed(many, "\n")
    assert text.count("\n") == 12 and text.endswith("… and 138 more")
    asked = []
    monkeypatch.setattr("ui.runs_browser.QMessageBox.question",
                        lambda _p, _t, text, *a: asked.append(text) or QMessageBox.StandardButton.No)
    browser.table.selectAll()
    browser.delete_selected()
    assert asked and all(n in asked[0] for n in names(browser))


def test_a_running_runs_plots_follow_it(qtbot, browser):
    b = browser
    run = b.ctx.run("pretrain-20250301-100000")
    run.status = "running"
    with open(run.path / "events.jsonl", "w") as f:
        f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": 1, "time": T0}) + "\n")
        f.write(json.dumps({"type": "metrics", "step": 1, "time": T0, "train/loss": 3.0}) + "\n")
    click_run(qtbot, b, run.name)

    def steps():
        try:
            return b.plots.curve_data("Loss", "train/loss")[0].tolist()
        except KeyError:        # not drawn yet: the grid draws on its redraw timer
            return []
    qtbot.waitUntil(lambda: steps() == [1], timeout=5_000)
    with open(run.path / "events.jsonl", "a") as f:
        f.write(json.dumps({"type": "metrics", "step": 2, "time": T0, "train/loss": 2.5}) + "\n")
    b.ctx.runsChanged.emit()                      # the context's next sync
    qtbot.waitUntil(lambda: steps() == [1, 2], timeout=5_000)


def test_a_large_selection_overlays_its_main_stage_and_at_most_a_legends_worth(qtbot, tmp_path, monkeypatch):
    import ui.runs_browser as rb
    monkeypatch.setattr(rb, "MAX_OVERLAY", 3)
    infos = [info(tmp_path, f"pretrain-2025030{i}-090000", "pretrain", T0 + i, 10) for i in range(5)]
    infos.append(info(tmp_path, "sft-20250301-120000", "sft", T0 + 99, 10))    # first in the table
    b = RunsBrowser(Runs(infos))
    qtbot.addWidget(b)
    b.show()
    b.table.selectAll()
    assert b.plots.stage == "pretrain"
    assert b.hint.text() == ("2 more pretrain run(s) not overlaid: 3 at most, the first in the table; "
                             "1 run(s) of other stages not overlaid.")
