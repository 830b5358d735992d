"""One-off figures as a table, for the stages that report a few numbers once at the end (the
tokenizer's vocabulary and compression, the sample stage's answer statistics) rather than
curves over steps: a line plot of one point says less than the number. The plot grid
(ui/plots.py) shows this table instead of plots for these stages."""
from __future__ import annotations

import html

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel

from workbench.history import RunHistory
from workbench.plot_specs import FIGURES, figure_text  # noqa: F401 - FIGURES re-exported

WAITING = "The figures appear here when the run has finished."


class FigureTable(QLabel):
    """A row per figure, a column per run (one run, or several overlaid in the runs browser);
    then any metric the table does not name, so a figure added to the engine is seen without
    a UI change."""

    def __init__(self, stage: str, parent=None):
        super().__init__(parent)
        self.stage = stage
        self.setTextFormat(Qt.RichText)
        self.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setContentsMargins(12, 12, 12, 12)

    def show_runs(self, runs: list[tuple[str, RunHistory]]) -> None:
        named = list(FIGURES.get(self.stage, []))
        keys = {k for _, h in runs for k in h.series}
        named += [(key, key, "{:g}") for key in sorted(keys - {k for _, k, _ in named})]
        rows = []
        for title, key, fmt in named:
            cells = [figure_text(fmt, key, h) if key in h.series else "–" for _, h in runs]
            if any(c != "–" for c in cells):
                rows.append(f"<tr><td>{html.escape(title)}</td>"
                            + "".join(f"<td align='right'><b>{html.escape(c)}</b></td>" for c in cells)
                            + "</tr>")
        if not rows:
            self.setText(f"<p>{WAITING}</p>")
            return
        head = ("<tr><th></th>" + "".join(f"<th align='right'>{html.escape(name)}</th>" for name, _ in runs)
                + "</tr>") if len(runs) > 1 else ""
        self.setText(f"<table cellpadding='6' style='font-size:large'>{head}{''.join(rows)}</table>")
