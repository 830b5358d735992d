import json
import re

import pytest

from engine.corpus import (Chunk, CorpusError, NonEmptyGuard, check_nonempty, iter_chunks,
                           list_corpus_files, split_draw)
from engine.runio import StageError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- listing -----------------------------------------------------------------------------
def test_list_expands_folders_recursively_sorted(tmp_path):
    root = tmp_path / "corpus"
    for name in ["b.txt", "a.jsonl", "sub/z.txt", "sub/c.txt", "README.md", "sub/data.csv",
                 ".hidden/x.txt"]:
        write(root / name, "x")
    files = list_corpus_files([root])
    assert [f.relative_to(root).as_posix() for f in files] == \
        ["a.jsonl", "b.txt", "sub/c.txt", "sub/z.txt"]


def test_list_keeps_given_order_and_dedupes(tmp_path):
    a = write(tmp_path / "a.txt", "x")
    b = write(tmp_path / "b.txt", "x")
    assert list_corpus_files([b, a, str(b)]) == [b, a]


def test_list_errors(tmp_path):
    with pytest.raises(CorpusError, match=re.escape(str(tmp_path / "nope.txt"))):
        list_corpus_files([tmp_path / "nope.txt"])
    csv = write(tmp_path / "data.csv", "x")
    with pytest.raises(CorpusError, match=r"data\.csv.*unsupported"):
        list_corpus_files([csv])
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "notes.md", "x")
    with pytest.raises(CorpusError, match="no .txt or .jsonl files"):
        list_corpus_files([tmp_path / "empty"])
    # Listed beside a folder that has some, it is still named: it adds nothing.
    write(tmp_path / "good" / "a.txt", "text")
    with pytest.raises(CorpusError, match=re.escape(f"{tmp_path / 'empty'}: no .txt or .jsonl files")):
        list_corpus_files([tmp_path / "good", tmp_path / "empty"])
    with pytest.raises(CorpusError):
        list_corpus_files([])
    assert issubclass(CorpusError, StageError)


# --- .txt --------------------------------------------------------------------------------
def test_txt_is_one_document_split_at_whitespace(tmp_path):
    text = " ".join(f"word{i}" for i in range(300)) + "\nlast line\n"
    f = write(tmp_path / "a.txt", text)
    chunks = list(iter_chunks([f], chunk_chars=50))
    assert "".join(c.text for c in chunks) == text
    assert all(1 <= len(c.text) <= 50 for c in chunks)
    assert [c.new_doc for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert {c.doc_index for c in chunks} == {0}
    # every cut falls just before a whitespace character, keeping " word" pieces intact
    for c in chunks[1:]:
        assert c.text[0].isspace()


def test_txt_long_run_without_whitespace_cut_at_limit(tmp_path):
    text = "é" * 1000 + "x" * 37
    f = write(tmp_path / "a.txt", text)
    chunks = list(iter_chunks([f], chunk_chars=100))
    assert [len(c.text) for c in chunks] == [100] * 10 + [37]
    assert "".join(c.text for c in chunks) == text


def test_doc_index_across_files_and_empty_files(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    e = write(tmp_path / "e.txt", "")
    b = write(tmp_path / "b.jsonl", json.dumps({"text": "beta"}) + "\n\n"
              + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "gamma", "id": 3}) + "\n")
    chunks = list(iter_chunks([a, e, b]))
    assert [(c.doc_index, c.text, c.new_doc, c.file) for c in chunks] == [
        (0, "alpha", True, a), (1, "beta", True, b), (2, "gamma", True, b)]


