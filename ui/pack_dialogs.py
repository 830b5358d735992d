"""The Rank page's Packs… menu: make annotation packs for a batch, merge them back
(workbench/packs.py says what a pack is; ui/pack_window.py ranks one)."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QDoubleSpinBox,
                               QFormLayout, QLabel, QLineEdit, QMessageBox, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from ui import file_dialogs
from ui.ranking_dialogs import _row, show_error
from workbench.pack_merge import merge_packs
from workbench.packs import PACK_SUFFIX, export_packs
from workbench.store import InputError, StoreError

PACK_FILTER = f"Annotation packs (*{PACK_SUFFIX});;All files (*)"


class MakePacksDialog(QDialog):
    """Who ranks, how many rank each item, and where the pack files go."""

    def __init__(self, batch_name: str, project_dir: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"Annotation packs for {batch_name!r}")
        self.annotators = QLineEdit()
        self.annotators.setPlaceholderText("ana, ben, chloe (one pack file each)")
        self.overlap = QSpinBox(minimum=1, maximum=50, value=2)
        self.overlap.setToolTip("each item is ranked by this many people: 2 or more lets the "
                                "Agreement tab measure how much they agree")
        self.repeats = QDoubleSpinBox(minimum=0, maximum=50, value=0, suffix=" %", decimals=0)
        self.repeats.setToolTip("a share of each pack's items comes back once more, unannounced, "
                                "to measure each annotator's consistency")
        self.folder = QLineEdit(str(project_dir / "packs"))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        form = QFormLayout()
        form.addRow("Annotators", self.annotators)
        form.addRow("Rankings per item", self.overlap)
        form.addRow("Hidden repeats", self.repeats)
        form.addRow("Write packs into", _row(self.folder, browse))
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Make packs")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Each annotator gets one file holding only their items, the answers "
                             "in a shuffled order and the guidelines. They open it with File ▸ "
                             "Open Annotation Pack… (no project needed) and send it back."))
        lay.itemAt(0).widget().setWordWrap(True)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self.setMinimumWidth(560)

    def _browse(self) -> None:
        folder = file_dialogs.existing_dir(self, "Folder for the packs", self.folder.text())
        if folder:
            self.folder.setText(folder)

    def names(self) -> list[str]:
        return [n.strip() for n in self.annotators.text().replace(";", ",").split(",") if n.strip()]


def make_packs(view) -> list[Path]:
    """Make packs for the batch selected on the view's start page; returns the files written."""
    batch = view.start.selected_batch()
    if batch is None:
        show_error(view, "Annotation packs", ValueError("Select the batch to hand out first."))
        return []
    name = view.store.batch(batch).name
    dialog = MakePacksDialog(name, view.project_dir, view)
    while True:     # a refusal shows the dialog again as it was filled in
        if not dialog.exec():
            return []
        names, overlap = dialog.names(), dialog.overlap.value()
        try:
            if names and overlap > len(names):
                raise ValueError(f"Rankings per item is {overlap}, but {len(names)} annotator(s) are named: "
                                 "each item needs that many different people")
            paths = export_packs(view.store, view.project_dir, batch, names, overlap,
                                 Path(dialog.folder.text()), repeat_fraction=dialog.repeats.value() / 100)
            break
        except (KeyError, ValueError, OSError, StoreError) as e:
            show_error(view, "Annotation packs", e)
    QMessageBox.information(view, "Annotation packs", (
        f"Wrote {len(paths)} pack(s) into {paths[0].parent}:\n"
        + "\n".join(p.name for p in paths)
        + "\n\nWhen they come back, merge them with Packs… ▸ Merge annotation packs…"))
    return paths


def merge_pack_files(view) -> str:
    """Ask for pack files and merge them into the project; returns the summary shown."""
    folder = view.project_dir / "packs"     # where Make packs writes them by default
    paths = file_dialogs.open_files(
        view, "Merge annotation packs (select several)",
        str(folder if folder.is_dir() else view.project_dir), PACK_FILTER)
    if not paths:
        return ""
    try:
        results = merge_packs(view.store, [Path(p) for p in paths])
    except (InputError, ValueError, StoreError) as e:
        show_error(view, "Merge refused", e)
        return ""
    view.refresh()
    text = "\n".join(r.line() for r in results)
    conflicts = [c for r in results for c in r.conflicts]
    box = QMessageBox(QMessageBox.Information, "Merged annotation packs", text, QMessageBox.Close,
                      view)
    if conflicts:
        box.setInformativeText(f"{len(conflicts)} conflict(s): the project's ranking was kept.")
        box.setDetailedText("\n".join(conflicts))
    box.exec()
    return text
