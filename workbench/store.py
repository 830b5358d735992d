"""The annotation store: PROJECT/workbench.db (SQLite) holding batches, rankings and who made them.

Tables: workbench/schema.py; the records returned and the checks a ranking passes:
workbench/store_types.py. This module and the parts mixed into Store (store_queue: a session's
queue; store_packs; store_runs: the run index) are the only ones that speak SQL to the database.

A ranking is never deleted by the app: undo sets `withdrawn_at`, so what was once acknowledged
stays on disk and the annotator's earlier input can be offered for editing. At most one
ranking per (session, item, is_repeat) is active (a partial unique index says so). A ranking,
its flags and its scores are written in one transaction; the crash-safety test kills a writer
with SIGKILL many times and finds each ranking wholly present or wholly absent.

Several processes share the file (the app, `workbench rank`, a simulated annotator). In WAL
mode readers never wait; writers take turns on one lock, which `transaction` asks for every
millisecond (`_begin`), so a long writer that leaves a few milliseconds between transactions
lets a person's ranking through at once. What still goes wrong is one StoreError: StoreBusy
after the timeout, DiskFull when nothing more can be written.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from engine.fsutil import disk_full_message
from workbench.schema import MIGRATIONS, SCHEMA_VERSION
from workbench.store_packs import PackTables
from workbench.store_queue import SessionQueue
from workbench.store_runs import RunIndexTable
from workbench.store_types import (ANNOTATOR_KINDS, FLAGS, MAX_K, MIN_K, Annotator, Answer,  # noqa: F401
                                   Batch, DiskFull, InputError, Item, Ranking, RankingError,
                                   StoreBusy, StoreError, check_labels, check_ordering, dumps)

DB_NAME = "workbench.db"
# SQLite's primary result codes (the low byte of sqlite_errorcode).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL = 5, 6, 10, 13
# A full disk shows up as "disk I/O error" where SQLite maps its shared memory: below this, it is.
LOW_DISK_MB = 8.0
LOCK_POLL_S = 0.001


def _code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


class Store(RunIndexTable, PackTables, SessionQueue):
    """One connection to a workbench.db. Not shared between threads (sqlite3's default)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._depth = 0
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise self._translated(e, f"cannot open {self.path}") from None
        try:
            with self._errors(f"cannot open {self.path}"):
                # WAL: the ranking view reads while the CLI or a simulated annotator writes.
                self.conn.execute("PRAGMA journal_mode=WAL")
                # FULL fsyncs the WAL at every commit. With WAL, NORMAL survives a crash of the
                # app but may lose the last commits on power loss, and a ranking the view has
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

    # --- errors, transactions and schema ------------------------------------------------------

    def _translated(self, e: sqlite3.Error, doing: str) -> Exception:
        """The one-line error a user should see for `e`, or `e` itself if it is a bug."""
        code, folder = _code(e), self.path.parent
        try:
            low = shutil.disk_usage(folder).free / 1e6 < LOW_DISK_MB
        except OSError:
            low = False
        if code == SQLITE_FULL or (code == SQLITE_IOERR and low):
            return DiskFull(f"{disk_full_message(folder)} ({doing}; every ranking acknowledged "
                            f"before is kept); free some space and try again")
        if code in (SQLITE_BUSY, SQLITE_LOCKED):
            return StoreBusy(f"{self.path} is busy: another process kept it locked for "
                             f"{self.timeout_s:g} s ({doing}); try again")
        if code == SQLITE_IOERR:
            return StoreError(f"{self.path}: {e} ({doing})")
        return e

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            err = self._translated(e, doing)
            if err is e:
                raise
            raise err from None

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, asked for every millisecond until the timeout. SQLite's own busy
        handler backs off to one try per 100 ms, and a writer that commits chunk after chunk
        frees the lock for a few milliseconds at a time: by the busy handler alone, a person's
        ranking waited out a whole simulated run and then failed with "database is locked"."""
        deadline = time.monotonic() + self.timeout_s
        self.conn.execute("PRAGMA busy_timeout=0")
        try:
            with self._errors("waiting to write"):
                while True:
                    try:
                        self.conn.execute("BEGIN IMMEDIATE")
                        return
                    except sqlite3.OperationalError as e:
                        if _code(e) != SQLITE_BUSY or time.monotonic() >= deadline:
                            raise
                    time.sleep(LOCK_POLL_S)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (a full disk among them).
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: takes the write lock up front, so two writers
        queue instead of failing at COMMIT). Nested use is a savepoint. SQLite's errors that a
        user can meet (busy, disk full) come out as StoreError, not sqlite3.OperationalError."""
        sp = f"sp{self._depth}"
        if self._depth == 0:
            self._begin()
        else:
            self.conn.execute(f"SAVEPOINT {sp}")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._rollback()
                with self._errors("writing"):
                    raise
            if self.conn.in_transaction:
                self.conn.execute(f"ROLLBACK TO {sp}")
                self.conn.execute(f"RELEASE {sp}")
            raise
        self._depth -= 1
        if self._depth:
            self.conn.execute(f"RELEASE {sp}")
            return
        try:
            with self._errors("committing"):
                self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def without_fsync(self) -> Iterator[None]:
        """Commits that survive the process dying but maybe not a power cut (no fsync each):
        for writes that can be made again, so a simulated annotator commits small chunks cheaply."""
        self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")

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

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this workbench "
                             f"knows ({SCHEMA_VERSION}); update the workbench to open it")

    def _migrate(self, target: int | None = None) -> None:
        target = SCHEMA_VERSION if target is None else target
        # A plain read first: opening a current database must not queue for the write lock
        # behind whoever is writing (a simulated annotator can hold it for minutes in all).
        version = self.schema_version
        self._check_version(version)
        while version < target:
            # Read again inside the write transaction, so two processes opening an old
            # database at once migrate it once, one after the other.
            with self.transaction() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version >= target:
                    return
                try:
                    for statement in MIGRATIONS[version]:
                        c.execute(statement)
                except sqlite3.Error as e:
                    raise StoreError(f"{self.path}: migrating the schema from version {version} "
                                     f"to {version + 1} failed: {e}") from e
                c.execute(f"PRAGMA user_version = {version + 1}")
                version += 1

    # --- prompts, batches, items --------------------------------------------------------------

    def prompt_id(self, text: str, messages: list | None = None) -> int:
        """The id of this prompt, added if new."""
        key = dumps(messages) if messages else ""
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
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a batch needs a name that is not blank, got {name!r}")
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM batches WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"a batch named {name!r} already exists")
            batch_id = c.execute(
                "INSERT INTO batches (name, kind, created_at, source, source_key, settings, k) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, kind, time.time(), source, source_key, dumps(dict(settings or {})), k),
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
                    (batch_id, pid, position, dumps(dict(item.get("meta") or {}))),
                ).lastrowid
                ids = [c.execute("INSERT INTO answers (item_id, idx, text, meta) VALUES (?, ?, ?, ?)",
                                 (item_id, i, a["text"], dumps(dict(a.get("meta") or {})))).lastrowid
                       for i, a in enumerate(answers)]
                out.append((item_id, ids))
        return out

    _BATCH_SQL = ("SELECT b.id, b.name, b.kind, b.created_at, b.source, b.source_key, b.settings, "
                  "b.k, (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id) FROM batches b")

    def batch(self, batch_id: int) -> Batch:
        row = self.conn.execute(self._BATCH_SQL + " WHERE b.id = ?", (batch_id,)).fetchone()
        if row is None:
            raise KeyError(f"no batch with id {batch_id}")
        return Batch.from_row(row)

    def batch_by_source_key(self, source_key: str) -> Batch | None:
        row = self.conn.execute(self._BATCH_SQL + " WHERE b.source_key = ?",
                                (source_key,)).fetchone()
        return Batch.from_row(row) if row else None

    def batches(self) -> list[Batch]:
        return [Batch.from_row(r) for r in self.conn.execute(self._BATCH_SQL + " ORDER BY b.id")]

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

    def items_of_prompt(self, text: str, messages: list | None = None) -> list[Item]:
        """Every item, in any batch, of this prompt (oldest first)."""
        key = dumps(messages) if messages else ""
        rows = self.conn.execute(
            "SELECT i.batch_id, i.id FROM items i JOIN prompts p ON p.id = i.prompt_id "
            "WHERE p.text = ? AND p.messages = ? ORDER BY i.id", (text, key)).fetchall()
        return [self.items(batch_id, [item_id])[0] for batch_id, item_id in rows]

    def item(self, item_id: int) -> Item:
        row = self.conn.execute("SELECT batch_id FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id}")
        return self.items(row[0], [item_id])[0]

    def item_ids(self, batch_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM items WHERE batch_id = ? "
                                                "ORDER BY position", (batch_id,))]

    # --- annotators and sessions ---------------------------------------------------------------

    def annotator(self, name: str, kind: str | None = None) -> Annotator:
        """The annotator of this name, added (as `kind`, default human) if new. Asking for an
        existing name with another kind is an error: simulated labels never pass as human."""
        if kind is not None and kind not in ANNOTATOR_KINDS:
            raise ValueError(f"annotator kind must be one of {', '.join(ANNOTATOR_KINDS)}, got {kind!r}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError("an annotator needs a non-empty name")
        sql = "SELECT id, name, kind FROM annotators WHERE name = ?"
        # Looked up before taking the write lock: resuming a session writes nothing.
        row = self.conn.execute(sql, (name,)).fetchone()
        if row is None:
            with self.transaction() as c:
                c.execute("INSERT OR IGNORE INTO annotators (name, kind, created_at) VALUES (?, ?, ?)",
                          (name, kind or "human", time.time()))
                row = c.execute(sql, (name,)).fetchone()
        if kind is not None and row[2] != kind:
            raise ValueError(f"annotator {name!r} exists as {row[2]}, not {kind}; pick another name")
        return Annotator(*row)

    def annotators(self) -> list[Annotator]:
        return [Annotator(*r) for r in self.conn.execute(
            "SELECT id, name, kind FROM annotators ORDER BY id")]

    def session(self, batch_id: int, annotator_id: int, settings: Mapping | None = None
                ) -> tuple[int, dict]:
        """(session id, its settings): the existing session of this annotator on this batch,
        or a new one with `settings`."""
        sql = "SELECT id, settings FROM sessions WHERE batch_id = ? AND annotator_id = ?"
        row = self.conn.execute(sql, (batch_id, annotator_id)).fetchone()
        if row is None:
            with self.transaction() as c:
                if not c.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone():
                    raise KeyError(f"no batch with id {batch_id}")
                now = time.time()
                # OR IGNORE: another process may have made it since the look-up.
                c.execute("INSERT OR IGNORE INTO sessions (batch_id, annotator_id, started_at, "
                          "updated_at, settings) VALUES (?, ?, ?, ?, ?)",
                          (batch_id, annotator_id, now, now, dumps(dict(settings or {}))))
                row = c.execute(sql, (batch_id, annotator_id)).fetchone()
        return row[0], json.loads(row[1])

    def session_settings(self, batch_id: int, annotator: str) -> dict | None:
        """The settings of `annotator`'s session on the batch, None if there is none yet."""
        row = self.conn.execute(
            "SELECT s.settings FROM sessions s JOIN annotators a ON a.id = s.annotator_id "
            "WHERE s.batch_id = ? AND a.name = ?", (batch_id, annotator)).fetchone()
        return json.loads(row[0]) if row else None

    def recent_session(self, kind: str = "human") -> tuple[str, int] | None:
        """(annotator, batch id) of the session of this kind touched last by someone ranking: an
        imported file's session (named after the file) and one a merged pack made (whoever
        ranked it elsewhere) are nobody at the keyboard."""
        row = self.conn.execute(
            "SELECT a.name, s.batch_id FROM sessions s JOIN annotators a ON a.id = s.annotator_id "
            "WHERE a.kind = ? AND json_extract(s.settings, '$.imported_from') IS NULL "
            "AND json_extract(s.settings, '$.merged_from') IS NULL "
            "ORDER BY s.updated_at DESC, s.id DESC LIMIT 1", (kind,)).fetchone()
        return (row[0], row[1]) if row else None

    def ranked_counts(self, batch_id: int | None = None) -> list[tuple[int, str, str, int]]:
        """(batch id, annotator, kind, items ranked: no repeats, none withdrawn) per session,
        oldest first; read-only, where an AnnotationSession would create one per annotator."""
        where, args = ("WHERE s.batch_id = ?", (batch_id,)) if batch_id is not None else ("", ())
        return self.conn.execute(
            "SELECT s.batch_id, a.name, a.kind, (SELECT COUNT(*) FROM rankings r WHERE "
            "r.session_id = s.id AND r.is_repeat = 0 AND r.withdrawn_at IS NULL) FROM sessions s "
            f"JOIN annotators a ON a.id = s.annotator_id {where} ORDER BY s.id", args).fetchall()

    def rankings_stamp(self) -> tuple:
        """What changes whenever a ranking is added, withdrawn or restored: a cheap look, for a
        page that counts the rankings again only then."""
        return tuple(self.conn.execute(
            "SELECT COUNT(*), MAX(id), MAX(withdrawn_at), SUM(withdrawn_at IS NULL) FROM rankings").fetchone())

    def counts(self) -> tuple[int, int]:
        """(batches, rankings to train on): what the app's sidebar shows for the ranking stage,
        the count the reward page gives too (preferences.count_for_training): active, hidden
        repeats left out (they measure consistency), and not every answer tied or all one text
        (no pair). In SQL for the sidebar's refreshes: it differs from count_for_training only for
        a ranking, made before copies were tied, that places a copy apart from itself and the
        other answers tied (a case count_for_training folds and SQL does not)."""
        return tuple(self.conn.execute(
            "SELECT (SELECT COUNT(*) FROM batches), (SELECT COUNT(*) FROM rankings WHERE "
            "withdrawn_at IS NULL AND is_repeat = 0 AND json_array_length(ordering) > 1 AND "
            f"item_id NOT IN ({self._ONE_TEXT_ITEMS}))").fetchone())

    # Items whose answers are all one text: copies count as one answer, so no ranking of them
    # has a pair (engine.transcripts.fold_copies). Older projects could rank copies apart.
    _ONE_TEXT_ITEMS = "SELECT item_id FROM answers GROUP BY item_id HAVING COUNT(DISTINCT text) < 2"

    def copied_answers(self) -> dict[int, dict[int, str]]:
        """{item id: {answer id: text}} for the items that hold copies of one answer text: what
        counting rankings with copies folded needs, without reading every item."""
        out: dict[int, dict[int, str]] = {}
        for item_id, answer_id, text in self.conn.execute(
                "SELECT item_id, id, text FROM answers WHERE item_id IN (SELECT item_id FROM "
                "answers GROUP BY item_id HAVING COUNT(DISTINCT text) < COUNT(*))"):
            out.setdefault(item_id, {})[answer_id] = text
        return out

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
            flag_rows, score_rows = check_labels(flags, scores, set(answer_ids), "answer id")
            if duration_s is not None and not duration_s >= 0:
                raise RankingError(f"duration must be a number of seconds >= 0, got {duration_s!r}")
            now = time.time()
            try:
                rid = c.execute(
                    "INSERT INTO rankings (session_id, item_id, is_repeat, ordering, simulated, note, "
                    "duration_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (session_id, item_id, int(bool(is_repeat)), dumps(groups), int(simulated),
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

    def restore_ranking(self, ranking_id: int) -> bool:
        """Make a withdrawn ranking active again, unless another ranking of its item (in its
        session, first-time or repeat alike) is active now. True if it was restored."""
        with self.transaction() as c:
            return c.execute(
                "UPDATE rankings SET withdrawn_at = NULL WHERE id = :id AND withdrawn_at IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM rankings o, rankings r WHERE r.id = :id "
                "AND o.session_id = r.session_id AND o.item_id = r.item_id AND o.is_repeat = r.is_repeat "
                "AND o.withdrawn_at IS NULL)", {"id": ranking_id}).rowcount == 1

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


