"""engine.jsonl: the one JSON Lines reader (plain or gzip), every bad line a FILE:LINE problem."""
import gzip

from engine.jsonl import read_jsonl

LINES = b'\xef\xbb\xbf{"a": 1}\n\n  \n{"a": 2\n{"a": "b\xffc"}\n[3]\n'


def read(path):
    problems = []
    return list(read_jsonl(path, problems)), problems


def test_plain_and_gzip_files_read_alike_with_every_problem_named(tmp_path):
    plain = tmp_path / "d.jsonl"
    plain.write_bytes(LINES)
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(LINES))
    bad_byte = LINES.index(b"\xff")
    for path in (plain, packed):
        records, problems = read(path)
        # The BOM is not text; blank lines are skipped but still counted.
        assert records == [(1, {"a": 1}), (6, [3])]
        assert problems == [f"{path}:4: malformed JSON at column 8: Expecting ',' delimiter",
                            f"{path}:5: invalid UTF-8 at byte offset {bad_byte} "
                            f"(invalid start byte)"]


def test_a_corrupt_or_cut_gzip_ends_with_one_problem(tmp_path):
    whole = gzip.compress(b'{"a": 1}\n' * 2000)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    records, problems = read(cut)
    assert records == [(i, {"a": 1}) for i in range(1, len(records) + 1)]
    assert problems == [f"{cut}:{len(records) + 1}: cannot read on: the gzip stream ends early "
                        f"(the file is cut short)"]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b'{"a": 1}\n')
    records, problems = read(bad)
    assert records == [] and len(problems) == 1
    assert problems[0].startswith(f"{bad}:1: cannot read on: not a valid gzip file")


def test_a_missing_file_is_a_problem(tmp_path):
    assert read(tmp_path / "nope.jsonl") == ([], [f"{tmp_path / 'nope.jsonl'}: cannot open: "
                                                  f"No such file or directory"])
