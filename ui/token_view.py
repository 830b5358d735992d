"""Seeing tokens: a coloured token rendering, and the tokenizer inspector built on it.

`TokenView` draws a sequence of `Piece`s (one per token) with a background per token, visible
whitespace and a tooltip with the id; the SFT data preview uses it too, with the loss mask.
`TokenInspector` is the tokenizer stage's panel: vocabulary, special tokens, the run's own
figures, and a text box whose tokens are shown as you type.

Pieces carry character offsets into the user's own string, never decoded token bytes, so a
token that holds half of a UTF-8 character cannot show as mojibake: the character belongs to
the token with its first byte and later pieces of it are drawn as a small continuation mark.
"""
from __future__ import annotations

import html
import json
from bisect import bisect_right
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Mapping, Sequence

from PySide6.QtCore import QEvent, QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import (QCheckBox, QHBoxLayout, QLabel, QPlainTextEdit, QSplitter,
                               QTextEdit, QToolTip, QVBoxLayout, QWidget)

from engine.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, load_tokenizer
from workbench.runfold import fold_run

MAX_SHOWN = 5000           # tokens drawn; past this a QTextDocument gets sluggish to lay out
DEBOUNCE_MS = 60
CONTINUATION = "\u207a"    # superscript plus: the rest of a character split across tokens
VISIBLE = {" ": "\u00b7", "\t": "\u2192\t", "\n": "\u21b5\n", "\r": "\u240d"}
HUES = (0.58, 0.08, 0.33, 0.83, 0.14, 0.48)   # blue, orange, green, violet, yellow, teal


@dataclass
class Piece:
    text: str                    # the characters this token covers; '' for a split character's tail
    id: int
    special: bool = False
    target: bool | None = None   # None: no mask; else whether the loss is taken on this token


def token_spans(tok: Tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, end, id) for `ids`, the first tokens of `text`, as character offsets.

    The convention of `Tokenizer.token_spans` (a character goes to the token holding its first
    byte), but walking only as far as the given ids, so drawing the first 5000 tokens of a
    pasted megabyte costs the same as drawing 5000 tokens.
    """
    out, ci, byte_end, pos = [], 0, 0, 0
    for i in ids:
        start = ci
        pos += len(tok.token_bytes(i))
        while ci < len(text) and byte_end < pos:
            byte_end += len(text[ci].encode("utf-8"))
            ci += 1
        out.append((start, ci, i))
    return out


def text_pieces(tok: Tokenizer, text: str, limit: int = MAX_SHOWN) -> tuple[list[Piece], int]:
    """The first `limit` tokens of `text` as pieces, and the text's full token count."""
    if not isinstance(tok, Tokenizer):      # an imported model's: its own offsets
        spans = tok.token_spans(text)
        return [Piece(text[s:e], i) for s, e, i in spans[:limit]], len(spans)
    ids = tok.encode(text)
    return [Piece(text[s:e], i) for s, e, i in token_spans(tok, text, ids[:limit])], len(ids)


def chat_pieces(tok: Tokenizer, messages: Sequence[Mapping], limit: int = MAX_SHOWN,
                ) -> tuple[list[Piece], list[int], list[int]]:
    """A conversation as the chat template renders it: (first `limit` pieces, ids, mask).

    The ids and mask are render_chat's own, the ones SFT trains on; pieces only add the text.
    Encoded content never contains a special id, so each message body is the run of ids
    between its role token and the next <|end|>.
    """
    ids, mask = tok.render_chat(messages)
    if not isinstance(tok, Tokenizer):
        return _template_pieces(tok, ids, mask, limit), ids, mask
    pieces = [Piece(SPECIAL_TOKENS[ids[0]], ids[0], True, bool(mask[0]))]
    k = 1
    for m in messages:
        pieces.append(Piece(SPECIAL_TOKENS[ids[k]], ids[k], True, bool(mask[k])))
        end = ids.index(tok.end_id, k + 1)
        body = ids[k + 1:end]
        room = max(0, limit - len(pieces))
        for j, (s, e, i) in enumerate(token_spans(tok, m["content"], body[:room])):
            pieces.append(Piece(m["content"][s:e], i, False, bool(mask[k + 1 + j])))
        pieces.append(Piece(SPECIAL_TOKENS[tok.end_id], tok.end_id, True, bool(mask[end])))
        k = end + 1
        if len(pieces) >= limit:
            break
    return pieces[:limit], ids, mask