def test_bom_is_not_text(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    assert [c.text for c in iter_chunks([f])] == ["hello"]
    g = tmp_path / "bom.jsonl"
    g.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hi"}).encode() + b"\n")
    assert [c.text for c in iter_chunks([g])] == ["hi"]


@pytest.mark.parametrize("n_e_acute", [0, 1, 31, 32, 33, 63, 64, 200])
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3A", b"\xe6\x97"])
def test_invalid_utf8_reports_exact_byte_offset(tmp_path, n_e_acute, bad):
    # two-byte characters make block edges fall inside characters, so the decoder carries
    # bytes from one block to the next: the offset must still be exact
    prefix = ("a" + "é" * n_e_acute).encode()  # odd start: characters straddle blocks
    f = tmp_path / "bad.txt"
    f.write_bytes(prefix + bad + b" tail" * (0 if bad == b"\xe6\x97" else 50))
    with pytest.raises(CorpusError) as e:
        list(iter_chunks([f], chunk_chars=16))
    assert str(e.value).startswith(f"{f}: invalid UTF-8 at byte offset {len(prefix)} ")


def test_invalid_utf8_after_bom_counts_the_bom(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"\xef\xbb\xbfabc\xff")
    with pytest.raises(CorpusError, match="byte offset 6 "):
        list(iter_chunks([f]))


# --- .jsonl ------------------------------------------------------------------------------
def test_jsonl_long_text_is_chunked(tmp_path):
    long = "token " * 100
    f = jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": long}])
    chunks = list(iter_chunks([f], chunk_chars=64))
    assert chunks[0] == Chunk(f, 0, "short", True)
    rest = chunks[1:]
    assert len(rest) > 5 and all(len(c.text) <= 64 for c in rest)
    assert "".join(c.text for c in rest) == long
    assert [c.new_doc for c in rest] == [True] + [False] * (len(rest) - 1)
    assert {c.doc_index for c in rest} == {1}


@pytest.mark.parametrize("line,expect", [
    ('{"text": "ok"', r"malformed JSON at column \d+"),
    ('{"title": "x"}', r"field 'text' is missing \(fields: title\)"),
    ('{"text": 5}', r"field 'text' must be a string, got int"),
    ('{"text": null}', r"field 'text' must be a string, got NoneType"),
    ('["text"]', r"expected a JSON object with a 'text' field, got list"),
    ('{"text": "\\ud800 lone"}', r"field 'text' has an unpaired surrogate"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, expect):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=re.escape(f"{f}:3: ") + expect):
        list(iter_chunks([f]))


def test_jsonl_invalid_utf8_names_line_and_offset(tmp_path):
    f = tmp_path / "d.jsonl"
    first = b'{"text": "a"}\n'
    f.write_bytes(first + b'{"text": "b\xffc"}\n')
    with pytest.raises(CorpusError, match=re.escape(f"{f}:2: invalid UTF-8 at byte offset "
                                                    f"{len(first) + 11} ")):
        list(iter_chunks([f]))


def test_errors_are_lazy_and_come_after_good_records(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good"}\n{oops\n', encoding="utf-8")
    it = iter_chunks([f])
    assert next(it).text == "good"
    with pytest.raises(CorpusError, match=":2: "):
        next(it)


# --- empty corpora -----------------------------------------------------------------------
def test_whitespace_only_corpus_is_refused(tmp_path):
    a = write(tmp_path / "a.txt", " \n\t\u3000\n")
    b = jsonl(tmp_path / "b.jsonl", [{"text": "   "}, {"text": ""}])
    c = write(tmp_path / "c.txt", "")
    with pytest.raises(CorpusError, match="empty or whitespace-only corpus: .*a.txt.*b.jsonl"):
        check_nonempty([a, b, c])
    guard = NonEmptyGuard(iter_chunks([a, b, c]), [a, b, c])
    with pytest.raises(CorpusError, match="empty or whitespace-only"):
        list(guard)
    d = write(tmp_path / "d.txt", "  x ")
    check_nonempty([a, d])
    assert [ch.text for ch in NonEmptyGuard(iter_chunks([a, d]), [a, d])] == [a.read_text(), "  x "]


def test_split_draw_is_deterministic_and_uniform():
    draws = [split_draw(7, i) for i in range(4000)]
    assert draws == [split_draw(7, i) for i in range(4000)]
    assert draws != [split_draw(8, i) for i in range(4000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    share = sum(d < 0.1 for d in draws) / len(draws)
    assert 0.08 < share < 0.12


def test_every_problem_of_the_corpus_is_listed_and_nothing_follows_the_first(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "good"}\n{oops\n{"text": "fine"}\n{"title": 1}\n', encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_bytes(b"ab\xffcd")
    c = jsonl(tmp_path / "c.jsonl", [{"text": "also good"}, ["text"]])
    it = iter_chunks([a, b, c])
    assert next(it).text == "good"
    with pytest.raises(CorpusError) as e:
        next(it)
    assert e.value.problems == [
        f"{a}:2: malformed JSON at column 2: Expecting property name enclosed in double quotes",
        f"{a}:4: field 'text' is missing (fields: title)",
        f"{b}: invalid UTF-8 at byte offset 2 (invalid start byte)",
        f"{c}:2: expected a JSON object with a 'text' field, got list"]
    assert str(e.value).startswith("4 problem(s) in the corpus; nothing was read:\n")

