"""The ranking view's dialogs: a new batch to sample, export options, and error reports.

Each dialog only gathers settings; the view's methods do the work, so tests (and the main
window) call those methods with paths and never open a modal dialog.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox,
                               QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QMessageBox, QPushButton, QSpinBox, QVBoxLayout,
                               QWidget)

from engine.config import ConfigError
from engine.sample import PromptFileError, SampleConfig, read_prompts
from ui import file_dialogs
from workbench.project import Project, ProjectError
from workbench.stages import stage_of_folder

Checkpoints = Callable[[], "list[tuple[str, Path]]"]


def show_error(parent: QWidget | None, title: str, error: Exception,
               go_on: str | None = None) -> bool:
    """An error in a message box: the first lines in view, every `FILE:LINE: reason` of an
    input error under "Show Details" so a long list does not make a screen-high box. With
    `go_on`, a second button of that name; returns True if it was pressed."""
    box = QMessageBox(QMessageBox.Warning, title, str(error).split("\n")[0], QMessageBox.Close,
                      parent)
    problems = getattr(error, "problems", None)
    if problems:
        box.setInformativeText("\n".join(problems[:5]) + ("\n…" if len(problems) > 5 else ""))
        box.setDetailedText("\n".join(problems))
    elif "\n" in str(error):
        box.setDetailedText(str(error))
    go = box.addButton(go_on, QMessageBox.AcceptRole) if go_on else None
    box.exec()
    return go is not None and box.clickedButton() is go


def _row(*widgets: QWidget) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x, 1 if isinstance(x, (QLineEdit, QComboBox)) else 0)
    return w


class NewBatchDialog(QDialog):
    """Settings of a sample job whose answers become a ranking batch: `config()` is the
    engine.sample.SampleConfig (absolute paths) the view hands to the main window to run."""

    def __init__(self, project_dir: Path, checkpoints: Checkpoints, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New ranking batch")
        self.project_dir = Path(project_dir)
        self.checkpoint = QComboBox()
        for name, path in checkpoints():
            self.checkpoint.addItem(name, str(path))
        # Answers to rank come from an SFT (or PPO) model: the newest of those first, not a
        # newer GRPO or DPO run's.
        first = next((i for i in range(self.checkpoint.count())
                      if stage_of_folder(self.checkpoint.itemText(i)) in ("sft", "ppo")), 0)
        self.checkpoint.setCurrentIndex(first)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_checkpoint)
        self.prompts = QLineEdit()
        self.prompts.setPlaceholderText(".txt (one per line) or .jsonl with \"prompt\"; ; between files")
        try:
            files = Project.open(self.project_dir).data_files("prompts")
            self.prompts.setText("; ".join(map(str, files)))
        except ProjectError:
            pass   # a project without default prompts: the user picks a file
        add = QPushButton("Add files…")
        add.clicked.connect(self._add_prompts)
        self.k = QSpinBox(minimum=2, maximum=9, value=4)
        self.n_prompts = QSpinBox(minimum=0, maximum=1_000_000, value=50)
        self.n_prompts.setSpecialValueText("all")
        self.temperature = QDoubleSpinBox(minimum=0.05, maximum=5.0, singleStep=0.05, value=1.0)
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=0.95)
        self.max_new_tokens = QSpinBox(minimum=1, maximum=4096, value=64)
        self.seed = QSpinBox(minimum=0, maximum=2_147_483_647, value=0)
        self.error = QLabel()
        self.error.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Checkpoint", _row(self.checkpoint, browse))
        form.addRow("Prompt files", _row(self.prompts, add))
        form.addRow("Answers per prompt (K)", self.k)
        form.addRow("Prompts to sample", self.n_prompts)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Seed", self.seed)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Sample")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(QLabel("The answers are sampled as a job; the batch opens for ranking "
                             "when it is done."))
        lay.addWidget(buttons)

    def _browse_checkpoint(self) -> None:
        path = file_dialogs.existing_dir(self, "Checkpoint or run folder", str(self.project_dir))
        if path:
            self.add_checkpoint(Path(path))

    def add_checkpoint(self, path: Path) -> None:
        self.checkpoint.addItem(path.name, str(path))
        self.checkpoint.setCurrentIndex(self.checkpoint.count() - 1)

    def _add_prompts(self) -> None:
        files = file_dialogs.open_files(self, "Prompt files", str(self.project_dir),
                                        "Prompts (*.txt *.jsonl)")
        if files:
            current = [p for p in self.prompts.text().split(";") if p.strip()]
            self.prompts.setText("; ".join(current + files))

    def config(self) -> SampleConfig:
        """The sample job's settings; ConfigError names the field when one is wrong."""
        cfg = SampleConfig(
            checkpoint=self.checkpoint.currentData() or "",
            prompts=[str(Path(p.strip()).resolve()) for p in self.prompts.text().split(";")
                     if p.strip()],
            k=self.k.value(), n_prompts=self.n_prompts.value(),
            temperature=self.temperature.value(), top_p=self.top_p.value(),
            max_new_tokens=self.max_new_tokens.value(), seed=self.seed.value())
        cfg.validate()
        try:        # a job that could only fail is not started: the files are read here first
            read_prompts(cfg.prompts)
        except PromptFileError as e:
            raise ConfigError("prompts", e.problems[0] + (f" (and {len(e.problems) - 1} more)"
                                                         if len(e.problems) > 1 else "")) from None
        return cfg

    def accept(self) -> None:
        try:
            self.config()
        except ConfigError as e:
            self.error.setText(f"⚠ {e.field}: {e.message}")
            return
        super().accept()