def _template_pieces(tok, ids: list[int], mask: list[int], limit: int) -> list[Piece]:
    """An imported model's template has no fixed layout to walk: each token is drawn as it
    decodes on its own (a character split across tokens shows as its replacement mark)."""
    return [Piece(tok.decode([i]), i, i in tok.special_ids, bool(m)) for i, m in zip(ids[:limit], mask[:limit])]


def blend(a: QColor, b: QColor, t: float) -> QColor:
    return QColor.fromRgbF(a.redF() + (b.redF() - a.redF()) * t,
                           a.greenF() + (b.greenF() - a.greenF()) * t,
                           a.blueF() + (b.blueF() - a.blueF()) * t)


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Base).lightness() < 128


def pastel(palette: QPalette, hue: float, strength: float = 1.0) -> QColor:
    """A background of `hue` that text in the palette's own colour stays readable on."""
    if is_dark(palette):
        return QColor.fromHslF(hue, 0.55, 0.15 + 0.11 * strength)
    return QColor.fromHslF(hue, 0.75, 0.96 - 0.10 * strength)


def describe(piece: Piece, tok: Tokenizer | None) -> str:
    """Tooltip text: the id, what the token stands for, and its role in the loss."""
    if piece.special:
        what = f"{piece.text}  (special token)"
    elif piece.text:
        what = repr(piece.text)
    else:
        what = "the rest of the character before"
    if isinstance(tok, Tokenizer) and not piece.special:
        raw = tok.token_bytes(piece.id)
        if raw.decode("utf-8", "replace") != piece.text:   # a piece of a multi-byte character
            what += f"  (bytes {raw.hex(' ')})"
    lines = [f"id {piece.id}", what]
    if piece.target is not None:
        lines.append("trained on (mask 1)" if piece.target else "context (mask 0)")
    return "\n".join(lines)


class TokenView(QTextEdit):
    """A read-only rendering of pieces, headings and notes; hover a token for its id.

    Content is a list of blocks, ("heading" | "text" | "dim", str) or ("pieces", [Piece]),
    drawn as one HTML document in a single call: thousands of per-token cursor inserts are
    ten times slower, and under PySide6 6.12 on Python 3.11 each such call also drops a
    reference to None. Blocks are kept so a palette change (light/dark) redraws them.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setUndoRedoEnabled(False)
        self.tokenizer: Tokenizer | None = None    # only for byte detail in tooltips
        self._blocks: list[tuple[str, object]] = []
        self._starts: list[int] = []               # document position where each piece starts
        self._ends: list[int] = []
        self.pieces: list[Piece] = []              # every drawn piece, in document order

    def set_blocks(self, blocks: Sequence[tuple[str, object]]) -> None:
        self._blocks = list(blocks)
        self._rebuild()

    def piece_ranges(self) -> list[tuple[int, int, Piece]]:
        """(document start, end, piece) for every drawn piece."""
        return list(zip(self._starts, self._ends, self.pieces))

    def _rebuild(self) -> None:
        pal = self.palette()
        text_c = pal.color(QPalette.ColorRole.Text)
        base = pal.color(QPalette.ColorRole.Base)
        colors = {"dim": blend(text_c, base, 0.45).name(), "marker": blend(text_c, base, 0.6).name()}
        self._starts, self._ends, self.pieces = [], [], []
        paras, pos = [], 0
        for n, (kind, value) in enumerate(self._blocks):
            pos += n > 0   # the separator between two blocks is one position
            style = "margin:0; white-space:pre-wrap" + ("; margin-top:10px" if kind == "heading" and n
                                                         else "")
            if kind == "pieces":
                body, pos = self._pieces_html(value, pos, pal, colors)
            else:
                # an empty paragraph would be dropped by the HTML reader, shifting positions
                body, size = _text_html(value or "\u00a0")
                pos += size
                if kind == "heading":
                    body = f"<b>{body}</b>"
                elif kind == "dim":
                    body = f"<span style='color:{colors['dim']}'>{body}</span>"
            paras.append(f"<p style='{style}'>{body}</p>")
        self.setHtml("".join(paras))

    def _pieces_html(self, pieces: Sequence[Piece], pos: int, pal: QPalette,
                     colors: dict[str, str]) -> tuple[str, int]:
        text_c = pal.color(QPalette.ColorRole.Text)
        base = pal.color(QPalette.ColorRole.Base)
        out = []
        for n, p in enumerate(pieces):
            style = []
            if p.target is None:
                bg = pastel(pal, HUES[n % len(HUES)])
                if p.special:   # neutral chips, two shades so neighbours separate
                    bg = blend(base, text_c, 0.14 if n % 2 else 0.24)
                style.append(f"background-color:{bg.name()}")
            elif p.target:   # trained-on tokens: two close greens, so boundaries still show
                style.append(f"background-color:{pastel(pal, 0.36 if n % 2 else 0.30, 1.4).name()}")
            else:
                style.append(f"color:{colors['dim']}")
                if n % 2:
                    style.append(f"background-color:{blend(base, text_c, 0.06).name()}")
            if p.special:
                style.append("font-weight:bold")
                body, size = _text_html(p.text)
            elif not p.text:
                body, size = f"<span style='color:{colors['marker']}'>{CONTINUATION}</span>", 1
            else:
                body, size = _visible_html(p.text, colors["marker"])
            self._starts.append(pos)
            pos += size
            self._ends.append(pos)
            self.pieces.append(p)
            out.append(f"<span style='{';'.join(style)}'>{body}</span>")
        return "".join(out), pos

    # --- hover -----------------------------------------------------------------------------
    def piece_at(self, position: int) -> Piece | None:
        """The piece drawn at document position `position` (a character, not a gap)."""
        k = bisect_right(self._starts, position) - 1
        if k >= 0 and position < self._ends[k]:
            return self.pieces[k]
        return None

    def position_at(self, point: QPoint) -> int:
        """The document position of the character under a viewport point."""
        c = self.cursorForPosition(point)
        pos = c.position()
        if point.x() < self.cursorRect(c).x():   # cursor is at the character's right edge
            pos -= 1
        return pos

    def viewportEvent(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            piece = self.piece_at(self.position_at(event.pos()))
            if piece is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(event.globalPos(), describe(piece, self.tokenizer), self.viewport())
            return True
        return super().viewportEvent(event)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._rebuild()


def _units(text: str) -> int:
    """Length in UTF-16 code units, which is how a QTextDocument counts positions."""
    return len(text.encode("utf-16-le")) // 2


def _text_html(text: str) -> tuple[str, int]:
    """Escaped text with line breaks, and the number of document positions it takes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")   # the HTML reader drops a bare \r
    return html.escape(text, quote=False).replace("\n", "<br>"), _units(text)


