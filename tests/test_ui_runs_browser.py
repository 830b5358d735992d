"""The runs table: newest first, sorted by a click on a header (times and durations as numbers),
and a reward model's accuracy with the number of held-out rankings it rests on."""
import json
import time

import pytest
from PySide6.QtCore import QObject, QPoint, Qt, Signal

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
    many = info(tmp_path, "reward-b", "reward", T0, 60, **{"val/accuracy": 0.86})
    (many.path / "summary.json").write_text(json.dumps({"val_rankings": 246}))
    assert result_text(many) == "val acc 86.0% on 246 held-out rankings"
    running = info(tmp_path, "reward-c", "reward", T0, 60, **{"val/accuracy": 0.5})
    assert result_text(running) == "val acc 50.0%"      # no summary yet: no count to give
