"""The data preview: SFT mask highlighting in all three formats, FILE:LINE problems, other kinds."""
import json

import pytest
from PySide6.QtGui import QTextCursor

from engine.sft_data import read_records
from engine.tokenizer import Tokenizer, render_chat, train_from_texts
from ui.data_preview import DataPreview

FORMATS = {
    "prompt": [{"prompt": "What is two plus two?", "response": "Four."},
               {"prompt": "Say hello.", "response": "Hello, world!"}],
    "alpaca": [{"instruction": "Reverse the word.", "input": "fox", "output": "xof"},
               {"instruction": "Name a colour.", "output": "Blue."}],
    "messages": [{"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "And naïve 日本?"},
                               {"role": "assistant", "content": "Yes 🙂"}]}],
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_from_texts(["what is two plus four hello world reverse the word name a colour "
                      "blue be brief hi there yes " * 30], vocab_size=300).save(d / "tokenizer.json")
    return d / "tokenizer.json"




@pytest.fixture
def preview(qtbot):
    w = DataPreview()
    qtbot.addWidget(w)
    return w


def shown(qtbot, preview, call, *args):
    """Run a show_* call and return validated's (ok, problems)."""
    with qtbot.waitSignal(preview.validated, timeout=10_000) as blocker:
        call(*args)
    return blocker.args