# format -> (what the list says, the file ending it suggests); workbench.pref_formats has the
# other tools' layouts and refuses an ending they do not take.
EXPORT_FORMATS = {
    "kway": ("K-way rankings, ours (one record per ranking, ties kept)", ".jsonl"),
    "pairs": ("Pairs {prompt, chosen, rejected} (ties give none)", ".jsonl"),
    "hf": ("Hugging Face / TRL pairs, Parquet", ".parquet"),
    "hf-messages": ("Hugging Face / TRL conversational pairs, Parquet", ".parquet"),
    "label-studio": ("Label Studio ranker tasks (JSON)", ".json"),
    "argilla": ("Argilla v2 records with a ranking question (JSON)", ".json"),
}


class ExportDialog(QDialog):
    """Where and what to export; `options()` are export_rankings' keyword arguments."""

    def __init__(self, project_dir: Path, batch: tuple[int, str] | None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export preferences")
        self.format = QComboBox()
        for fmt, (text, suffix) in EXPORT_FORMATS.items():
            self.format.addItem(text, fmt)
        self.simulated = QCheckBox("Include simulated annotators (records are labelled)")
        self.repeats = QCheckBox("Include hidden repeat rankings")
        self.only_batch = QCheckBox(f"Only batch {batch[1]!r}" if batch else "Only this batch")
        self.only_batch.setEnabled(batch is not None)
        self.batch_id = batch[0] if batch else None
        self.path = QLineEdit(str(Path(project_dir) / "data" / "preferences.jsonl"))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.format.currentIndexChanged.connect(self._suggest_name)
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.format)
        for w in (self.simulated, self.repeats, self.only_batch):
            lay.addWidget(w)
        lay.addWidget(_row(self.path, browse))
        lay.addWidget(buttons)

    def fmt(self) -> str:
        return self.format.currentData()

    def set_format(self, fmt: str) -> None:
        self.format.setCurrentIndex(self.format.findData(fmt))

    def _suggest_name(self) -> None:
        p = Path(self.path.text())
        stem = p.stem.split("-")[0] if "-" in p.stem else p.stem
        fmt = self.fmt()
        tail = "" if fmt == "kway" else f"-{fmt}"
        self.path.setText(str(p.with_name(stem + tail + EXPORT_FORMATS[fmt][1])))

    def _browse(self) -> None:
        suffix = EXPORT_FORMATS[self.fmt()][1]
        path = file_dialogs.save_file(self, "Export to", self.path.text(),
                                      f"{self.format.currentText()} (*{suffix})")
        if path:
            self.path.setText(path)

    def options(self) -> dict:
        return {"fmt": self.fmt(),
                "include_simulated": self.simulated.isChecked(),
                "include_repeats": self.repeats.isChecked(),
                "batch_ids": [self.batch_id] if self.only_batch.isChecked() and self.batch_id else None}
