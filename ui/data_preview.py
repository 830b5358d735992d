"""A stage's input data, previewed before the job starts, so bad data is caught at Start.

The stage panel calls one `show_*` per kind of data; the files are read in a `Worker` thread by
the engine's own readers (the parsers the job will use, so what passes here passes there), and
the widget shows counts, the first records, and every `FILE:LINE` problem. `validated(ok,
problems)` tells the panel whether Start may run. A newer request cancels the older one, and an
older result that still arrives is dropped.

For SFT with a tokenizer, each example is drawn through the chat template (`render_chat`, as SFT
renders it) with the loss mask visible: the tokens trained on highlighted, the context dimmed.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QPalette, QTextCursor
from PySide6.QtWidgets import (QHBoxLayout, QHeaderView, QLabel, QPlainTextEdit, QSpinBox,
                               QSplitter, QStackedWidget, QTreeWidget, QTreeWidgetItem,
                               QVBoxLayout, QWidget)

from engine.corpus import CorpusError, check_nonempty, list_corpus_files
from engine.sample import PromptFileError, read_prompts
from engine.sft_data import SFTDataError, read_records, render
from engine.tokenizer import TokenizerError, load_tokenizer
from engine.transcripts import fold_copies
from ui.token_view import Piece, TokenView, blend, chat_pieces, is_dark
from ui.workers import Worker
from workbench.pref_records import read_preferences
from workbench.runfolder import Rankings

HEAD_LINES = 40
HEAD_BYTES = 64 * 1024
DEFAULT_SHOWN = 20
DEFAULT_SEQ_LEN = 256      # the "small" preset's context; the panel sets the model's own
RENDER_CHUNK = 256         # records rendered between cancellation checks
MAX_PIECES = 2000          # tokens drawn per example
ERROR_BOX_HEIGHT = 180     # when records are previewed below it
QWIDGETSIZE_MAX = (1 << 24) - 1
LEGEND = ("Highlighted tokens are trained on (each answer and the end-of-turn token that closes it); "
          "dimmed tokens are context. Hover a token for its id.")


@dataclass
class Request:
    paths: list[Path]
    tokenizer: Path | None = None
    shown: int = DEFAULT_SHOWN
    seq_len: int = DEFAULT_SEQ_LEN
    simulated: bool = False         # project rankings: the simulated annotator's too
    choice: Rankings | None = None  # project rankings: what Start will write


@dataclass
class PreviewExample:
    """One SFT record as previewed; `pieces` is None without a tokenizer."""
    where: str
    messages: list[dict]
    pieces: list[Piece] | None = None
    n_tokens: int = 0
    n_targets: int = 0


@dataclass
class Preview:
    kind: str
    problems: list[str] = field(default_factory=list)
    summary: str = ""
    note: str = ""
    files: list[tuple[Path, int]] = field(default_factory=list)
    head: str = ""
    examples: list[PreviewExample] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    records: list[tuple[str, object]] = field(default_factory=list)  # (file name, preference Record)


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- reading (in the worker thread; no Qt) ----------------------------------------------------

def load_pretrain(req: Request, emit: Callable, cancelled: Callable) -> Preview | None:
    try:
        files = list_corpus_files(req.paths)
    except CorpusError as e:
        return Preview("pretrain", [str(e)])
    sizes = [(f, f.stat().st_size) for f in files]
    total = sum(s for _, s in sizes)
    out = Preview("pretrain", files=sizes,
                  summary=f"{len(files):,} file{'s' * (len(files) != 1)} · {size_text(total)}")
    # The head of every file: one in another encoding (Latin-1, UTF-16) shows there. The stage
    # itself reads every byte; a fault deep in a large file is found by it.
    for i, path in enumerate(files):
        if cancelled():
            return None
        with open(path, "rb") as f:
            raw = f.read(HEAD_BYTES)
        # final=False: a character cut by the byte limit is left out, not reported as bad UTF-8
        try:
            text = codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=False)
        except UnicodeDecodeError as e:
            out.problems.append(f"{path}: invalid UTF-8 at byte offset {e.start}")
            text = raw[:e.start].decode("utf-8-sig", "ignore")
        if i == 0:
            out.head = "\n".join(text.splitlines()[:HEAD_LINES])
    if not out.problems:
        try:   # stops at the first non-blank character, so usually reads one chunk
            check_nonempty(files)
        except CorpusError as e:
            out.problems.append(str(e))
    return out


def load_sft(req: Request, emit: Callable, cancelled: Callable) -> Preview | None:
    try:
        records = read_records(req.paths)
    except SFTDataError as e:
        return Preview("sft", e.problems)
    out = Preview("sft", summary=f"{len(records):,} examples", note=LEGEND)
    tok = None
    if req.tokenizer is not None:
        try:
            tok = load_tokenizer(req.tokenizer)
        except TokenizerError as e:
            out.note = f"{e}: showing plain text."
    if tok is None:
        if req.tokenizer is None:
            out.note = "Choose a tokenizer to see the tokens and which ones are trained on."
        out.examples = [PreviewExample(f"{r.file.name}:{r.line}", r.messages) for r in records[:req.shown]]
        return out
    # sft_data.render is what SFT itself runs, so its truncation and skip counts are the job's
    n_tokens = n_targets = n_kept = 0
    truncated, skipped, damaged = [], [], []
    for start in range(0, len(records), RENDER_CHUNK):
        if cancelled():
            return None
        kept, report = render(records[start:start + RENDER_CHUNK], tok, req.seq_len)
        n_kept += len(kept)
        n_tokens += sum(len(ex.ids) for ex in kept)
        n_targets += sum(ex.n_targets for ex in kept)
        truncated += report.truncated
        skipped += report.empty
        damaged += report.damaged
        emit((min(start + RENDER_CHUNK, len(records)), len(records)))
    parts = [out.summary]
    if n_kept:
        parts.append(f"{n_tokens / n_kept:.0f} tokens on average, {n_targets / n_kept:.0f} trained on")
    if truncated:
        parts.append(f"{len(truncated):,} longer than {req.seq_len} tokens (the prompt's middle cut first)")
    if damaged:
        parts.append(f"{len(damaged):,} dropped: the context cuts their whole prompt or their answer")
    if skipped:
        parts.append(f"{len(skipped):,} skipped: no answer token fits")
    out.summary = " · ".join(parts)
    for r in records[:req.shown]:
        pieces, ids, mask = chat_pieces(tok, r.messages, MAX_PIECES)
        out.examples.append(PreviewExample(f"{r.file.name}:{r.line}", r.messages, pieces, len(ids),
                                    sum(mask)))
    return out


def load_prompts(req: Request, emit: Callable, cancelled: Callable) -> Preview:
    try:
        prompts = read_prompts(req.paths)
    except PromptFileError as e:
        return Preview("prompts", e.problems)
    return Preview("prompts", summary=f"{len(prompts):,} prompts", prompts=prompts[:req.shown])


def _pairs(record) -> int:
    """Comparisons a ranking gives the reward model: answers in different groups, ties none,
    copies of one answer text once (as engine.reward_data reads them)."""
    sizes = [len(g) for g in fold_copies(record.ranking, dict(enumerate(record.answers)))]
    return (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2


def load_preferences(req: Request, emit: Callable, cancelled: Callable) -> Preview:
    out = Preview("preferences")
    n = pairs = 0
    for path in map(Path, req.paths):
        try:
            records, problems = read_preferences(path)
        except OSError as e:
            problems, records = [f"{path}: cannot read: {e.strerror or e}"], []
        out.problems += problems
        n += len(records)
        pairs += sum(_pairs(r) for r in records)
        out.records += [(path.name, r) for r in records[:req.shown - len(out.records)]]
    if n == 0 and not out.problems:
        out.problems.append(f"{', '.join(map(str, req.paths)) or 'no files'}: no preference records")
    out.summary = f"{n:,} ranked records · {pairs:,} comparison pairs"
    return out


def load_project_rankings(req: Request, emit: Callable, cancelled: Callable) -> Preview:
    """The rankings a reward run would be given (req.paths = [the project folder]), read from
    the store exactly as Start writes them into the run folder."""
    import tempfile
    from workbench.preferences import write_rm_dataset
    from workbench.store import Store
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rankings.jsonl"
        choice = req.choice or Rankings(include_simulated=req.simulated)
        with Store.for_project(req.paths[0]) as store:
            n = write_rm_dataset(store, path, **choice.dataset_options())
        if n == 0 and choice.min_agreement is not None:
            return Preview("preferences", [f"no item's rankings agree on {choice.min_agreement:.0%} "
                                           "of answer pairs or more: lower the threshold"])
        if n == 0:
            return Preview("preferences", ["this project has no rankings to train on yet: rank some "
                                           "answers in Sample & Rank" + ("" if req.simulated else
                                                                         " (or include simulated rankings)")])
        out = load_preferences(Request([path], shown=req.shown), emit, cancelled)
    out.records = [("this project", r) for _name, r in out.records]
    how = ([f"only items whose annotators agree on {choice.min_agreement:.0%} of pairs or more"]
           if choice.min_agreement is not None else [])
    how += ["one Borda ranking per item"] if choice.aggregate == "borda" else []
    out.note = ("The project's rankings" + (", simulated ones included," if req.simulated else "")
                + (f" ({'; '.join(how)})" if how else "")
                + " as Start writes them into the run folder (rankings.jsonl).")
    return out


# --- what the view draws (TokenView blocks) ---------------------------------------------------

def sft_blocks(p: Preview) -> list[tuple[str, object]]:
    blocks: list[tuple[str, object]] = []
    for n, ex in enumerate(p.examples, 1):
        if ex.pieces is None:
            blocks.append(("heading", f"#{n}  {ex.where}"))
            for m in ex.messages:
                blocks += [("dim", m["role"]), ("text", m["content"])]
            continue
        blocks.append(("heading", f"#{n}  {ex.where}  ·  {ex.n_tokens} tokens, "
                                  f"{ex.n_targets} trained on"))
        blocks.append(("pieces", ex.pieces))
        if ex.n_tokens > len(ex.pieces):
            blocks.append(("dim", f"… {ex.n_tokens - len(ex.pieces):,} more tokens"))
    return blocks


def prompt_blocks(p: Preview) -> list[tuple[str, object]]:
    return [("text", f"{i}.  {text}") for i, text in enumerate(p.prompts, 1)]


def preference_blocks(p: Preview) -> list[tuple[str, object]]:
    blocks: list[tuple[str, object]] = []
    for n, (name, r) in enumerate(p.records, 1):
        who = " · simulated" if r.simulated else (f" · {r.annotator}" if r.annotator else "")
        blocks.append(("heading", f"#{n}  {name}:{r.line}  ·  {len(r.answers)} answers{who}"))
        blocks.append(("text", r.prompt))
        for rank, group in enumerate(r.ranking, 1):
            tie = " (tie)" if len(group) > 1 else ""
            blocks += [("dim" if rank > 1 else "text", f"{rank}{tie}.  {r.answers[i]}")
                       for i in group]
    return blocks


# --- the widget -------------------------------------------------------------------------------

class DataPreview(QWidget):
    """Counts, first records and problems of a stage's input data."""
    validated = Signal(bool, list)   # ok, problems (each `FILE:LINE: ...`); after every preview

    TITLES = {"pretrain": "Pretraining corpus", "sft": "SFT data", "prompts": "Prompts",
              "preferences": "Preference data"}

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._problems: list[str] = []
        self._worker: Worker | None = None
        self._workers: set[Worker] = set()
        self._request: tuple[str, Callable, Request] | None = None
        self.title = QLabel()
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.summary = QLabel("Choose data to preview it here.")
        self.summary.setWordWrap(True)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setTextFormat(Qt.TextFormat.PlainText)
        self.note.hide()
        self.error_box = QPlainTextEdit()
        self.error_box.setReadOnly(True)
        self.error_box.setMaximumHeight(ERROR_BOX_HEIGHT)
        self.error_box.hide()
        self.shown_spin = QSpinBox()
        self.shown_spin.setRange(1, 1000)
        self.shown_spin.setValue(DEFAULT_SHOWN)
        self.shown_spin.setPrefix("show ")
        self.seq_spin = QSpinBox()
        self.seq_spin.setRange(3, 1 << 20)
        self.seq_spin.setValue(DEFAULT_SEQ_LEN)
        self.seq_spin.setPrefix("context ")
        self.seq_spin.setSuffix(" tokens")
        self.seq_spin.setToolTip("The SFT context (seq_len): longer examples lose the middle of the prompt first")
        row = QHBoxLayout()
        row.addWidget(self.title)
        row.addStretch(1)
        row.addWidget(self.shown_spin)
        row.addWidget(self.seq_spin)

        self.files = QTreeWidget()
        self.files.setHeaderLabels(["File", "Size"])
        self.files.setRootIsDecorated(False)
        self.files.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.files.header().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.files.header().setStretchLastSection(False)
        self.head_label = QLabel()
        self.head = QPlainTextEdit()
        self.head.setReadOnly(True)
        self.head.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.head.setFont(mono)
        head_box = QWidget()
        hl = QVBoxLayout(head_box)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.addWidget(self.head_label)
        hl.addWidget(self.head)
        files_page = QSplitter(Qt.Orientation.Vertical)
        files_page.addWidget(self.files)
        files_page.addWidget(head_box)
        files_page.setStretchFactor(1, 2)
        self.view = TokenView()
        self.stack = QStackedWidget()
        self.stack.addWidget(files_page)
        self.stack.addWidget(self.view)
        self.stack.setCurrentWidget(self.view)

        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.summary)
        lay.addWidget(self.note)
        lay.addWidget(self.error_box)
        lay.addWidget(self.stack, 1)
        self._tint()
        self._rerun = QTimer(self)
        self._rerun.setSingleShot(True)
        self._rerun.setInterval(250)   # spin boxes fire per step while the arrow is held
        self._rerun.timeout.connect(self._again)
        self.shown_spin.valueChanged.connect(self._rerun.start)
        self.seq_spin.valueChanged.connect(self._rerun.start)
        self._controls(None, False)

    # --- public ----------------------------------------------------------------------------
    @property
    def problems(self) -> list[str]:
        return list(self._problems)

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def show_pretrain(self, paths: list[Path]) -> None:
        self._start("pretrain", load_pretrain, Request(list(paths)))

    def show_sft(self, paths: list[Path], tokenizer: Path | None) -> None:
        self._start("sft", load_sft, Request(list(paths), tokenizer))

    def show_prompts(self, paths: list[Path]) -> None:
        self._start("prompts", load_prompts, Request(list(paths)))

    def show_preferences(self, paths: list[Path]) -> None:
        self._start("preferences", load_preferences, Request(list(paths)))

    def show_project_rankings(self, project: Path, choice) -> None:
        """What Start writes for `choice` (a runfolder.Rankings)."""
        self._start("preferences", load_project_rankings,
                    Request([Path(project)], simulated=choice.include_simulated, choice=choice))

    def set_seq_len(self, n: int) -> None:
        """The context SFT will cut examples to (the model's max_seq_len, or the config's)."""
        self.seq_spin.setValue(n)

    def wait(self, timeout_ms: int = 30_000) -> bool:
        """Block until every reader this widget started has ended (tests, closing the app)."""
        return all(w.wait(timeout_ms) for w in list(self._workers))

    # --- requests --------------------------------------------------------------------------
    def _start(self, kind: str, fn: Callable, req: Request) -> None:
        self._rerun.stop()
        self._request = (kind, fn, req)
        if self._worker is not None:
            self._worker.cancel()
        req.shown, req.seq_len = self.shown_spin.value(), self.seq_spin.value()
        self.title.setText(self.TITLES[kind])
        self.summary.setText("Reading…")
        self._controls(kind, req.tokenizer is not None)
        w = Worker(fn, req)
        w.finished.connect(self._on_finished)
        w.errored.connect(self._on_errored)
        w.progress.connect(self._on_progress)
        w.done.connect(self._on_done)
        self._worker = w
        self._workers.add(w)
        w.start()

    def _again(self) -> None:
        if self._request is not None:
            kind, fn, req = self._request
            self._start(kind, fn, Request(req.paths, req.tokenizer, simulated=req.simulated,
                                          choice=req.choice))

    def _controls(self, kind: str | None, has_tokenizer: bool) -> None:
        units = {"sft": " examples", "prompts": " prompts", "preferences": " records"}
        self.shown_spin.setSuffix(units.get(kind, ""))
        self.shown_spin.setVisible(kind in units)
        self.seq_spin.setVisible(kind == "sft" and has_tokenizer)

    def _current(self) -> bool:
        return self.sender() is self._worker

    def _on_progress(self, value) -> None:
        if self._current():
            done, total = value
            self.summary.setText(f"Rendering {done:,} of {total:,} examples…")

    def _on_finished(self, result: Preview | None) -> None:
        if not self._current() or result is None:   # superseded, or cancelled mid-way
            return
        self._worker = None
        self._show(result)

    def _on_errored(self, text: str) -> None:
        if not self._current():
            return
        self._worker = None
        kind = self._request[0] if self._request else "sft"
        self._show(Preview(kind, [f"could not read the data: {text}"]))

    def _on_done(self) -> None:
        self._workers.discard(self.sender())

    # --- drawing ---------------------------------------------------------------------------
    def _show(self, p: Preview) -> None:
        self._problems = list(p.problems)
        self.summary.setText(p.summary or ("This data cannot be used yet." if p.problems else ""))
        self.note.setText(p.note)
        self.note.setVisible(bool(p.note))
        if p.problems:
            n = len(p.problems)
            self.error_box.setPlainText(
                f"{n} problem{'s' * (n != 1)}: fix {'them' if n != 1 else 'it'} before starting\n\n"
                + "\n".join(p.problems))
        self.error_box.setVisible(bool(p.problems))
        # with nothing to preview the problems get the whole height
        has_content = bool(p.files or p.examples or p.prompts or p.records)
        self.stack.setVisible(has_content)
        self.error_box.setMaximumHeight(ERROR_BOX_HEIGHT if has_content else QWIDGETSIZE_MAX)
        self.files.clear()
        if p.kind == "pretrain":
            self._draw_files(p)
        else:
            blocks = {"sft": sft_blocks, "prompts": prompt_blocks,
                      "preferences": preference_blocks}[p.kind](p)
            self.view.set_blocks(blocks)
            self.stack.setCurrentWidget(self.view)
            self.view.moveCursor(QTextCursor.MoveOperation.Start)
        self.validated.emit(not p.problems, list(p.problems))

    def _draw_files(self, p: Preview) -> None:
        for path, size in p.files:
            item = QTreeWidgetItem([str(path), size_text(size)])
            item.setTextAlignment(1, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            item.setToolTip(0, str(path))
            self.files.addTopLevelItem(item)
        self.head_label.setText(f"First lines of {p.files[0][0].name}" if p.files else "")
        self.head.setPlainText(p.head)
        self.stack.setCurrentIndex(0)

    def _tint(self) -> None:
        """A red-tinted error box in either palette; redone when the palette changes."""
        pal = QPalette(self.palette())
        base = pal.color(QPalette.ColorRole.Base)
        red = QColor(220, 50, 47)
        pal.setColor(QPalette.ColorRole.Base, blend(base, red, 0.28 if is_dark(pal) else 0.12))
        self.error_box.setPalette(pal)
        note = QPalette(self.palette())
        note.setColor(QPalette.ColorRole.WindowText,
                      blend(pal.color(QPalette.ColorRole.WindowText), base, 0.35))
        self.note.setPalette(note)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._tint()
