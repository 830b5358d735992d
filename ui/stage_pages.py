"""The stage panels that need more than the generic one: the tokenizer (inspect what it
learned) and the stages that train on rankings (the reward model, DPO: train on the rankings
made in this project)."""
from __future__ import annotations

import sqlite3

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QSpinBox

from workbench import runfolder, stages
from workbench.preferences import count_for_training
from workbench.stages import Parent
from workbench.store import Store, StoreError
from ui.stage_panel import StagePanel
from ui.token_view import TokenInspector

RECOUNT_MS = 3000


class TokenizerPanel(StagePanel):
    def __init__(self, ctx, parent=None):
        super().__init__(ctx, "tokenizer", parent)
        self.inspector = TokenInspector()
        self.tabs.insertTab(0, self.inspector, "Inspect")
        self.runSelected.connect(self._inspect)
        # A run that finishes while shown has a tokenizer now: inspect it.
        ctx.jobFinished.connect(lambda job: self._inspect(self.run.name if self.run else "")
                                if job.stage == "tokenizer" else None)
        self._inspect(self.run.name if self.run else "")

    def _inspect(self, name: str) -> None:
        info = self.ctx.run(name) if name else None
        if info is None:
            # A new run: inspect the newest finished tokenizer, if any.
            path = self.ctx.newest(Parent("tokenizer", "tokenizer", ("tokenizer",)))
        else:
            path = info.path
        self.inspector.set_tokenizer(path if path is not None and (path / "tokenizer.json").exists() else None)
        if path is not None and (path / "tokenizer.json").exists():
            self.tabs.setCurrentWidget(self.inspector)


