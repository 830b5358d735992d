"""Annotation packs in the app, clicked and typed as a person would: the Rank page's Packs… menu
makes packs and merges them back; File ▸ Open Annotation Pack… ranks one in its own window."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtWidgets import QApplication, QDialogButtonBox, QMessageBox, QPushButton

from tests.test_packs import make_project
from ui_driver import press
from ui import file_dialogs
from ui.pack_dialogs import MakePacksDialog
from ui.ranking_view import RankingView
from workbench.packs import open_pack
from workbench.store import Store


def fill_next_dialog(qtbot, names: str, overlap: int) -> None:
    """Type into the Make packs dialog when it opens (it is modal), then click Make packs."""
    def fill():
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, MakePacksDialog):
            QTimer.singleShot(20, fill)
            return
        qtbot.keyClicks(dialog.annotators, names)
        dialog.overlap.setValue(overlap)
        qtbot.mouseClick(dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Ok),
                         Qt.LeftButton)
    QTimer.singleShot(0, fill)


def packs_action(view: RankingView, text: str):
    button = next(b for b in view.start.findChildren(QPushButton) if b.text() == "Packs…")
    assert button.isVisible()
    return next(a for a in button.menu().actions() if a.text().startswith(text))


def rank_page_on_a_batch(qtbot, tmp_path):
    """A project with one batch of 4 items, its Rank page shown with the batch selected."""
    project = make_project(tmp_path / "p", n=4)
    view = RankingView(project)
    qtbot.addWidget(view)
    view.show()
    view.start.batches.setCurrentItem(view.start.batches.topLevelItem(0))
    return project, view


def test_make_rank_and_merge_packs_from_the_app(qtbot, tmp_path, monkeypatch):
    project, view = rank_page_on_a_batch(qtbot, tmp_path)
    shown = []
    monkeypatch.setattr(QMessageBox, "information", lambda *a: shown.append(a[2]))
    fill_next_dialog(qtbot, "ana, ben", 1)
    packs_action(view, "Make annotation packs").trigger()
    files = sorted((project / "packs").glob("*.wbpack"))
    assert [f.name for f in files] == ["class_batch-ana.wbpack", "class_batch-ben.wbpack"]
    assert "Wrote 2 pack(s)" in shown[-1]

    # ana opens her pack from the File menu of a window with no project open
    from ui.main_window import MainWindow
    main = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(main)
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: str(files[0]))
    action = next(a for a in main.menuBar().actions()[0].menu().actions()
                  if a.text() == "Open Annotation &Pack…")
    action.trigger()
    (window,) = main.pack_windows
    qtbot.addWidget(window)
    pv = window.view
    assert pv.stack.currentWidget() is pv.guide and not pv.guide.edit.isVisible()
    qtbot.keyClick(pv, Qt.Key_Return)                       # read the guidelines, start
    first = pv.current.item_id
    for key in ("2", "1", "3"):
        qtbot.keyClicks(pv, key)
    qtbot.keyClick(pv, Qt.Key_Return)
    with open_pack(files[0]) as pack:                       # in the file at once
        (r,) = pack.store.rankings()
        assert r.item_id == first and r.annotator == "ana"
    assert pv.tabs.count() == 2 and not pv.tabs.isTabVisible(1)
    pv.end_session()
    visible = [b.text() for b in pv.start.findChildren(QPushButton) if b.isVisible()]
    assert visible == ["Start ranking  ⏎"] and not pv.start.annotator.isEnabled()
    window.close()

    # back on the project's Rank page, the teacher merges both packs, twice
    monkeypatch.setattr(file_dialogs, "open_files", lambda *a, **k: [str(f) for f in files])
    texts = []
    monkeypatch.setattr(QMessageBox, "exec", lambda box: texts.append(box.text()) or 0)
    packs_action(view, "Merge annotation packs").trigger()
    packs_action(view, "Merge annotation packs").trigger()
    assert "ana on 'class batch': 1 added" in texts[0] and "ben on 'class batch': nothing ranked" in texts[0]
    assert "ana on 'class batch': 0 added, 1 already merged" in texts[1]
    with Store.for_project(project) as store:
        assert [r.annotator for r in store.rankings()] == ["ana"]
    # of the items dealt to each; ben merged an empty pack: he shows, with nothing ranked yet
    assert view.start.batches.topLevelItem(0).text(3) == "ana 1/2, ben 0/2"
    view.close_store()


def test_a_refused_make_packs_comes_back_as_it_was_filled_in(qtbot, tmp_path, monkeypatch):
    project, view = rank_page_on_a_batch(qtbot, tmp_path)
    errors, seen = [], []
    monkeypatch.setattr("ui.pack_dialogs.show_error", lambda _p, _t, e: errors.append(str(e)))
    monkeypatch.setattr(QMessageBox, "information", lambda *a: None)

    def second_try():
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, MakePacksDialog) or not errors:
            QTimer.singleShot(20, second_try)
            return
        seen.append((dialog.annotators.text(), dialog.overlap.value()))
        dialog.overlap.setValue(1)
        qtbot.mouseClick(dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Ok), Qt.LeftButton)

    fill_next_dialog(qtbot, "ana", 2)               # one annotator cannot rank each item twice
    QTimer.singleShot(0, second_try)
    packs_action(view, "Make annotation packs").trigger()
    assert errors == ["Rankings per item is 2, but 1 annotator(s) are named: each item needs that many "
                      "different people"]
    assert seen == [("ana", 2)]
    assert [f.name for f in (project / "packs").glob("*.wbpack")] == ["class_batch-ana.wbpack"]


def test_ctrl_q_quits_with_a_pack_window_open_from_either_window(qtbot, tmp_path, monkeypatch):
    from ui.main_window import MainWindow
    from workbench.packs import export_packs
    project = make_project(tmp_path / "p", n=2)
    with Store.for_project(project) as store:
        (pack,) = export_packs(store, project, store.batches()[0].id, ["ana"], 1, tmp_path / "packs")
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: str(pack))
    for quit_from in ("main", "pack"):
        main = MainWindow(QSettings(str(tmp_path / f"{quit_from}.ini"), QSettings.Format.IniFormat))
        qtbot.addWidget(main)
        main.show()
        next(a for a in main.menuBar().actions()[0].menu().actions() if a.text() == "Open Annotation &Pack…").trigger()
        (window,) = main.pack_windows
        qtbot.addWidget(window)
        window.show()
        qtbot.waitExposed(window)
        press(qtbot, main if quit_from == "main" else window, Qt.Key_Q, Qt.ControlModifier)
        qtbot.waitUntil(lambda: not window.isVisible() and not main.isVisible())


def test_open_annotation_pack_starts_in_the_projects_packs_folder(qtbot, demo_project, make_window, monkeypatch):
    (demo_project / "packs").mkdir()
    w = make_window(demo_project)
    asked = []
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: asked.append(a) or "")
    next(a for a in w.menuBar().actions()[0].menu().actions() if a.text() == "Open Annotation &Pack…").trigger()
    assert asked and Path(asked[0][2]) == demo_project / "packs"