def _visible_html(text: str, marker: str) -> tuple[str, int]:
    """Whitespace as · ↵ → in a fainter colour; newlines still break the line."""
    out, size = [], 0
    for is_space, group in groupby(text, key=lambda ch: ch in VISIBLE):
        chunk = "".join(group)
        if is_space:
            chunk = "".join(VISIBLE[ch] for ch in chunk)
            body = html.escape(chunk, quote=False).replace("\n", "<br>")
            out.append(f"<span style='color:{marker}'>{body}</span>")
        else:
            out.append(html.escape(chunk, quote=False))
        size += _units(chunk)
    return "".join(out), size


def run_figures(folder: Path) -> dict[str, float]:
    """The tokenizer stage's own figures (chars/token on held-out text, ...) for `folder`.

    The stage reports them as a metrics event; a summary.json, where a run has one, wins.
    """
    fold = fold_run(folder)
    figures: dict[str, float] = {k: v for k, v in fold.metrics.items() if k.startswith("tokenizer/")}
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict):
            figures.update({k: v for k, v in data.items() if k.startswith("tokenizer/")})
    return figures


class TokenInspector(QWidget):
    """The tokenizer's vocabulary, special tokens and run figures, and live tokenization.

    Text is re-tokenized on a short debounce. That runs on the UI thread on purpose: the Rust
    tokenizer encodes a few KB in microseconds, and only the first MAX_SHOWN tokens are drawn,
    so even a pasted megabyte costs one encode plus a bounded redraw.
    """
    rendered = Signal()   # after each re-tokenization, when `view` and `counts` are current

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._tok: Tokenizer | None = None
        self.counts: dict[str, float] = {}
        self.header = QLabel()
        self.header.setWordWrap(True)
        self.header.setTextFormat(Qt.TextFormat.RichText)
        self.header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.chat_box = QCheckBox("Chat template")
        self.chat_box.setToolTip("Render the text as one user message, as the model sees a prompt")
        self.stats = QLabel()
        self.editor = QPlainTextEdit()
        self.editor.setPlaceholderText("Type or paste text to see how it is tokenized")
        self.view = TokenView()
        self.view.setPlaceholderText("Tokens appear here")
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        mono.setPointSizeF(mono.pointSizeF() * 1.15)   # token boundaries are small details
        for w in (self.editor, self.view):
            w.setFont(mono)
        row = QHBoxLayout()
        row.addWidget(self.chat_box)
        row.addStretch(1)
        row.addWidget(self.stats)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.editor)
        split.addWidget(self.view)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 2)
        lay = QVBoxLayout(self)
        lay.addWidget(self.header)
        lay.addLayout(row)
        lay.addWidget(split, 1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.refresh)
        self.editor.textChanged.connect(self._timer.start)
        self.chat_box.toggled.connect(self.refresh)
        self.set_tokenizer(None)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tok

    def set_tokenizer(self, path: Path | None) -> None:
        """A tokenizer.json, or a run or checkpoint folder holding one; None to clear."""
        self._tok = None
        if path is None:
            self.header.setText("No tokenizer yet: train one in the Tokenizer stage, "
                                "or open a run that has a <code>tokenizer.json</code>.")
        else:
            path = Path(path)
            try:
                self._tok = load_tokenizer(path)
            except TokenizerError as e:
                self.header.setText(f"<b>Cannot use this tokenizer.</b> {_esc(str(e))}")
            else:
                self.header.setText(self._header_html(path))
        self.view.tokenizer = self._tok
        self.editor.setEnabled(self._tok is not None)
        self.chat_box.setEnabled(self._tok is not None)
        self.refresh()

    def set_text(self, text: str) -> None:
        self.editor.setPlainText(text)
        self.refresh()

    def _header_html(self, path: Path) -> str:
        tok = self._tok
        specials = " ".join(f"<code>{_esc(tok.id_to_token(i))}</code>&nbsp;{i}" for i in sorted(tok.special_ids)[:12])
        if len(tok.special_ids) > 12:
            specials += f" … ({len(tok.special_ids)} in all)"
        lines = [f"<b>{tok.vocab_size:,}</b> tokens in the vocabulary "
                 f"(<span style='font-family:monospace'>{_esc(str(path))}</span>)",
                 f"Special tokens: {specials}"]
        fig = run_figures(path if path.is_dir() else path.parent)
        cpt = fig.get("tokenizer/chars_per_token")
        if isinstance(cpt, (int, float)):
            held = int(fig.get("tokenizer/heldout_chars") or 0)
            on = (f"on {held:,} held-out characters" if held
                  else "on training text (too little text to hold some out)")
            line = f"This run: <b>{cpt:.2f}</b> characters per token {on}"
            trained = fig.get("tokenizer/train_chars")
            if isinstance(trained, (int, float)):
                line += f"; trained on {int(trained):,} characters"
            lines.append(line)
        return "<br>".join(lines)

    def refresh(self) -> None:
        """Re-tokenize the editor's text now (the debounce timer calls this)."""
        self._timer.stop()
        text = self.editor.toPlainText()
        tok = self._tok
        if tok is None:
            self.view.set_blocks([])
            self.counts = {}
            self.stats.setText("")
            self.rendered.emit()
            return
        if self.chat_box.isChecked():
            pieces, ids, _ = chat_pieces(tok, [{"role": "user", "content": text}])
            for p in pieces:   # a lone user turn trains on nothing: the mask would dim it all
                p.target = None
            n_tokens = len(ids)
            n_special = sum(1 for i in ids if i in tok.special_ids)
        else:
            pieces, n_tokens = text_pieces(tok, text)
            n_special = 0
        n_text = n_tokens - n_special
        cpt = len(text) / n_text if n_text else 0.0
        self.counts = {"chars": len(text), "tokens": n_tokens, "special": n_special,
                       "chars_per_token": cpt}
        blocks: list[tuple[str, object]] = [("pieces", pieces)] if pieces else []
        if n_tokens > len(pieces):
            blocks.append(("dim", f"… {n_tokens - len(pieces):,} more tokens not drawn "
                                  f"(the first {len(pieces):,} are shown)"))
        self.view.set_blocks(blocks)
        special = f" ({n_special} special)" if n_special else ""
        self.stats.setText(f"{len(text):,} characters · {n_tokens:,} tokens{special} · "
                           f"{cpt:.2f} chars/token")
        self.rendered.emit()


def _esc(s: str) -> str:
    return html.escape(s, quote=False)
