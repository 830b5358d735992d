"""An annotation pack ranked in a window of its own (File ▸ Open annotation pack…, or
`workbench pack open FILE`): no project needed.

A pack window is the ranking view on the pack's own store (workbench/packs.py): the same cards,
keys, undo, skip and hidden repeats, every ranking committed to the pack file as it is made.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QApplication, QMainWindow, QWidget

from ui import file_dialogs
from ui.pack_dialogs import PACK_FILTER
from ui.ranking_dialogs import show_error
from ui.ranking_view import RankingView
from ui.app import fit_to_screen
from workbench.packs import Pack, PackGuidelines, open_pack
from workbench.store import StoreError


class PackRankingView(RankingView):
    """The ranking view on one pack: its batch, its annotator, nothing of a project."""

    def __init__(self, pack: Pack, parent: QWidget | None = None):
        self.pack = pack
        super().__init__(pack.path.parent, parent, checkpoints=lambda: [], store=pack.store,
                         guides=PackGuidelines(pack))
        self.start.set_pack_mode(pack.info.annotator, str(pack.path))
        self.tabs.setTabVisible(1, False)    # agreement needs the others' rankings: the project's
        self.tabs.tabBar().setVisible(False)
        self.open_session(pack.batch_id, pack.info.annotator)

    def _load(self) -> None:
        super()._load()
        if self.current is None:
            p = self.session.progress()
            self.page.done.setText(
                f"All {p.total} items of this pack are ranked and saved in {self.pack.path}.\n"
                "Send that file back to whoever gave it to you. Ctrl+Z still undoes the last "
                "ranking.")


class PackWindow(QMainWindow):
    """A top-level window ranking one pack; closing it closes the pack file."""

    def __init__(self, pack: Pack):
        super().__init__()
        self.setWindowTitle(f"{pack.info.batch} · {pack.info.annotator} — annotation pack")
        self.view = PackRankingView(pack, self)
        self.setCentralWidget(self.view)
        self.statusBar().showMessage(f"Saving each ranking into {pack.path}")
        fit_to_screen(self, 1200, 850)
        # Ctrl+Q quits here too, as in the main window: every window closes (each ranking is
        # already in the pack file).
        QShortcut(QKeySequence("Ctrl+Q"), self, QApplication.closeAllWindows)

    def closeEvent(self, event) -> None:
        self.view.close_store()
        super().closeEvent(event)


def open_pack_window(path: Path, parent: QWidget | None = None) -> PackWindow | None:
    """Open a pack in its own window (shown); None, after an error box, if it is not a pack."""
    try:
        pack = open_pack(path)
    except (ValueError, StoreError) as e:
        show_error(parent, "Open annotation pack", e)
        return None
    window = PackWindow(pack)
    window.show()
    window.view.setFocus()
    return window


def choose_and_open_pack(parent: QWidget | None, start: Path | None = None) -> PackWindow | None:
    """`start`: the folder the file dialog opens in (the open project's packs, where Make packs
    writes them)."""
    folder = str(start) if start is not None and start.is_dir() else ""
    path = file_dialogs.open_file(parent, "Open annotation pack", folder, PACK_FILTER)
    return open_pack_window(Path(path), parent) if path else None
