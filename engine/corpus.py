"""Reading the user's text: .txt files and folders, .jsonl with a `text` field, streamed in chunks.

Everything downstream (tokenizer training, token shards) sees the corpus only as a stream of
`Chunk`s of at most `chunk_chars` characters, so a 50 MB file with no newline costs
O(chunk_chars) memory. Bad input is a `CorpusError` that names the file and the line (JSONL)
or the byte offset (invalid UTF-8), so the user can open the file and fix it. After the first
problem the stream yields nothing more but reads on to the end of the corpus, and the error
lists every problem in it: one run finds them all.
"""
from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine.jsonl import BOM, read_jsonl
from engine.runio import InputProblems

EXTENSIONS = (".txt", ".jsonl")


class CorpusError(InputProblems):
    """Unusable corpus input: one problem, or every problem found, each naming the file and
    where in it. A single problem is the whole message."""

    def __init__(self, problems: str | list[str]):
        problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(problems, "corpus", "; nothing was read")
        if len(problems) == 1:
            self.args = (problems[0],)


@dataclass
class Chunk:
    file: Path
    doc_index: int   # global over all files, increasing; a document spans one or more chunks
    text: str
    new_doc: bool    # True on the first chunk of a document (where a <|bos|> belongs)


def config_corpus_files(run_dir: str | os.PathLike, paths: Iterable[str], field: str) -> list[Path]:
    """list_corpus_files of a config field's paths (relative ones to the run folder): a missing
    or unsupported file is a ConfigError naming the field, as every other bad setting is."""
    from engine.config import ConfigError, resolve_path
    try:
        return list_corpus_files([resolve_path(run_dir, p) for p in paths])
    except CorpusError as e:
        raise ConfigError(field, str(e)) from None


def list_corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into .txt/.jsonl files, in a deterministic order.

    Inside a folder, files with other extensions are skipped (a corpus folder often holds a
    README or a licence); a file named explicitly with another extension is an error, because
    the user clearly meant it to be read.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    paths = list(paths)
    if not paths:
        raise CorpusError("no corpus files given")
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CorpusError(f"{p}: no such file or folder")
        if p.is_dir():
            found = sorted(
                (q for q in p.rglob("*")
                 if q.suffix.lower() in EXTENSIONS and q.is_file()
                 and not any(part.startswith(".") for part in q.relative_to(p).parts)),
                key=lambda q: q.relative_to(p).as_posix())
            if not found:   # listed beside others, it would add nothing without a word
                raise CorpusError(f"{p}: no .txt or .jsonl files found in this folder")
            candidates = found
        elif p.suffix.lower() in EXTENSIONS:
            candidates = [p]
        else:
            raise CorpusError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; "
                              f"expected .txt or .jsonl")
        for q in candidates:
            key = q.resolve()
            if key not in seen:  # a file named twice (or inside a named folder) is read once
                seen.add(key)
                out.append(q)
    if not out:
        raise CorpusError(f"no .txt or .jsonl files found in {', '.join(str(p) for p in paths)}")
    return out


def _cut(text: str, limit: int) -> int:
    """Where to end a chunk of `text` (len > limit): just before the last whitespace char.

    Cutting *before* whitespace keeps the GPT-2 pre-tokenizer's grouping (" word" carries its
    leading space), so a chunk boundary changes tokenization as little as possible.
    """
    window = text[:limit]
    for i in range(len(window) - 1, 0, -1):
        if window[i].isspace():
            return i
    return limit


def _split_long(text: str, limit: int) -> Iterator[str]:
    while len(text) > limit:
        i = _cut(text, limit)
        yield text[:i]
        text = text[i:]
    if text:
        yield text


