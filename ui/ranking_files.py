"""The Rank page's preference files: import a K-way, pairs or transcript file as a batch, and
export rankings in any of workbench.pref_formats' forms, as a part of RankingView.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from ui import file_dialogs
from ui.ranking_dialogs import ExportDialog, show_error
from workbench.preferences import ImportResult, export_rankings, import_preferences
from workbench.store import InputError


def import_message(result: ImportResult, batch: str, names: dict[int, str]) -> str:
    """What an import did, for a person: new rankings, and what was left out and why."""
    unit, n, of = result.held
    if result.existing:
        bad = (f" {len(result.skipped)} bad record(s) were left out." if result.skipped else "")
        return (f"Every {unit} in this file ({n}{of}) is already in the project, the first in "
                f"batch {batch!r}. Nothing was imported.{bad}" if result.already else
                f"This file was imported before, as batch {batch!r}.")
    left = [f"{len(result.skipped)} bad record(s)"] if result.skipped else []
    left += [f"{n} {unit}(s){of} already in the project"] if result.already else []
    leaving = ", leaving out " + " and ".join(left) if left else ""
    if result.joined:
        made = (f"; the other {result.records - result.joined} of {result.items} new item(s) as batch "
                f"{batch!r}" if result.items else "")
        return f"Imported {result.records} ranking(s): {result.joined_clause(names)}{made}{leaving}."
    return f"Imported {result.records} ranking(s) of {result.items} item(s) as batch {batch!r}{leaving}."


class PreferenceFiles:
    """Mixed into RankingView (which provides `store`, `start`, `project_dir` and `refresh`)."""

    def import_preferences(self, path: Path, *, annotator: str | None = None,
                           simulated: bool = False, skip_bad: bool = False) -> ImportResult:
        """Import a K-way, pairs or transcript JSONL file as a batch (InputError lists every
        bad record as FILE:LINE: reason, and nothing is imported unless skip_bad)."""
        result = import_preferences(self.store, Path(path), annotator=annotator,
                                    simulated=simulated, on_error="skip" if skip_bad else "raise")
        # A file whose every ranking the project holds made no batch: the selection stays (a
        # Start then ranks the batch the person had picked, not the one the rankings are in).
        self.refresh(select=None if result.already and result.existing else result.batch_id)
        return result

    def export_preferences(self, path: Path, *, fmt: str = "kway", include_simulated: bool = False,
                           include_repeats: bool = False, batch_ids: list[int] | None = None) -> dict:
        """Write rankings as K-way records or pairs; returns export_rankings' counts."""
        return export_rankings(self.store, Path(path), include_simulated=include_simulated,
                               fmt=fmt, batch_ids=batch_ids, include_repeats=include_repeats)

    def import_clicked(self) -> None:
        path = file_dialogs.open_file(
            self, "Import preferences", str(self.project_dir),
            "Preference data (*.jsonl *.jsonl.gz *.json *.parquet);;All files (*)")
        if not path:
            return
        try:
            try:
                result = self.import_preferences(Path(path))
            except InputError as e:
                # Public preference sets often hold a few bad records: offer to leave them out.
                if not show_error(self, "Import refused", e, go_on="Import the other records"):
                    return
                result = self.import_preferences(Path(path), skip_bad=True)
        except (OSError, ValueError) as e:      # InputError too, when no record is good
            show_error(self, "Import failed", e)
            return
        batch = self.store.batch(result.batch_id)
        names = {b.id: b.name for b in self.store.batches()}
        QMessageBox.information(self, "Import", import_message(result, batch.name, names))

    def export_clicked(self) -> None:
        batch = self.start.selected_batch()
        name = self.store.batch(batch).name if batch is not None else ""
        dialog = ExportDialog(self.project_dir, (batch, name) if batch is not None else None, self)
        if not dialog.exec():
            return
        path = Path(dialog.path.text())
        if path.is_file() and QMessageBox.question(
                self, "Replace the file?", f"{path} already exists. Replace it with the export?",
                QMessageBox.Yes | QMessageBox.No, QMessageBox.No) != QMessageBox.Yes:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            counts = self.export_preferences(path, **dialog.options())
        except (OSError, ValueError) as e:
            show_error(self, "Export failed", e)
            return
        QMessageBox.information(self, "Export", (
            f"Wrote {counts['records']} record(s) from {counts['rankings']} ranking(s) "
            f"({counts['human']} human, {counts['simulated']} simulated) to {path}."))