def drawn_examples(view):
    """The pieces of each drawn example with the background/foreground of its first character."""
    examples, current = [], []
    for start, _end, p in view.piece_ranges():
        cur = QTextCursor(view.document())
        cur.setPosition(start + 1)
        fmt = cur.charFormat()
        if p.id == 1 and current:   # <|bos|> opens the next example
            examples.append(current)
            current = []
        current.append((p, fmt))
    return examples + [current]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sft_preview_highlights_exactly_the_trained_tokens(qtbot, preview, tmp_path, tok_path, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", FORMATS[fmt])
    assert shown(qtbot, preview, preview.show_sft, [path], tok_path) == [True, []]
    tok = Tokenizer.from_file(tok_path)
    records = read_records([path])
    examples = drawn_examples(preview.view)
    assert len(examples) == len(records)
    for rec, drawn in zip(records, examples):
        ids, mask = render_chat(tok, rec.messages)
        assert [p.id for p, _ in drawn] == ids
        assert [p.target for p, _ in drawn] == [bool(m) for m in mask]
        trained_bg = {f.background().color().name() for p, f in drawn if p.target}
        # space markers and split-character marks are fainter still
        context_fg = {f.foreground().color().name() for p, f in drawn
                      if not p.target and p.text and not p.text[0].isspace()}
        assert all(f.background().style() != 0 for p, f in drawn if p.target)
        assert not trained_bg & {f.background().color().name() for p, f in drawn
                                 if not p.target and f.background().style() != 0}
        assert len(context_fg) == 1     # one dimmed colour for all context tokens
        assert context_fg != {preview.view.palette().text().color().name()}
        assert "\ufffd" not in preview.view.toPlainText()
    assert preview.summary.text().startswith(f"{len(records)} examples")
    assert preview.problems == []


def test_sft_bad_lines_are_listed_as_file_line(qtbot, preview, tmp_path, tok_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\nnot json\n')
    ok, problems = shown(qtbot, preview, preview.show_sft, [path], tok_path)
    assert not ok
    assert problems == preview.problems and len(problems) == 2
    assert preview.error_box.isVisibleTo(preview)
    box = preview.error_box.toPlainText()
    assert f"{path}:2: field 'response': missing" in box
    assert f"{path}:3: malformed JSON" in box
    # fixing the file clears the box
    write_jsonl(path, FORMATS["prompt"])
    assert shown(qtbot, preview, preview.show_sft, [path], tok_path) == [True, []]
    assert not preview.error_box.isVisibleTo(preview)


def test_sft_without_a_tokenizer_shows_plain_text_and_says_why(qtbot, preview, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", FORMATS["alpaca"])
    assert shown(qtbot, preview, preview.show_sft, [path], None) == [True, []]
    text = preview.view.toPlainText()
    assert "Reverse the word.\n\nfox" in text and "xof" in text
    assert preview.view.pieces == []
    assert "tokenizer" in preview.note.text()


def test_sft_counts_examples_cut_to_the_context(qtbot, preview, tmp_path, tok_path):
    path = write_jsonl(tmp_path / "sft.jsonl", FORMATS["prompt"])
    tok = Tokenizer.from_file(tok_path)
    lengths = [len(render_chat(tok, r.messages)[0]) for r in read_records([path])]
    preview.set_seq_len(min(lengths))
    shown(qtbot, preview, preview.show_sft, [path], tok_path)
    n_long = sum(n > min(lengths) for n in lengths)
    assert f"{n_long} longer than {min(lengths)} tokens" in preview.summary.text()
    assert preview.seq_spin.isVisibleTo(preview) and preview.shown_spin.isVisibleTo(preview)
    assert preview.shown_spin.suffix() == " examples"


def test_pretrain_preview_lists_files_sizes_and_the_first_lines(qtbot, preview, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    (corpus / "b.jsonl").write_text('{"text": "hello"}\n')
    (corpus / "README.md").write_text("not corpus")
    assert shown(qtbot, preview, preview.show_pretrain, [corpus]) == [True, []]
    rows = [(preview.files.topLevelItem(i).text(0), preview.files.topLevelItem(i).text(1))
            for i in range(preview.files.topLevelItemCount())]
    assert rows == [(str(corpus / "a.txt"), "790 B"), (str(corpus / "b.jsonl"), "18 B")]
    assert preview.summary.text() == "2 files · 808 B"
    assert preview.head.toPlainText().splitlines() == [f"line {i}" for i in range(40)]


def test_pretrain_problems_fail_validation(qtbot, preview, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n")
    ok, problems = shown(qtbot, preview, preview.show_pretrain, [tmp_path / "blank.txt"])
    assert not ok and "empty or whitespace-only corpus" in problems[0]
    ok, problems = shown(qtbot, preview, preview.show_pretrain, [tmp_path / "missing"])
    assert not ok and "no such file or folder" in problems[0]
    # A file in another encoding is named wherever it sits in the list, not only first.
    (tmp_path / "good.txt").write_text("plain text\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    ok, problems = shown(qtbot, preview, preview.show_pretrain, [tmp_path / "good.txt", tmp_path / "latin1.txt"])
    assert not ok and problems == [f"{tmp_path / 'latin1.txt'}: invalid UTF-8 at byte offset 3"]


def test_prompts_preview_counts_and_lists(qtbot, preview, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n\n" for i in range(30)))
    preview.shown_spin.setValue(5)
    assert shown(qtbot, preview, preview.show_prompts, [path]) == [True, []]
    assert preview.summary.text() == "30 prompts"
    assert preview.view.toPlainText().splitlines() == [f"{i + 1}.  prompt number {i}" for i in range(5)]


def test_copies_of_one_answer_are_one_pair_in_the_count(qtbot, preview, tmp_path):
    # As the reward model reads them: "n" three times tied above "elot" is one comparison.
    path = write_jsonl(tmp_path / "copies.jsonl", [
        {"prompt": "last letter of 'crown'?", "answers": ["n", "n", "n", "elot"], "ranking": [[0, 1, 2], [3]]}])
    assert shown(qtbot, preview, preview.show_preferences, [path]) == [True, []]
    assert preview.summary.text().startswith("1 ranked records · 1 comparison pairs")


def test_preferences_preview_counts_records_and_pairs(qtbot, preview, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "answers": ["a", "b", "c"], "ranking": [[1], [0, 2]]},
    ])
    assert shown(qtbot, preview, preview.show_preferences, [path]) == [True, []]
    assert preview.summary.text().startswith("2 ranked records · 3 comparison pairs")
    assert "1.  b" in preview.view.toPlainText() and "2 (tie).  c" in preview.view.toPlainText()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    ok, problems = shown(qtbot, preview, preview.show_preferences, [tmp_path / "bad.jsonl"])
    assert not ok and problems[0].startswith(f"{tmp_path / 'bad.jsonl'}:1: ")


def test_a_newer_request_wins(qtbot, preview, tmp_path, tok_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", FORMATS["prompt"] * 500)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    results = []
    preview.validated.connect(lambda ok, problems: results.append(preview.title.text()))
    preview.show_sft([sft], tok_path)
    preview.show_prompts([prompts])
    qtbot.waitUntil(lambda: not preview.busy, timeout=10_000)
    assert preview.wait()
    qtbot.wait(50)   # a stale result still queued would arrive now
    assert results == ["Prompts"]
    assert preview.summary.text() == "2 prompts"
