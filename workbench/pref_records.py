"""Preference records read from files: one record (workbench/preferences.py's formats, and
through workbench/pref_formats.py the public ones) checked field by field, and the rows of a
JSON Lines, JSON or Parquet file. Nothing here touches the project's store."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.jsonl import BOM, is_gzip, read_jsonl
from engine.tokenizer import ROLES
from engine.transcripts import same_answer, split_transcripts
from workbench.store import FLAGS, MAX_K, MIN_K, RankingError, check_ordering

@dataclass
class Record:
    """One imported ranking, normalised from any of the formats."""
    line: int | str                         # a line number, or "record N" / "row N"
    prompt: str
    messages: list | None
    answers: list[str]
    ranking: list[list[int]]
    annotator: str | None = None
    simulated: bool | None = None
    flags: list[list[str]] | None = None
    scores: list[int | None] | None = None
    note: str = ""
    repeat: bool = False


# --- one record ------------------------------------------------------------------------------

def _text(rec: dict, key: str, problems: list[str], *, empty_ok: bool = False) -> str:
    v = rec.get(key)
    if key not in rec:
        problems.append(f"field '{key}': missing")
        return ""
    if not isinstance(v, str) or (not empty_ok and not v.strip()):
        problems.append(f"field '{key}' must be a{'' if empty_ok else ' non-empty'} string")
        return ""
    return v


_JSON_TYPES = {type(None): "null", bool: "true or false", int: "a number", float: "a number",
               str: "a string", list: "a list", dict: "an object"}


def json_type(v) -> str:
    """What a JSON value is, in JSON's words (null, a number), not Python's (NoneType, int)."""
    return _JSON_TYPES.get(type(v), type(v).__name__)


def message_problem(v, key: str) -> str | None:
    """Why `v` (field `key`) is not a non-empty list of {role, content} messages, naming the
    first bad field (`messages[1].content`), or None."""
    if not isinstance(v, list) or not v:
        return f"field '{key}' must be a non-empty list of {{role, content}} messages"
    for i, m in enumerate(v):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            return f"field '{at}' must be an object with 'role' and 'content', got {json_type(m)}"
        gone = [f for f in ("role", "content") if f not in m]
        if gone:
            return f"field '{at}.{gone[0]}': missing"
        if m["role"] not in ROLES:
            return f"field '{at}.role' must be one of {', '.join(ROLES)}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"field '{at}.content' must be a string, got {json_type(m['content'])}"
    return None


def _messages(v, problems: list[str]) -> list | None:
    if v is None:
        return None
    why = message_problem(v, "messages")
    if why:
        problems.append(why)
        return None
    if v[-1]["role"] != "user":
        problems.append("field 'messages' must end with a user turn (the answers reply to it)")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _from_transcripts(rec: dict, problems: list[str]):
    chosen, rejected = _text(rec, "chosen", problems), _text(rec, "rejected", problems)
    if problems:
        return None
    try:
        messages, answers = split_transcripts(chosen, rejected)
    except ValueError as e:
        problems.append(str(e))
        return None
    if len(messages) == 1:
        return messages[0]["content"], None, answers
    prompt = "\n\n".join(f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                         for m in messages)
    return prompt, messages, answers


def _per_answer(rec: dict, key: str, k: int, problems: list[str]) -> list | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != k:
        problems.append(f"field '{key}' must be a list with one entry per answer ({k})")
        return None
    for i, x in enumerate(v):
        if key == "flags" and (x is not None and (not isinstance(x, list)
                                                  or any(f not in FLAGS for f in x))):
            problems.append(f"field 'flags[{i}]' must be a list of flags from {', '.join(FLAGS)}")
        if key == "scores" and x is not None and (isinstance(x, bool) or not isinstance(x, int)
                                                  or not 1 <= x <= 7):
            problems.append(f"field 'scores[{i}]' must be a whole number from 1 to 7 or null")
    return v


def parse_record(rec, line: int) -> tuple[Record | None, list[str]]:
    """A Record, or None and the reasons (without FILE:LINE) it is not one."""
    problems: list[str] = []
    if not isinstance(rec, dict):
        return None, [f"expected a JSON object, got {json_type(rec)}"]
    messages = _messages(rec.get("messages"), problems)
    if "ranking" in rec or "answers" in rec:
        prompt = _text(rec, "prompt", problems)
        answers = rec.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            return None, problems + ["field 'answers' must be a list of strings"]
        if not MIN_K <= len(answers) <= MAX_K:
            return None, problems + [f"field 'answers' has {len(answers)} answers; "
                                     f"{MIN_K} to {MAX_K} needed"]
        try:
            ranking = check_ordering(rec.get("ranking"), list(range(len(answers))), "answer index")
        except RankingError as e:
            problems.append(f"field 'ranking': {e}")
            ranking = []
        flags = _per_answer(rec, "flags", len(answers), problems)
        scores = _per_answer(rec, "scores", len(answers), problems)
    elif "chosen" in rec and "prompt" in rec:
        prompt = _text(rec, "prompt", problems)
        answers = [_text(rec, "chosen", problems, empty_ok=True),
                   _text(rec, "rejected", problems, empty_ok=True)]
        if not problems and same_answer(*answers):     # a pair with nothing to prefer
            problems.append(same_answer(*answers))
        ranking, flags, scores = [[0], [1]], None, None
    elif "chosen" in rec and "rejected" in rec:
        got = _from_transcripts(rec, problems)
        if got is None:
            return None, problems
        prompt, messages, answers = got
        ranking, flags, scores = [[0], [1]], None, None
    else:
        return None, ["not a preference record: expected {prompt, answers, ranking}, "
                      "{prompt, chosen, rejected} or {chosen, rejected} transcripts"]
    annotator = rec.get("annotator")
    if annotator is not None and (not isinstance(annotator, str) or not annotator.strip()):
        problems.append("field 'annotator' must be a non-empty string")
    simulated = rec.get("simulated")
    if simulated is not None and not isinstance(simulated, bool):
        problems.append("field 'simulated' must be true or false")
    note, repeat = rec.get("note", ""), rec.get("repeat", False)
    if not isinstance(note, str):
        problems.append("field 'note' must be a string")
    if not isinstance(repeat, bool):
        problems.append("field 'repeat' must be true or false")
    if problems:
        return None, problems
    return Record(line, prompt, messages, answers, ranking, annotator, simulated, flags, scores,
                  note, repeat), []


# --- reading files (any layout; pref_formats.parse_any reads their records) -----------------

def _suffix(path: Path) -> str:
    return Path(path.stem).suffix.lower() if is_gzip(path) else path.suffix.lower()


def rows(path: Path, problems: list[str]) -> Iterator[tuple[int | str, Any]]:
    """(where, value) per record: JSON Lines by line number, a JSON array as "record N",
    Parquet as "row N". Unreadable parts become problems, as in engine.jsonl."""
    suffix = _suffix(path)
    if suffix == ".parquet":
        yield from _parquet_rows(path, problems)
    elif suffix == ".json":
        yield from _json_rows(path, problems)
    else:
        yield from read_jsonl(path, problems)


def _json_rows(path: Path, problems: list[str]) -> Iterator[tuple[int | str, Any]]:
    """A JSON array (Label Studio and Argilla export one), else JSON Lines: `datasets` writes
    JSON Lines to a .json file."""
    try:
        with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as f:
            text = f.read().removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{path}: invalid UTF-8 at byte offset {e.start} ({e.reason})")
        return
    except (OSError, EOFError) as e:
        problems.append(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}")
        return
    if not text.lstrip().startswith("["):
        yield from read_jsonl(path, problems)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}")
        return
    if not value:
        problems.append(f"{path}: no preference records (the file holds an empty JSON list, [])")
    yield from ((f"record {n}", rec) for n, rec in enumerate(value, 1))


def _parquet_rows(path: Path, problems: list[str]) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problems.append(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)")
        return
    n = 0
    try:
        # Batches, not the whole table: a public preference set can be larger than memory
        # allows as Python objects.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (OSError, ValueError) as e:    # ArrowInvalid is a ValueError, ArrowIOError an OSError
        problems.append(f"{path}:row {n + 1}: not readable as Parquet: {e}")


def read_preferences(path: str | Path) -> tuple[list[Record], list[str]]:
    """(records, problems as `FILE:LINE: reason`) for a preference file in any accepted format;
    in a JSON array or a Parquet file LINE is "record N" or "row N"."""
    from workbench import pref_formats     # the file layouts; it builds on this module
    path = Path(path)
    records, problems, n = [], [], 0
    for where, rec in rows(path, problems):
        got, bad = pref_formats.parse_any(rec, where)
        problems += [f"{path}:{where}: {p}" for p in bad]
        records += got
        n += 1
    if not records and not problems:
        why = f"none of its {n} records is ranked" if n else "the file is empty"
        problems.append(f"{path}: no preference records ({why})")
    return records, problems
