"""The sampling settings of chat and compare: six fields and a few named presets.

A preset sets how adventurous the sampling is (temperature, top-k, top-p, repetition penalty)
and leaves the answer length and the seed alone, which are about the task, not the style.
Editing any of those four fields by hand shows "Custom", so the preset box never claims a
setting that is no longer in force.
"""
from __future__ import annotations

from dataclasses import asdict

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QGridLayout, QLabel, QSpinBox, QWidget)

from engine.chat import SamplingSettings

# (temperature, top_k, top_p, repetition_penalty)
PRESETS: dict[str, tuple[float, int, float, float]] = {
    "Greedy": (0.0, 0, 1.0, 1.0),
    "Precise": (0.3, 20, 0.9, 1.1),
    "Balanced": (0.7, 50, 0.95, 1.0),
    "Creative": (1.0, 0, 0.98, 1.0),
}
CUSTOM = "Custom"
STYLE_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


class SamplingControls(QWidget):
    """Preset, temperature, top-k, top-p, max new tokens, repetition penalty and seed.

    `columns` lays the fields out in that many label+field columns: 1 for a side panel, 3 or
    more for a strip above two panes.
    """

    changed = Signal()

    def __init__(self, parent=None, *, columns: int = 1, settings: SamplingSettings | None = None):
        super().__init__(parent)
        self.preset = QComboBox()
        self.preset.addItems([*PRESETS, CUSTOM])
        self.preset.setToolTip("Named sampling styles; they leave max new tokens and the seed alone.")

        self.temperature = _double(0.0, 5.0, 0.05, 2,
                                   "Divides the logits: lower is more predictable, 0 is greedy.")
        self.top_k = _int(0, 100_000, "Sample only from the k most likely tokens (0 = off).")
        self.top_p = _double(0.01, 1.0, 0.01, 2,
                             "Sample from the smallest set of tokens whose probability reaches p (1 = off).")
        self.max_new_tokens = _int(1, 100_000, "The longest answer, in tokens.")
        self.repetition_penalty = _double(0.5, 3.0, 0.05, 2,
                                          "Above 1 makes tokens already in the text less likely (1 = off).")
        # QSpinBox cannot be empty, so its minimum stands for "no seed": a fresh draw each time.
        self.seed = _int(-1, 2**31 - 1, "Fix it to make answers reproducible; 'random' draws anew each time.")
        self.seed.setSpecialValueText("random")

        rows = [("Preset", self.preset), ("Temperature", self.temperature), ("Top-k", self.top_k),
                ("Top-p", self.top_p), ("Max new tokens", self.max_new_tokens),
                ("Repetition penalty", self.repetition_penalty), ("Seed", self.seed)]
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(8)
        for i, (text, w) in enumerate(rows):
            r, c = divmod(i, columns)
            label = QLabel(text)
            label.setBuddy(w)
            grid.addWidget(label, r, 2 * c)
            grid.addWidget(w, r, 2 * c + 1)
        if columns == 1:
            grid.setColumnStretch(1, 1)
        else:   # a strip: fields at their natural width, the spare room at the end
            grid.setColumnStretch(2 * columns, 1)

        self._applying = False
        self.set_settings(settings or SamplingSettings())
        self.preset.currentTextChanged.connect(self._on_preset)
        for name in STYLE_FIELDS:
            getattr(self, name).valueChanged.connect(self._on_style_edit)
        for w in (self.max_new_tokens, self.seed):
            w.valueChanged.connect(self.changed)

    def settings(self) -> SamplingSettings:
        seed = self.seed.value()
        return SamplingSettings(temperature=self.temperature.value(), top_k=self.top_k.value(),
                                top_p=self.top_p.value(), max_new_tokens=self.max_new_tokens.value(),
                                repetition_penalty=self.repetition_penalty.value(),
                                seed=None if seed < 0 else seed)

    def set_settings(self, s: SamplingSettings) -> None:
        self._applying = True
        try:
            for name, value in asdict(s).items():
                getattr(self, name).setValue(-1 if name == "seed" and value is None else value)
        finally:
            self._applying = False
        self._sync_preset()
        self.changed.emit()

    def apply_preset(self, name: str) -> None:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
        self.preset.setCurrentText(name)
        self._on_preset(name)

    def _on_preset(self, name: str) -> None:
        if self._applying or name not in PRESETS:
            return
        self._applying = True
        try:
            for field, value in zip(STYLE_FIELDS, PRESETS[name]):
                getattr(self, field).setValue(value)
        finally:
            self._applying = False
        self.changed.emit()

    def _on_style_edit(self) -> None:
        if not self._applying:
            self._sync_preset()
            self.changed.emit()

    def _sync_preset(self) -> None:
        values = tuple(getattr(self, f).value() for f in STYLE_FIELDS)
        name = next((n for n, p in PRESETS.items() if all(abs(a - b) < 1e-9 for a, b in zip(p, values))),
                    CUSTOM)
        self.preset.blockSignals(True)
        self.preset.setCurrentText(name)
        self.preset.blockSignals(False)


def _double(lo: float, hi: float, step: float, decimals: int, tip: str) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setDecimals(decimals)
    w.setToolTip(tip)
    return w


def _int(lo: int, hi: int, tip: str) -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setToolTip(tip)
    return w
