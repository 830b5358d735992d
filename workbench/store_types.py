"""What the annotation store holds, as plain data: batches, items, answers, annotators and
rankings, the checks an ordering, a flag or a score must pass, and the errors it raises.

Kept apart from workbench/store.py (the only module that speaks SQL to workbench.db) so that
module stays about SQL; everything here is re-exported there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from engine.runio import InputProblems

FLAGS = ("fails_instruction", "made_up_facts", "harmful", "other")
ANNOTATOR_KINDS = ("human", "simulated")
MIN_K, MAX_K = 2, 9     # a ranking view numbers answers with the keys 1-9


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, failed migration, busy, disk full)."""


class StoreBusy(StoreError):
    """Another process held the write lock for longer than the timeout."""


class DiskFull(StoreError):
    """SQLite could not write: the disk (or the file system's quota) is full."""


class RankingError(ValueError):
    """An ordering, flag or score that does not fit its item; the message says what is wrong."""


class InputError(InputProblems, ValueError):
    """Bad records in a file being imported: every problem as `FILE:LINE: reason`."""

    def __init__(self, problems: Sequence[str], what: str = "input"):
        super().__init__(problems, what)


@dataclass
class Answer:
    id: int
    idx: int
    text: str
    meta: dict


@dataclass
class Item:
    id: int
    batch_id: int
    position: int
    prompt: str
    messages: list | None     # the turns of a multi-turn prompt, else None
    answers: list[Answer]
    meta: dict

    @property
    def answer_ids(self) -> list[int]:
        return [a.id for a in self.answers]


@dataclass
class Batch:
    id: int
    name: str
    kind: str
    created_at: float
    source: str | None
    source_key: str | None
    settings: dict
    k: int | None             # None when items have different numbers of answers
    n_items: int

    @classmethod
    def from_row(cls, row: Sequence) -> "Batch":
        """From the columns in field order, settings as JSON text."""
        return cls(*row[:6], json.loads(row[6]), *row[7:9])


@dataclass
class Annotator:
    id: int
    name: str
    kind: str

    @property
    def simulated(self) -> bool:
        return self.kind == "simulated"


@dataclass
class Ranking:
    id: int
    session_id: int
    item_id: int
    annotator: str
    simulated: bool
    is_repeat: bool
    ordering: list[list[int]]            # groups of answer ids, best first
    flags: dict[int, list[str]] = field(default_factory=dict)   # answer id -> flags
    scores: dict[int, int] = field(default_factory=dict)        # answer id -> 1..7
    note: str = ""
    duration_s: float | None = None
    created_at: float = 0.0
    withdrawn_at: float | None = None


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def check_ordering(ordering: Any, answer_ids: Sequence[int], name: str = "answer") -> list[list[int]]:
    """`ordering` as groups (a bare id is a group of one); every id exactly once, no empty group."""
    if not isinstance(ordering, (list, tuple)) or not ordering:
        raise RankingError("an ordering must be a non-empty list of answers or groups of tied answers")
    groups: list[list[int]] = []
    for g in ordering:
        members = list(g) if isinstance(g, (list, tuple)) else [g]
        if not members:
            raise RankingError("an ordering has an empty group of tied answers")
        for m in members:
            if isinstance(m, bool) or not isinstance(m, int):
                raise RankingError(f"an ordering holds {m!r}, which is not an {name} number")
        groups.append(members)
    known = set(answer_ids)
    seen: set[int] = set()
    for m in (m for g in groups for m in g):
        if m not in known:
            raise RankingError(f"{name} {m} does not exist here (there are {_span(answer_ids)})")
        if m in seen:
            raise RankingError(f"{name} {m} appears twice: rank each {name} exactly once")
        seen.add(m)
    missing = [a for a in answer_ids if a not in seen]
    if missing:
        raise RankingError(f"{name}{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(str, missing))} not ranked: rank every {name} exactly once")
    return groups


def _span(ids: Sequence[int]) -> str:
    ids = list(ids)
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))



def check_labels(flags: Mapping | None, scores: Mapping | None, known: set[int], name: str
            ) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """Validated (answer, flag) and (answer, score) rows; keys are checked against `known`."""
    flag_rows: list[tuple[int, str]] = []
    for a, names in (flags or {}).items():
        if a not in known:
            raise RankingError(f"a flag names {name} {a}, which does not exist here")
        names = [names] if isinstance(names, str) else list(names)
        for f in names:
            if f not in FLAGS:
                raise RankingError(f"unknown flag {f!r} on {name} {a}; flags are {', '.join(FLAGS)}")
        flag_rows += [(a, f) for f in sorted(set(names))]
    score_rows: list[tuple[int, int]] = []
    for a, s in (scores or {}).items():
        if a not in known:
            raise RankingError(f"a score names {name} {a}, which does not exist here")
        if s is None:
            continue
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 7:
            raise RankingError(f"the score of {name} {a} must be a whole number from 1 to 7, got {s!r}")
        score_rows.append((a, s))
    return flag_rows, score_rows