class RankingsPanel(StagePanel):
    """Adds 'train on this project's rankings': written into the run folder at Start, so the
    run is reproducible from its folder even after more rankings are made."""
    def __init__(self, ctx, stage: str, parent=None):
        self.use_store = None       # the base class shows a run (and previews) before these exist
        # The config field the rankings go into (the catalogue's Data marked rankings).
        self.rankings_field = next(d.field for d in stages.spec(stage).data if d.rankings)
        super().__init__(ctx, stage, parent)
        self.use_store = QCheckBox("Train on this project's rankings")
        self.use_simulated = QCheckBox("include simulated rankings")
        self.use_store.setToolTip("Export the rankings made in this project (Sample & Rank) into the "
                                  "run folder as rankings.jsonl when the run starts")
        self.use_simulated.setToolTip("Rankings by the simulated annotator are kept apart from people's; "
                                      "include them only for demos and tests")
        self.counts = QLabel()
        self.counts.setWordWrap(True)       # with its tied ones said, wider than the settings column
        row = QHBoxLayout()
        row.addWidget(self.use_store)
        row.addWidget(self.use_simulated)
        row.addStretch(1)
        self.extra.addLayout(row)
        for row in self._agreement_rows():
            self.extra.addLayout(row)
        self.extra.addWidget(self.counts)
        for box in (self.use_store, self.use_simulated, self.use_threshold, self.use_borda):
            box.toggled.connect(self._apply)
        self.threshold.valueChanged.connect(self._apply)
        self._chosen = False        # until the user clicks a box, the boxes follow the counts
        for box in (self.use_store, self.use_simulated):
            box.clicked.connect(self._user_chose)
        ctx.runsChanged.connect(self._runs_changed)
        # Rankings come from other pages, windows and terminals, none of which signals here:
        # while on screen the count is taken again every few seconds.
        self._recount = QTimer(self, interval=RECOUNT_MS)
        self._recount.timeout.connect(self._count_if_changed)
        self._stamp = None
        self._count()

    def _agreement_rows(self) -> list[QHBoxLayout]:
        """How items people disagree on are used (workbench.agreement_items.for_training)."""
        self.use_threshold = QCheckBox("only items whose annotators agree on at least")
        self.threshold = QSpinBox()
        self.threshold.setRange(0, 100)
        self.threshold.setValue(60)
        self.threshold.setSuffix(" % of pairs")
        self.use_threshold.setToolTip(
            "Leave out items whose rankings agree on fewer answer pairs than this (the Agreement "
            "tab of Sample & Rank lists each item's). Items ranked by one person are kept.")
        self.use_borda = QCheckBox("one ranking per item (Borda count)")
        self.use_borda.setToolTip(
            "Train on one ranking per item: its answers ordered by their Borda points summed over "
            "everyone's rankings (equal points tie), instead of on every ranking of it")
        rows = [QHBoxLayout(), QHBoxLayout()]    # two: the panel's column is narrow
        for row, widgets in zip(rows, [(self.use_threshold, self.threshold), (self.use_borda,)]):
            for w in widgets:
                row.addWidget(w)
            row.addStretch(1)
        return rows

    def _user_chose(self, *_) -> None:
        self._chosen = True

    def _runs_changed(self) -> None:
        # A streaming job changes the runs every few seconds; a hidden page counts when shown.
        if self.isVisible():
            self._count_if_changed()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._count()
        self._recount.start()

    def hideEvent(self, event) -> None:
        super().hideEvent(event)
        self._recount.stop()

    def _count_if_changed(self) -> None:
        # Counting reads every ranking (a quarter second at 28,000): only when one changed.
        try:
            with Store.for_project(self.ctx.path) as store:
                changed = store.rankings_stamp() != self._stamp
        except (StoreError, OSError, sqlite3.Error):
            changed = True          # _count says what is wrong
        if changed:
            self._count()

    def _count(self) -> None:
        try:
            with Store.for_project(self.ctx.path) as store:
                self._stamp = store.rankings_stamp()
                human, simulated, tied = count_for_training(store)
        except (StoreError, OSError, sqlite3.Error) as e:     # the project folder moved away, a broken store
            self.counts.setText(f"The project's rankings cannot be read: {e}")
            return
        self._n = (human, simulated)
        # Tied ones are said: the Rank page counts every item ranked, this page only those with a pair.
        more = f" ({tied} more tie every answer: no pair to learn from)" if tied else ""
        self.counts.setText(f"{human} human and {simulated} simulated rankings in this project{more}")
        if not self._chosen:
            # People's rankings when there are any; the simulated ones only when they are all
            # there is (the demo), since mixing them in is a choice the user should make.
            self.use_store.setChecked(human + simulated > 0)
            self.use_simulated.setChecked(human == 0 and simulated > 0)
        self._apply()

    def _on_project_rankings(self) -> bool:
        """Start takes the project's rankings as they are now: for a new run, and for one started
        from a finished run that trained on them (its own copy is of that day's rankings)."""
        return self.use_store is not None and self.use_store.isChecked() and self._takes_rankings(self.run)

    def _takes_rankings(self, info) -> bool:
        try:
            return info is None or runfolder.read_config(info.path).get(self.rankings_field) == [runfolder.RANKINGS]
        except runfolder.RunFolderError:
            return False

    def _apply(self, *_):
        on = self.use_store.isChecked()
        for w in (self.use_simulated, self.use_threshold, self.use_borda):
            w.setEnabled(on)
        self.threshold.setEnabled(on and self.use_threshold.isChecked())
        self.form.set_override(self.rankings_field, [runfolder.RANKINGS] if self._on_project_rankings() else None)
        # The preview reads every ranking: only when what Start would write has changed.
        key = (self._on_project_rankings(), self._choice(), getattr(self, "_n", None))
        if key != getattr(self, "_previewed", None):
            self._previewed = key
            self.refresh_preview()

    def show_run(self, info) -> None:
        super().show_run(info)
        if self.use_store is not None:
            self.use_store.setEnabled(self._takes_rankings(info))
            self._apply()

    def refresh_preview(self) -> None:
        if self._on_project_rankings():
            # What Start will write into the run folder, read from the store as it will be.
            self.preview.show_project_rankings(self.ctx.path, self._choice())
            return
        super().refresh_preview()

    def _choice(self) -> runfolder.Rankings:
        return runfolder.Rankings(
            include_simulated=self.use_simulated.isChecked(),
            min_agreement=self.threshold.value() / 100 if self.use_threshold.isChecked() else None,
            aggregate="borda" if self.use_borda.isChecked() else "each")

    def rankings(self) -> runfolder.Rankings | None:
        if not self._on_project_rankings():
            return None
        return self._choice()


def make_panel(ctx, stage: str) -> StagePanel:
    if stage == "tokenizer":
        return TokenizerPanel(ctx)
    if any(d.rankings for d in stages.spec(stage).data):
        return RankingsPanel(ctx, stage)
    return StagePanel(ctx, stage)
