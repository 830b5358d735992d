"""The annotation store: PROJECT/workbench.db (SQLite) holding batches, rankings and who made them.

Tables and their columns: workbench/schema.py.

A ranking is never deleted by the app: undo sets `withdrawn_at`, so what was once acknowledged
stays on disk and the annotator's earlier input can be offered for editing. At most one
ranking per (session, item, is_repeat) is active (a partial unique index says so).

A ranking, its flags and its scores are written in one transaction; the crash-safety test kills
a writer with SIGKILL many times and finds each ranking wholly present or wholly absent.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from engine.runio import InputProblems
from workbench.schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "workbench.db"
FLAGS = ("fails_instruction", "made_up_facts", "harmful", "other")
ANNOTATOR_KINDS = ("human", "simulated")
MIN_K, MAX_K = 2, 9     # a ranking view numbers answers with the keys 1-9


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, failed migration)."""


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


def _dumps(value: Any) -> str:
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


class Store:
    """One connection to a workbench.db. Not shared between threads (sqlite3's default)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0):
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self._depth = 0
        try:
            # WAL: the ranking view reads while the CLI or a simulated annotator writes.
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL fsyncs the WAL at every commit. With WAL, NORMAL survives a crash of the app
            # but may lose the last commits on power loss, and a ranking the view has
            # acknowledged must survive both: an annotator's minute is worth more than an fsync.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    @classmethod
    def for_project(cls, project_dir: str | Path) -> "Store":
        return cls(Path(project_dir) / DB_NAME)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions and schema ------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: takes the write lock up front, so two writers
        queue on the busy timeout instead of failing at COMMIT). Nested use is a savepoint."""
        sp = f"sp{self._depth}"
        self.conn.execute("BEGIN IMMEDIATE" if self._depth == 0 else f"SAVEPOINT {sp}")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self.conn.execute("ROLLBACK")
            else:
                self.conn.execute(f"ROLLBACK TO {sp}")
                self.conn.execute(f"RELEASE {sp}")
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        else:
            self.conn.execute(f"RELEASE {sp}")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one state, and writers are not blocked."""
        if self._depth:
            yield self.conn
            return
        self.conn.execute("BEGIN")
        self._depth += 1
        try:
            yield self.conn
        finally:
            self._depth -= 1
            self.conn.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self, target: int | None = None) -> None:
        target = SCHEMA_VERSION if target is None else target
        while True:
            # The version is read inside the write transaction, so two processes opening an
            # old database at once migrate it once, one after the other.
            with self.transaction() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema version {version} is newer than this workbench "
                        f"knows ({SCHEMA_VERSION}); it was written by a newer workbench; "
                        f"update the workbench to open it")
                if version >= target:
                    return
                try:
                    for statement in MIGRATIONS[version]:
                        c.execute(statement)
                except sqlite3.Error as e:
                    raise StoreError(f"{self.path}: migrating the schema from version {version} "
                                     f"to {version + 1} failed: {e}") from e
                c.execute(f"PRAGMA user_version = {version + 1}")

    # --- prompts, batches, items --------------------------------------------------------------

    def prompt_id(self, text: str, messages: list | None = None) -> int:
        """The id of this prompt, added if new."""
        key = _dumps(messages) if messages else ""
        with self.transaction() as c:
            row = c.execute("SELECT id FROM prompts WHERE text = ? AND messages = ?",
                            (text, key)).fetchone()
            if row:
                return row[0]
            return c.execute("INSERT INTO prompts (text, messages, created_at) VALUES (?, ?, ?)",
                             (text, key, time.time())).lastrowid

    def create_batch(self, name: str, items: Iterable[Mapping], *, kind: str = "sampled",
                     source: str | None = None, source_key: str | None = None,
                     settings: Mapping | None = None, k: int | None = None) -> int:
        """A new batch with its items, in one transaction. Each item is a mapping
        `{prompt, messages?, answers: [{text, meta?}], meta?}`; positions follow the order given."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM batches WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"a batch named {name!r} already exists")
            batch_id = c.execute(
                "INSERT INTO batches (name, kind, created_at, source, source_key, settings, k) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, kind, time.time(), source, source_key, _dumps(dict(settings or {})), k),
            ).lastrowid
            self.add_items(batch_id, items)
            return batch_id

    def add_items(self, batch_id: int, items: Iterable[Mapping]) -> list[tuple[int, list[int]]]:
        """Append items to a batch (positions continue after its last), in one transaction;
        items as for create_batch. Returns (item id, answer ids) per item."""
        out = []
        with self.transaction() as c:
            start = c.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items WHERE batch_id = ?",
                              (batch_id,)).fetchone()[0]
            for position, item in enumerate(items, start):
                answers = list(item["answers"])
                if not MIN_K <= len(answers) <= MAX_K:
                    raise ValueError(f"item {position} has {len(answers)} answers; "
                                     f"an item needs {MIN_K} to {MAX_K}")
                pid = self.prompt_id(item["prompt"], item.get("messages"))
                item_id = c.execute(
                    "INSERT INTO items (batch_id, prompt_id, position, meta) VALUES (?, ?, ?, ?)",
                    (batch_id, pid, position, _dumps(dict(item.get("meta") or {}))),
                ).lastrowid
                ids = [c.execute("INSERT INTO answers (item_id, idx, text, meta) VALUES (?, ?, ?, ?)",
                                 (item_id, i, a["text"], _dumps(dict(a.get("meta") or {})))).lastrowid
                       for i, a in enumerate(answers)]
                out.append((item_id, ids))
        return out

    def _batch(self, row) -> Batch:
        return Batch(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7],
                     row[8])

    _BATCH_SQL = ("SELECT b.id, b.name, b.kind, b.created_at, b.source, b.source_key, b.settings, "
                  "b.k, (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id) FROM batches b")

    def batch(self, batch_id: int) -> Batch:
        row = self.conn.execute(self._BATCH_SQL + " WHERE b.id = ?", (batch_id,)).fetchone()
        if row is None:
            raise KeyError(f"no batch with id {batch_id}")
        return self._batch(row)

    def batch_by_source_key(self, source_key: str) -> Batch | None:
        row = self.conn.execute(self._BATCH_SQL + " WHERE b.source_key = ?",
                                (source_key,)).fetchone()
        return self._batch(row) if row else None

    def batches(self) -> list[Batch]:
        return [self._batch(r) for r in self.conn.execute(self._BATCH_SQL + " ORDER BY b.id")]

    def unique_batch_name(self, base: str) -> str:
        name, n = base, 1
        while self.conn.execute("SELECT 1 FROM batches WHERE name = ?", (name,)).fetchone():
            n += 1
            name = f"{base} ({n})"
        return name

    def items(self, batch_id: int, item_ids: Sequence[int] | None = None) -> list[Item]:
        """The batch's items in position order, each with its answers (all of them, or `item_ids`)."""
        if item_ids is None:
            where, args = "i.batch_id = ?", [batch_id]
        else:
            ids = sorted(set(item_ids))
            where, args = f"i.batch_id = ? AND i.id IN ({','.join('?' * len(ids))})", [batch_id, *ids]
        with self.snapshot() as c:
            rows = c.execute(
                "SELECT i.id, i.position, p.text, p.messages, i.meta FROM items i JOIN prompts p "
                f"ON p.id = i.prompt_id WHERE {where} ORDER BY i.position", args).fetchall()
            answers: dict[int, list[Answer]] = {r[0]: [] for r in rows}
            for item_id, aid, idx, text, meta in c.execute(
                    "SELECT a.item_id, a.id, a.idx, a.text, a.meta FROM answers a JOIN items i ON "
                    f"i.id = a.item_id WHERE {where} ORDER BY a.item_id, a.idx", args):
                answers[item_id].append(Answer(aid, idx, text, json.loads(meta)))
        return [Item(r[0], batch_id, r[1], r[2], json.loads(r[3]) if r[3] else None,
                     answers[r[0]], json.loads(r[4])) for r in rows]

    def item(self, item_id: int) -> Item:
        row = self.conn.execute("SELECT batch_id FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id}")
        return self.items(row[0], [item_id])[0]

    def item_ids(self, batch_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM items WHERE batch_id = ? ORDER BY position", (batch_id,))]

    # --- annotators and sessions ---------------------------------------------------------------

    def annotator(self, name: str, kind: str | None = None) -> Annotator:
        """The annotator of this name, added (as `kind`, default human) if new. Asking for an
        existing name with another kind is an error: simulated labels never pass as human."""
        if kind is not None and kind not in ANNOTATOR_KINDS:
            raise ValueError(f"annotator kind must be one of {', '.join(ANNOTATOR_KINDS)}, got {kind!r}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError("an annotator needs a non-empty name")
        with self.transaction() as c:
            row = c.execute("SELECT id, name, kind FROM annotators WHERE name = ?", (name,)).fetchone()
            if row:
                if kind is not None and row[2] != kind:
                    raise ValueError(f"annotator {name!r} exists as {row[2]}, not {kind}; "
                                     f"pick another name")
                return Annotator(*row)
            kind = kind or "human"
            aid = c.execute("INSERT INTO annotators (name, kind, created_at) VALUES (?, ?, ?)",
                            (name, kind, time.time())).lastrowid
            return Annotator(aid, name, kind)

    def annotators(self) -> list[Annotator]:
        return [Annotator(*r) for r in self.conn.execute(
            "SELECT id, name, kind FROM annotators ORDER BY id")]

    def session(self, batch_id: int, annotator_id: int, settings: Mapping | None = None
                ) -> tuple[int, dict]:
        """(session id, its settings): the existing session of this annotator on this batch,
        or a new one with `settings`."""
        with self.transaction() as c:
            row = c.execute("SELECT id, settings FROM sessions WHERE batch_id = ? AND annotator_id = ?",
                            (batch_id, annotator_id)).fetchone()
            if row:
                return row[0], json.loads(row[1])
            if not c.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone():
                raise KeyError(f"no batch with id {batch_id}")
            now = time.time()
            sid = c.execute("INSERT INTO sessions (batch_id, annotator_id, started_at, updated_at, "
                            "settings) VALUES (?, ?, ?, ?, ?)",
                            (batch_id, annotator_id, now, now, _dumps(dict(settings or {})))).lastrowid
            return sid, dict(settings or {})

    # --- rankings -----------------------------------------------------------------------------

    def add_ranking(self, session_id: int, item_id: int, ordering: Sequence, *,
                    is_repeat: bool = False, flags: Mapping[int, Iterable[str]] | None = None,
                    scores: Mapping[int, int] | None = None, note: str = "",
                    duration_s: float | None = None) -> int:
        """Store one ranking (answer ids, best group first) with its flags and scores, in one
        transaction; returns its id. `simulated` comes from the session's annotator."""
        with self.transaction() as c:
            row = c.execute("SELECT a.kind FROM sessions s JOIN annotators a ON a.id = s.annotator_id "
                            "WHERE s.id = ?", (session_id,)).fetchone()
            if row is None:
                raise KeyError(f"no session with id {session_id}")
            simulated = row[0] == "simulated"
            answer_ids = [r[0] for r in c.execute(
                "SELECT id FROM answers WHERE item_id = ? ORDER BY idx", (item_id,))]
            if not answer_ids:
                raise KeyError(f"no item with id {item_id}")
            groups = check_ordering(ordering, answer_ids, "answer id")
            flag_rows, score_rows = _labels(flags, scores, set(answer_ids), "answer id")
            if duration_s is not None and not duration_s >= 0:
                raise RankingError(f"duration must be a number of seconds >= 0, got {duration_s!r}")
            now = time.time()
            try:
                rid = c.execute(
                    "INSERT INTO rankings (session_id, item_id, is_repeat, ordering, simulated, note, "
                    "duration_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (session_id, item_id, int(bool(is_repeat)), _dumps(groups), int(simulated),
                     str(note or ""), duration_s, now)).lastrowid
            except sqlite3.IntegrityError:
                raise RankingError(f"item {item_id} already has a ranking in session {session_id}"
                                   f"{' as a repeat' if is_repeat else ''}; undo it first") from None
            c.executemany("INSERT INTO flags (ranking_id, answer_id, flag) VALUES (?, ?, ?)",
                          [(rid, a, f) for a, f in flag_rows])
            c.executemany("INSERT INTO scores (ranking_id, answer_id, score) VALUES (?, ?, ?)",
                          [(rid, a, s) for a, s in score_rows])
            c.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
            return rid

    def withdraw_ranking(self, ranking_id: int) -> None:
        with self.transaction() as c:
            now = time.time()
            n = c.execute("UPDATE rankings SET withdrawn_at = ? WHERE id = ? AND withdrawn_at IS NULL",
                          (now, ranking_id)).rowcount
            if n != 1:
                raise KeyError(f"no active ranking with id {ranking_id}")
            c.execute("UPDATE sessions SET updated_at = ? WHERE id = "
                      "(SELECT session_id FROM rankings WHERE id = ?)", (now, ranking_id))

    _RANKING_SQL = ("SELECT r.id, r.session_id, r.item_id, a.name, r.simulated, r.is_repeat, "
                    "r.ordering, r.note, r.duration_s, r.created_at, r.withdrawn_at FROM rankings r "
                    "JOIN sessions s ON s.id = r.session_id JOIN annotators a ON a.id = s.annotator_id")

    def rankings(self, *, batch_id: int | None = None, session_id: int | None = None,
                 item_id: int | None = None, include_simulated: bool = True,
                 include_human: bool = True, include_repeats: bool = True,
                 include_withdrawn: bool = False) -> list[Ranking]:
        """Rankings with their flags and scores, oldest first."""
        where, args = [], []
        for column, value in (("s.batch_id", batch_id), ("r.session_id", session_id),
                              ("r.item_id", item_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if not include_simulated:
            where.append("r.simulated = 0")
        if not include_human:
            where.append("r.simulated = 1")
        if not include_repeats:
            where.append("r.is_repeat = 0")
        if not include_withdrawn:
            where.append("r.withdrawn_at IS NULL")
        sql = self._RANKING_SQL + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.id"
        with self.snapshot() as c:
            out = [Ranking(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), json.loads(r[6]),
                           note=r[7], duration_s=r[8], created_at=r[9], withdrawn_at=r[10])
                   for r in c.execute(sql, args)]
            by_id = {r.id: r for r in out}
            if by_id:
                # One query over the id range rather than one per ranking: exports read thousands.
                lo, hi = min(by_id), max(by_id)
                for rid, aid, flag in c.execute(
                        "SELECT ranking_id, answer_id, flag FROM flags WHERE ranking_id BETWEEN ? "
                        "AND ? ORDER BY ranking_id, answer_id, flag", (lo, hi)):
                    if rid in by_id:
                        by_id[rid].flags.setdefault(aid, []).append(flag)
                for rid, aid, score in c.execute(
                        "SELECT ranking_id, answer_id, score FROM scores WHERE ranking_id BETWEEN ? "
                        "AND ? ORDER BY ranking_id, answer_id", (lo, hi)):
                    if rid in by_id:
                        by_id[rid].scores[aid] = score
        return out


def _labels(flags: Mapping | None, scores: Mapping | None, known: set[int], name: str
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