def _iter_txt(path: Path, chunk_chars: int) -> Iterator[str]:
    """Decode incrementally and yield pieces of at most chunk_chars characters."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending = ""
    offset = 0  # file offset of the first byte of the next block
    with open(path, "rb") as f:
        first = True
        while True:
            block = f.read(max(chunk_chars, 64))
            final = not block
            if first:
                first = False
                if block.startswith(BOM):  # Windows editors add one; it is not text
                    block = block[len(BOM):]
                    offset = len(BOM)
            buffered = decoder.getstate()[0]
            try:
                pending += decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                # e.start counts from the decoder's leftover bytes of the previous block
                at = offset - len(buffered) + e.start
                raise CorpusError(f"{path}: invalid UTF-8 at byte offset {at} ({e.reason})") from None
            offset += len(block)
            while len(pending) > chunk_chars:
                i = _cut(pending, chunk_chars)
                yield pending[:i]
                pending = pending[i:]
            if final:
                break
    if pending:
        yield pending


def _record_text(rec: Any, where: str, problems: list[str]) -> str | None:
    """The `text` of a corpus record, or None after noting what is wrong with it."""
    if not isinstance(rec, dict):
        problems.append(f"{where}: expected a JSON object with a 'text' field, got {type(rec).__name__}")
        return None
    if "text" not in rec:
        problems.append(f"{where}: field 'text' is missing (fields: {', '.join(sorted(rec)) or 'none'})")
        return None
    text = rec["text"]
    if not isinstance(text, str):
        problems.append(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate, UTF-8 cannot
        problems.append(f"{where}: field 'text' has an unpaired surrogate {text[e.start]!r} "
                        f"at character {e.start}")
        return None
    return text


def _iter_jsonl(path: Path, problems: list[str]) -> Iterator[str]:
    """The text of each good record (a JSON record is parsed whole: that is JSON's nature)."""
    for lineno, rec in read_jsonl(path, problems):
        text = _record_text(rec, f"{path}:{lineno}", problems)
        if text is not None:
            yield text


def iter_chunks(files: Iterable[str | os.PathLike], chunk_chars: int = 65536) -> Iterator[Chunk]:
    """Stream every document of `files` as chunks of at most `chunk_chars` characters.

    A .txt file is one document; each JSONL record is one. Empty documents yield nothing
    and take no doc_index. Once a problem is found nothing more is yielded, the rest of the
    corpus is only checked, and one CorpusError lists every problem at the end.
    """
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be >= 1")
    doc = 0
    problems: list[str] = []
    for path in files:
        path = Path(path)
        if path.suffix.lower() == ".jsonl":
            documents = (_split_long(t, chunk_chars) for t in _iter_jsonl(path, problems))
        else:
            documents = iter([_checked_txt(path, chunk_chars, problems)])
        for pieces in documents:
            first = True
            for piece in pieces:
                if problems:
                    continue     # only checking from here on
                yield Chunk(path, doc, piece, first)
                first = False
            if not first:
                doc += 1
    if problems:
        raise CorpusError(problems)


def _checked_txt(path: Path, chunk_chars: int, problems: list[str]) -> Iterator[str]:
    """A .txt file's pieces; invalid UTF-8 ends the file as a problem, not an exception."""
    try:
        yield from _iter_txt(path, chunk_chars)
    except CorpusError as e:
        problems.extend(e.problems)


class NonEmptyGuard:
    """Passes chunks through and raises at the end if none held a non-whitespace character.

    The check rides along with the pass that consumes the corpus anyway, instead of a second
    read: without it, the BPE trainer silently returns a vocabulary of bare bytes.
    """

    def __init__(self, chunks: Iterable[Chunk], files: Iterable[str | os.PathLike]):
        self.chunks = chunks
        self.files = [Path(f) for f in files]
        self.seen_text = False
        self.n_chunks = 0
        self.n_chars = 0

    def __iter__(self) -> Iterator[Chunk]:
        for c in self.chunks:
            self.n_chunks += 1
            self.n_chars += len(c.text)
            if not self.seen_text and not c.text.isspace():
                self.seen_text = True
            yield c
        if not self.seen_text:
            raise empty_corpus_error(self.files)


def empty_corpus_error(files: Iterable[Path]) -> CorpusError:
    names = [str(f) for f in files]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return CorpusError(f"empty or whitespace-only corpus: {shown}")


def check_nonempty(files: Iterable[str | os.PathLike], chunk_chars: int = 65536) -> None:
    """A separate pass that stops at the first non-whitespace character (usually at once)."""
    files = [Path(f) for f in files]
    for c in iter_chunks(files, chunk_chars):
        if not c.text.isspace():
            return
    raise empty_corpus_error(files)


def split_draw(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, index): which chunks are held out.

    A hash rather than a seeded RNG so the decision for chunk i does not depend on how many
    draws came before it, and the same chunks are held out on every pass and every machine.
    """
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def corpus_bytes(files: Iterable[str | os.PathLike]) -> int:
    """Total size on disk: an upper bound on characters, for progress reports."""
    return sum(Path(f).stat().st_size for f in files)
