"""The stage panels that need more than the generic one: the tokenizer (inspect what it
learned) and the reward model (train on the rankings made in this project)."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel

from workbench.preferences import count_for_training, write_rm_dataset
from workbench.store import Store
from ui.stage_panel import StagePanel
from ui.token_view import TokenInspector

BLURBS = {
    "tokenizer": "Learn a byte-level BPE vocabulary from the corpus, with the chat template's special "
                 "tokens. Every later stage uses it.",
    "pretrain": "Train a small GPT-style model from scratch to predict the next token of the corpus. "
                "Watch the validation loss fall below the unigram baseline.",
    "sft": "Supervised fine-tuning: teach the pretrained model to answer, on prompt/response pairs "
           "rendered through the chat template. Only the answer tokens are trained on.",
    "sample": "Sample K answers per prompt from a checkpoint, to be ranked.",
    "reward": "Train a reward model on the rankings: a scalar head on the SFT model, scored on every "
              "pair of each ranking. Held-out pairwise accuracy says how well it agrees with people.",
    "ppo": "Optimise the SFT policy against the reward model with PPO, held near the SFT model by a "
           "KL penalty. Watch score, KL and entropy together: a score that rises while KL explodes "
           "is reward hacking.",
}
TITLES = {"tokenizer": "Tokenizer", "pretrain": "Pretrain", "sft": "Supervised fine-tuning",
          "sample": "Sample answers", "reward": "Reward model", "ppo": "PPO"}


class TokenizerPanel(StagePanel):
    def __init__(self, ctx, parent=None):
        super().__init__(ctx, "tokenizer", TITLES["tokenizer"], BLURBS["tokenizer"], parent)
        self.inspector = TokenInspector()
        self.tabs.insertTab(0, self.inspector, "Inspect")
        self.runSelected.connect(self._inspect)
        self._inspect(self.run.name if self.run else "")

    def _inspect(self, name: str) -> None:
        info = self.ctx.run(name) if name else None
        if info is None:
            # A new run: inspect the newest finished tokenizer, if any.
            newest = self._newest("tokenizer")
            path = newest
        else:
            path = info.path
        self.inspector.set_tokenizer(path if path is not None and (path / "tokenizer.json").exists() else None)
        if path is not None and (path / "tokenizer.json").exists():
            self.tabs.setCurrentWidget(self.inspector)


class RewardPanel(StagePanel):
    """Adds 'train on this project's rankings': written into the run folder at Start, so the
    run is reproducible from its folder even after more rankings are made."""
    DATA_FILE = "rankings.jsonl"

    def __init__(self, ctx, parent=None):
        super().__init__(ctx, "reward", TITLES["reward"], BLURBS["reward"], parent)
        self.use_store = QCheckBox("Train on this project's rankings")
        self.use_simulated = QCheckBox("include simulated rankings")
        self.use_store.setToolTip("Export the rankings made in this project (Sample & Rank) into the "
                                  "run folder as rankings.jsonl when the run starts")
        self.use_simulated.setToolTip("Rankings by the simulated annotator are kept apart from people's; "
                                      "include them only for demos and tests")
        self.counts = QLabel()
        row = QHBoxLayout()
        row.addWidget(self.use_store)
        row.addWidget(self.use_simulated)
        row.addStretch(1)
        self.extra.addLayout(row)
        self.extra.addWidget(self.counts)
        self.use_store.toggled.connect(self._apply)
        self.use_simulated.toggled.connect(self._apply)
        self._chosen = False        # until the user clicks a box, the boxes follow the counts
        for box in (self.use_store, self.use_simulated):
            box.clicked.connect(self._user_chose)
        ctx.runsChanged.connect(self._runs_changed)
        self._count()

    def _user_chose(self, *_) -> None:
        self._chosen = True

    def _runs_changed(self) -> None:
        # A streaming job changes the runs every few seconds; a hidden page counts when shown.
        if self.isVisible():
            self._count()

    def showEvent(self, event) -> None:
        # Rankings are made on another page, which does not signal each one: count on arrival.
        super().showEvent(event)
        self._count()

    def _count(self) -> None:
        with Store.for_project(self.ctx.path) as store:
            human, simulated = count_for_training(store)
        self._n = (human, simulated)
        self.counts.setText(f"{human} human and {simulated} simulated rankings in this project")
        if not self._chosen:
            # People's rankings when there are any; the simulated ones only when they are all
            # there is (the demo), since mixing them in is a choice the user should make.
            self.use_store.setChecked(human + simulated > 0)
            self.use_simulated.setChecked(human == 0 and simulated > 0)
        self._apply()

    def _apply(self, *_):
        on = self.use_store.isChecked() and self.run is None
        self.use_simulated.setEnabled(self.use_store.isChecked())
        self.form.set_override("data", [self.DATA_FILE] if on else None)

    def show_run(self, info) -> None:
        super().show_run(info)
        if hasattr(self, "use_store"):
            self.use_store.setEnabled(info is None)
            self._apply()

    def refresh_preview(self) -> None:
        if getattr(self, "use_store", None) is not None and self.use_store.isChecked() and self.run is None:
            self._data_ok = True        # the rankings are written at Start; the count says what
            self._update_buttons()
            return
        super().refresh_preview()

    def prepare_run_dir(self, run_dir: Path) -> None:
        if self.use_store.isChecked():
            with Store.for_project(self.ctx.path) as store:
                n = write_rm_dataset(store, run_dir / self.DATA_FILE,
                                     include_simulated=self.use_simulated.isChecked())
            if n == 0:
                raise ValueError("There are no rankings to train on yet: rank some answers in Sample & Rank "
                                 "(or include simulated rankings).")


def make_panel(ctx, stage: str) -> StagePanel:
    if stage == "tokenizer":
        return TokenizerPanel(ctx)
    if stage == "reward":
        return RewardPanel(ctx)
    return StagePanel(ctx, stage, TITLES[stage], BLURBS[stage])
