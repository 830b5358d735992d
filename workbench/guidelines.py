"""Ranking guidelines: PROJECT/guidelines.md, shown to each annotator when a session starts.

Rankings are only as good as the agreement on what "better" means, so every project carries
its own guidelines as markdown, editable from the ranking view. A project without the file
gets DEFAULT_GUIDELINES (the InstructGPT labelling priorities, cut down to what this app asks).

The view shows them once per annotator per batch, and again when they have changed since the
annotator last saw them: the record of who has seen which version lives in
PROJECT/guidelines_seen.json as {"<annotator>\\t<batch id>": "<sha256 of the text>"}. Losing it
costs no data, only showing the guidelines once more.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.fsutil import atomic_write_text

GUIDELINES = "guidelines.md"
SEEN = "guidelines_seen.json"

DEFAULT_GUIDELINES = """\
# Ranking guidelines

You see one prompt and several answers to it, numbered in a shuffled order. Put them in order,
**best first**. Judge each answer as a reply a careful person would want to get.

## What makes an answer better, in this order

1. **Correct and truthful.** A right answer beats a wrong one, however well the wrong one reads.
   An answer that invents facts is worse than one that says it does not know.
2. **Harmless.** An answer that could hurt someone is worse than a refusal.
3. **Follows the instruction.** It does what was asked, in the form asked (a number when a
   number was asked for, a list when a list was asked for).
4. **Finished and to the point.** An answer cut off mid-sentence, or padded with unrelated
   text, is worse than a complete, short one.

## Ties

Tie two answers only when you truly cannot prefer one: both right and equally clear, or both
equally useless. A tie teaches the reward model nothing about that pair.

A small model often writes one answer several times; each copy's card says "same answer as n".
Copies are one answer: typing the number of one places them all, tied, and they count once.

## Flags and scores (optional)

* **instruction**: does not do what the prompt asks
* **made-up**: states something false as fact
* **harmful**: could cause harm if followed
* **other**: anything else worth a second look (say what in the note)

A score rates one answer on its own from 1 (useless) to 7 (could not be better); 4 is acceptable.

## Keys

| keys | what they do |
|---|---|
| `3` `1` `2` `Enter` | rank answer 3 best, then 1, then 2, then the last one; submit |
| `=` or `Space` | tie the next answer with the previous one: `3` `1` `=` `2` |
| `Backspace` / `Esc` | take back the last answer / clear the ranking |
| drag a card, `Ctrl+Enter` | rank by dragging; submit the cards' order, top first |
| `F` `2` `h` | flag answer 2: `i` instruction, `m` made-up, `h` harmful, `o` other |
| `G` `2` `5` | score answer 2 with 5 (`0` clears) |
| `N` | write a note (Enter returns to ranking) |
| `S` | skip: the item comes back at the end |
| `Ctrl+Z` or `U` | undo your last ranking and edit it |
| `F1` or `?` | these guidelines |

Every ranking is stored the moment you submit it; you can close the window at any time and
continue later where you left off.
"""


def guidelines_path(project_dir: str | Path) -> Path:
    return Path(project_dir) / GUIDELINES


def read_guidelines(project_dir: str | Path) -> str:
    """The project's guidelines, or DEFAULT_GUIDELINES when it has none yet."""
    try:
        return guidelines_path(project_dir).read_text(encoding="utf-8")
    except FileNotFoundError:
        return DEFAULT_GUIDELINES


def write_guidelines(project_dir: str | Path, text: str) -> None:
    atomic_write_text(guidelines_path(project_dir), text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _seen(project_dir: Path) -> dict:
    try:
        data = json.loads((project_dir / SEEN).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def needs_showing(project_dir: str | Path, annotator: str, batch_id: int) -> bool:
    """True until this annotator has seen the current guidelines for this batch."""
    project_dir = Path(project_dir)
    return _seen(project_dir).get(f"{annotator}\t{batch_id}") != _digest(read_guidelines(project_dir))


def mark_seen(project_dir: str | Path, annotator: str, batch_id: int) -> None:
    project_dir = Path(project_dir)
    seen = _seen(project_dir)
    seen[f"{annotator}\t{batch_id}"] = _digest(read_guidelines(project_dir))
    atomic_write_text(project_dir / SEEN, json.dumps(seen, indent=1, ensure_ascii=False) + "\n")


class ProjectGuidelines:
    """The guidelines of a project folder, as the ranking view asks for them (an annotation
    pack answers the same questions from its own file: workbench.packs.PackGuidelines)."""
    editable = True

    def __init__(self, project_dir: str | Path):
        self.project_dir = Path(project_dir)

    def read(self) -> str:
        return read_guidelines(self.project_dir)

    def write(self, text: str) -> None:
        write_guidelines(self.project_dir, text)

    def needs_showing(self, annotator: str, batch_id: int) -> bool:
        return needs_showing(self.project_dir, annotator, batch_id)

    def mark_seen(self, annotator: str, batch_id: int) -> None:
        mark_seen(self.project_dir, annotator, batch_id)
