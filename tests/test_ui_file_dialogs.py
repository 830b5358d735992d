"""The app's file dialogs list a project folder without reading workbench.db: on Linux, a read
of it by any other descriptor drops the app's SQLite locks, after which another process may
delete the write-ahead log the app still writes to (and every ranking after that is lost)."""
import os
from pathlib import Path

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QFileDialog, QFileSystemModel

from ui import file_dialogs
from workbench.store import DB_NAME, Store

LOCKS = Path("/proc/locks")


def held_locks(path: Path) -> int:
    """How many POSIX locks this process holds on `path` (Linux's /proc/locks)."""
    inode = os.stat(path).st_ino
    return sum(1 for line in LOCKS.read_text().splitlines()
               if line.split()[4] == str(os.getpid()) and line.split()[5].endswith(f":{inode}"))


@pytest.mark.skipif(not LOCKS.exists(), reason="needs Linux's /proc/locks")
@pytest.mark.parametrize("choose", [
    lambda folder: file_dialogs.open_file(None, "Import", str(folder)),
    lambda folder: file_dialogs.save_file(None, "Export", str(folder / "out.jsonl")),
    lambda folder: file_dialogs.open_files(None, "Files", str(folder), "All files (*);;Data (*.jsonl)"),
])
def test_a_dialog_on_the_project_folder_leaves_the_stores_locks_alone(qtbot, tmp_path, choose):
    with Store.for_project(tmp_path) as store:
        store.batches()
        before = held_locks(tmp_path / DB_NAME)
        assert before > 0
        listed, looks = [], []

        def when_listed():
            looks.append(1)
            dialog = next((w for w in QApplication.topLevelWidgets()
                           if isinstance(w, QFileDialog) and w.isVisible()), None)
            model = dialog.findChild(QFileSystemModel) if dialog is not None else None
            names = ([model.index(r, 0, model.index(str(tmp_path))).data()
                      for r in range(model.rowCount(model.index(str(tmp_path))))] if model else [])
            if DB_NAME in names or len(looks) > 3000:   # its row is in: the file was looked over
                listed.append(DB_NAME in names)
                if dialog is not None:
                    dialog.reject()
            else:
                QTimer.singleShot(20, when_listed)
        QTimer.singleShot(0, when_listed)
        assert choose(tmp_path) in ("", [])
        assert listed == [True] and held_locks(tmp_path / DB_NAME) == before
