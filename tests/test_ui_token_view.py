"""The token inspector: live coloured tokens, counts, hover ids, multi-byte text, chat template."""
import json

import pytest
from PySide6.QtCore import QEvent, QPoint
from PySide6.QtGui import QHelpEvent, QTextCursor
from PySide6.QtWidgets import QToolTip

from engine.tokenizer import SPECIAL_TOKENS, render_chat, train_from_texts
from ui.token_view import CONTINUATION, TokenInspector, text_pieces, token_spans

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 40,
          "hello world, hello tokens; naïve café 日本語 " * 20]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tokenizer run folder, with the metrics event the tokenizer stage writes."""
    d = tmp_path_factory.mktemp("tok_run")
    tok = train_from_texts(CORPUS, vocab_size=320)
    tok.save(d / "tokenizer.json")
    ev = {"type": "metrics", "step": 0, "tokenizer/vocab_size": tok.vocab_size,
          "tokenizer/chars_per_token": 3.25, "tokenizer/train_chars": 2800,
          "tokenizer/heldout_chars": 120}
    (d / "events.jsonl").write_text(json.dumps(ev) + "\n")
    return d


@pytest.fixture
def inspector(qtbot, tok_dir):
    w = TokenInspector()
    qtbot.addWidget(w)
    w.set_tokenizer(tok_dir)
    return w


def formats(view):
    """(piece, background colour name or None, foreground name) per drawn piece."""
    out = []
    for start, _end, piece in view.piece_ranges():
        cur = QTextCursor(view.document())
        cur.setPosition(start + 1)   # a cursor reports the format of the character before it
        fmt = cur.charFormat()
        bg = fmt.background().color().name() if fmt.hasProperty(fmt.Property.BackgroundBrush) else None
        out.append((piece, bg, fmt.foreground().color().name()))
    return out


def test_typing_draws_one_coloured_span_per_token(inspector, qtbot):
    text = "hello world, the quick fox"
    with qtbot.waitSignal(inspector.rendered, timeout=10_000):
        qtbot.keyClicks(inspector.editor, text)
    ids = inspector.tokenizer.encode(text)
    drawn = formats(inspector.view)
    assert [p.id for p, _, _ in drawn] == ids
    assert all(bg is not None for _, bg, _ in drawn)
    assert all(a[1] != b[1] for a, b in zip(drawn, drawn[1:]))   # neighbours tell apart
    assert "".join(p.text for p, _, _ in drawn) == text
    assert inspector.counts["tokens"] == len(ids)
    assert f"{len(text) / len(ids):.2f} chars/token" in inspector.stats.text()
    assert f"{len(text)} characters · {len(ids)} tokens" in inspector.stats.text()


def test_whitespace_is_visible_in_the_rendering(inspector):
    inspector.set_text("a b\nc")
    assert inspector.view.toPlainText() == "a\u00b7b\u21b5\nc"


def drawn_text(view, start, end):
    cur = QTextCursor(view.document())
    cur.setPosition(start)
    cur.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
    return cur.selectedText()


@pytest.mark.parametrize("chat", [False, True])
def test_every_token_sits_where_it_is_drawn(inspector, chat):
    # the hover lookup relies on these positions; 🙂 takes two (UTF-16) positions
    inspector.chat_box.setChecked(chat)
    inspector.set_text("naïve 日本\n\tcafé 🙂 ok  \n\nend")
    marks = {" ": "\u00b7", "\t": "\u2192\t", "\n": "\u21b5\u2028"}
    for start, end, p in inspector.view.piece_ranges():
        shown = "".join(marks.get(c, c) for c in p.text) if not p.special else p.text
        assert drawn_text(inspector.view, start, end) == (shown or CONTINUATION)


def test_hovering_a_token_shows_its_id(inspector, qtbot):
    inspector.resize(600, 400)
    inspector.show()
    qtbot.waitExposed(inspector)
    inspector.set_text("hello world")
    view = inspector.view
    start, end, piece = view.piece_ranges()[1]
    cur = QTextCursor(view.document())
    cur.setPosition(start)
    left = view.cursorRect(cur)
    cur.setPosition(end)
    point = QPoint((left.x() + view.cursorRect(cur).x()) // 2, left.center().y())
    assert view.piece_at(view.position_at(point)) is piece
    event = QHelpEvent(QEvent.Type.ToolTip, point, view.viewport().mapToGlobal(point))
    view.viewportEvent(event)
    qtbot.waitUntil(lambda: QToolTip.isVisible(), timeout=10_000)
    assert QToolTip.text().splitlines()[:2] == [f"id {piece.id}", repr(piece.text)]
    QToolTip.hideText()


def test_multibyte_text_renders_without_replacement_characters(inspector):
    text = "naïve 日本 🙂"
    inspector.set_text(text)
    tok = inspector.tokenizer
    shown = inspector.view.toPlainText()
    assert "\ufffd" not in shown
    assert shown.replace(CONTINUATION, "").replace("\u00b7", " ") == text
    assert len(inspector.view.pieces) == len(tok.encode(text))
    # 🙂 is four bytes the small vocabulary has never merged: one character, several tokens
    assert any(p.text == "" for p in inspector.view.pieces)


def test_spans_of_a_prefix_follow_the_engine_convention(tok_dir):
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.from_file(tok_dir)
    for text in ["naïve 日本 🙂 café", "a  b\n\tc", "", "🙂🙂"]:
        ids = tok.encode(text)
        assert token_spans(tok, text, ids) == tok.token_spans(text)
        assert token_spans(tok, text, ids[:3]) == tok.token_spans(text)[:3]
    pieces, n = text_pieces(tok, "the lazy dog " * 50, limit=10)
    assert len(pieces) == 10 and n == len(tok.encode("the lazy dog " * 50))


def test_long_text_is_counted_in_full_and_drawn_up_to_the_cap(inspector):
    text = "".join(chr(0x4e00 + (i * 7919) % 2000) for i in range(2600))   # ~3 tokens a character
    inspector.set_text(text)
    n = len(inspector.tokenizer.encode(text))
    assert n > 5000
    assert inspector.counts["tokens"] == n
    assert len(inspector.view.pieces) == 5000
    assert f"{n - 5000:,} more tokens not drawn" in inspector.view.toPlainText()


def test_chat_template_shows_the_special_tokens(inspector, qtbot):
    inspector.set_text("hello world")
    with qtbot.waitSignal(inspector.rendered, timeout=10_000):
        inspector.chat_box.setChecked(True)
    ids, _ = render_chat(inspector.tokenizer, [{"role": "user", "content": "hello world"}])
    pieces = inspector.view.pieces
    assert [p.id for p in pieces] == ids
    assert [p.text for p in pieces if p.special] == ["<|bos|>", "<|user|>", "<|end|>"]
    assert inspector.view.toPlainText() == "<|bos|><|user|>hello\u00b7world<|end|>"
    assert inspector.counts["tokens"] == len(ids) and inspector.counts["special"] == 3
    assert "(3 special)" in inspector.stats.text()


def test_header_shows_vocabulary_specials_and_the_runs_figures(inspector):
    html = inspector.header.text()
    assert f"{inspector.tokenizer.vocab_size:,}</b> tokens" in html
    assert all(s.replace("<", "&lt;").replace(">", "&gt;") in html for s in SPECIAL_TOKENS)
    assert "<b>3.25</b> characters per token on 120 held-out characters" in html


def test_a_missing_tokenizer_is_reported_not_raised(qtbot, tmp_path):
    w = TokenInspector()
    qtbot.addWidget(w)
    w.set_tokenizer(tmp_path)
    assert w.tokenizer is None
    assert "tokenizer file not found" in w.header.text()
    assert not w.editor.isEnabled()
