"""Export… on a run: its newest checkpoint as a Hugging Face folder or a GGUF file.

The export runs on a worker thread (a large model takes a while to write) and the dialog says
where it went, or the one-line reason it could not.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QMessageBox, QPushButton, QVBoxLayout)

from ui import file_dialogs
from ui.workers import Worker

# (label, format, GGUF weight type, Hugging Face weight type)
CHOICES = [("Hugging Face folder (transformers), float32", "hf", "f16", "float32"),
           ("Hugging Face folder, bfloat16 (half the size)", "hf", "f16", "bfloat16"),
           ("GGUF, 16-bit (llama.cpp, Ollama, LM Studio)", "gguf", "f16", "float32"),
           ("GGUF, 8-bit q8_0 (about half the size)", "gguf", "q8_0", "float32")]


def _export(source: Path, fmt: str, out: Path, gguf_type: str, dtype: str, *, emit, cancelled) -> Path:
    from engine.export import export
    return export(source, fmt, out, gguf_type, dtype)


class ExportDialog(QDialog):
    def __init__(self, run_dir: Path, reward_model: bool = False, parent=None):
        super().__init__(parent)
        self.run_dir = Path(run_dir)
        self.setWindowTitle(f"Export {self.run_dir.name}")
        self.worker: Worker | None = None
        self.format = QComboBox()
        for label, fmt, _t, _d in CHOICES:
            if fmt == "hf" or not reward_model:     # a reward model has no GGUF form
                self.format.addItem(label)
        self.path = QLineEdit()
        self._auto: str | None = None       # the path _default_path last filled in, not typed
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.format.currentIndexChanged.connect(lambda _i: self._default_path())
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Format", self.format)
        form.addRow("Save to", row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.buttons = QDialogButtonBox()
        self.export_btn = self.buttons.addButton("Export", QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.export_btn.clicked.connect(self.start)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.status)
        lay.addWidget(self.buttons)
        self._default_path()
        self.resize(620, self.sizeHint().height())

    def choice(self) -> tuple[str, str, str]:
        """(format, GGUF weight type, Hugging Face weight type) of the choice shown."""
        label = self.format.currentText()
        return next(c[1:] for c in CHOICES if c[0] == label)

    def _default_path(self) -> None:
        """A path for the format chosen: in the project's exports folder, or, once the user typed
        or browsed to one, theirs with the format's ending (a folder for hf, a .gguf file)."""
        fmt, gguf_type, dtype = self.choice()
        typed = self.path.text().strip()
        if typed and typed != self._auto:
            stem = typed[:-len(".gguf")] if typed.endswith(".gguf") else typed
            self.path.setText(stem if fmt == "hf" else f"{stem}.gguf")
            return
        base = self.run_dir.parent.parent / "exports" / self.run_dir.name
        hf = str(base) if dtype == "float32" else f"{base}-{dtype}"
        self._auto = hf if fmt == "hf" else f"{base}-{gguf_type}.gguf"
        self.path.setText(self._auto)

    def _browse(self) -> None:
        fmt = self.choice()[0]
        if fmt == "hf":
            chosen = file_dialogs.existing_dir(self, "Folder for the Hugging Face model", self.path.text())
        else:
            chosen = file_dialogs.save_file(self, "GGUF file", self.path.text(), "GGUF (*.gguf)")
        if chosen:
            self.path.setText(chosen)

    def start(self) -> None:
        fmt, gguf_type, dtype = self.choice()
        out = Path(self.path.text().strip()).expanduser()
        if not self.path.text().strip():
            self.status.setText("Choose where to save it.")
            return
        if out.exists() and (out.is_file() or any(out.iterdir())):
            from engine.export import check_out      # torch: not at the app's start
            try:
                check_out(fmt, out)         # not an earlier export: say why, and ask nothing
            except ValueError as e:
                self.status.setText(f"Not exported: {e}")
                return
            if QMessageBox.question(self, "Replace the earlier export?",
                                    f"{out} holds a model (an earlier export?): its weights, "
                                    "config and tokenizer files would be replaced. Replace them?",
                                    QMessageBox.Yes | QMessageBox.No, QMessageBox.No) != QMessageBox.Yes:
                self.status.setText(f"Not exported: {out} is kept as it was.")
                return
        self.export_btn.setEnabled(False)
        self.status.setText("Exporting…")
        self.worker = Worker(_export, self.run_dir, fmt, out, gguf_type, dtype)
        self.worker.finished.connect(lambda p: self.status.setText(f"Exported to {p}"))
        self.worker.errored.connect(lambda msg: self.status.setText(f"Not exported: {msg}"))
        self.worker.done.connect(lambda: self.export_btn.setEnabled(True))
        self.worker.start()
