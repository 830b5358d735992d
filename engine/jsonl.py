"""The one JSON Lines reader: every stage's data files and the workbench's imports go through it.

`read_jsonl(path, problems)` yields (line number, parsed value) for each non-blank line of a
`.jsonl` file, or of a gzip-compressed one (`.gz`, as public preference sets ship). A line that
cannot be read becomes one `FILE:LINE: reason` entry in `problems` and reading goes on, so a
caller can list every problem of a file before any work starts; what the fields must hold is
the caller's business. Lines are read one at a time: a large file never sits in memory whole.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

BOM = b"\xef\xbb\xbf"    # Windows editors add one; it is not text


def is_gzip(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gz"


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def read_jsonl(path: str | os.PathLike, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) per non-blank line; each bad line becomes a problem.

    Invalid UTF-8 is reported with its byte offset in the file (in the decompressed stream for
    `.gz`), so a hex editor finds it; a gzip file that is corrupt or cut short ends the file
    with one problem naming the line it stopped at."""
    path = Path(path)
    try:
        f = _open(path)
    except OSError as e:
        problems.append(f"{path}: cannot open: {e.strerror or e}")
        return
    offset = 0
    lineno = 0
    with f:
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
                problems.append(f"{path}:{lineno + 1}: cannot read on: {_gzip_reason(e)}")
                return
            if not raw:
                return
            lineno += 1
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
                start += len(BOM)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid UTF-8 at byte offset {start + e.start} "
                                f"({e.reason})")
                continue
            if not text.strip():
                continue
            try:
                # Without its line ending: JSON would put an unclosed record's error on "line 2".
                value = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: malformed JSON at column {e.colno}: {e.msg}")
                continue
            yield lineno, value


def _gzip_reason(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "the gzip stream ends early (the file is cut short)"
    if isinstance(e, gzip.BadGzipFile) or isinstance(e, zlib.error):
        return f"not a valid gzip file ({e})"
    return str(getattr(e, "strerror", None) or e)
