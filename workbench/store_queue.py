"""The SQL of an annotation session's queue (workbench.annotation), as a part of Store.

An item waits in batch order until the session ranks it; skip and undo move a shown item with
a queue key (behind every other, or before); hidden repeats come back after a gap. Rankings
themselves are written by Store.add_ranking.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from typing import Callable, Sequence


class SessionQueue:
    """Mixed into Store (which provides `conn`, `transaction()` and `snapshot()`)."""
    conn: sqlite3.Connection
    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]
    snapshot: Callable[[], AbstractContextManager[sqlite3.Connection]]

    # The next item in batch order that is neither ranked nor moved by skip/undo, from a
    # position on: the items_position index lets SQLite start there and stop at the first hit.
    _NEXT_SQL = """
        SELECT i.position, i.id FROM items i
        WHERE i.batch_id = :b AND i.position >= :start
        AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.session_id = :s AND r.item_id = i.id
                        AND r.is_repeat = 0 AND r.withdrawn_at IS NULL)
        AND NOT EXISTS (SELECT 1 FROM shown_orders o WHERE o.session_id = :s AND o.item_id = i.id
                        AND o.is_repeat = 0 AND o.queue_key IS NOT NULL)
        ORDER BY i.position LIMIT 1"""
    # The first item moved by skip (queue_key > 0) or undo (< 0) and not ranked since.
    _MOVED_SQL = """
        SELECT o.queue_key, i.position, i.id FROM shown_orders o JOIN items i ON i.id = o.item_id
        WHERE o.session_id = :s AND o.is_repeat = 0 AND o.queue_key IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.session_id = :s AND r.item_id = o.item_id
                        AND r.is_repeat = 0 AND r.withdrawn_at IS NULL)
        ORDER BY o.queue_key LIMIT 1"""

    def next_unranked(self, session_id: int, batch_id: int, start: int = 0) -> tuple[int, int] | None:
        """(position, item id) of the first item from `start` on in batch order that the
        session has neither ranked nor moved with skip or undo."""
        return self.conn.execute(self._NEXT_SQL, {"s": session_id, "b": batch_id,
                                                  "start": start}).fetchone()

    def first_moved(self, session_id: int) -> tuple[int, int, int] | None:
        """(queue key, position, item id) of the first item skip or undo moved, unranked since."""
        return self.conn.execute(self._MOVED_SQL, {"s": session_id}).fetchone()

    def session_rankings(self, session_id: int) -> tuple[dict[int, int], set[int], dict[int, int]]:
        """{item: id} of active first rankings, items with an active repeat, {item: queue key}
        of the repeats shown."""
        with self.snapshot() as c:
            originals = {i: rid for rid, i in c.execute(
                "SELECT id, item_id FROM rankings WHERE session_id = ? AND is_repeat = 0 "
                "AND withdrawn_at IS NULL", (session_id,))}
            repeated = {r[0] for r in c.execute(
                "SELECT item_id FROM rankings WHERE session_id = ? AND is_repeat = 1 "
                "AND withdrawn_at IS NULL", (session_id,))}
            keys = dict(c.execute("SELECT item_id, queue_key FROM shown_orders WHERE "
                                  "session_id = ? AND is_repeat = 1", (session_id,)))
        return originals, repeated, keys

    def answer_ids(self, item_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM answers WHERE item_id = ? ORDER BY idx",
                                                (item_id,))]

    def shown_order(self, session_id: int, item_id: int, is_repeat: bool) -> list[int] | None:
        """The answer ids in the order the session first showed them, None if not shown yet."""
        row = self.conn.execute("SELECT answer_ids FROM shown_orders WHERE session_id = ? AND "
                                "item_id = ? AND is_repeat = ?",
                                (session_id, item_id, int(is_repeat))).fetchone()
        return json.loads(row[0]) if row else None

    def record_shown_order(self, session_id: int, item_id: int, is_repeat: bool,
                           answer_ids: Sequence[int]) -> list[int]:
        """Record the order an entry is shown in; returns the one kept (another window on the
        session may have recorded one first)."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO shown_orders (session_id, item_id, is_repeat, "
                      "answer_ids, shown_at) VALUES (?, ?, ?, ?, ?)",
                      (session_id, item_id, int(is_repeat), json.dumps(list(answer_ids)), time.time()))
            return self.shown_order(session_id, item_id, is_repeat)

    def move_in_queue(self, session_id: int, item_id: int, is_repeat: bool, to_back: bool) -> None:
        """Put a shown entry behind every other (skip) or before every other (undo)."""
        with self.transaction() as c:
            lo, hi = c.execute("SELECT MIN(queue_key), MAX(queue_key) FROM shown_orders "
                               "WHERE session_id = ?", (session_id,)).fetchone()
            key = max(hi or 0, 0) + 1 if to_back else min(lo or 0, 0) - 1
            c.execute("UPDATE shown_orders SET queue_key = ? WHERE session_id = ? AND item_id = ? "
                      "AND is_repeat = ?", (key, session_id, item_id, int(is_repeat)))

    def last_ranking(self, session_id: int, among: Sequence[int] | None = None, up_to: int = 0
                     ) -> tuple[int, int, bool] | None:
        """(ranking id, item id, is_repeat) of the session's newest active ranking; given
        `among`, of those with an id in it or no greater than `up_to`. The ids are few: those one
        view stored and has not taken back."""
        ids = sorted(set(among or ()))[-900:]      # under SQLite's oldest limit of bound values
        where = (f" AND (id <= ? OR id IN ({','.join('?' * len(ids))}))" if among is not None else "")
        args = (up_to, *ids) if among is not None else ()
        row = self.conn.execute("SELECT id, item_id, is_repeat FROM rankings WHERE session_id = ? "
                                f"AND withdrawn_at IS NULL{where} ORDER BY id DESC LIMIT 1",
                                (session_id, *args)).fetchone()
        return (row[0], row[1], bool(row[2])) if row else None

    def active_ranking(self, session_id: int, item_id: int, is_repeat: bool = False) -> int | None:
        return next((r[0] for r in self.conn.execute(
            "SELECT id FROM rankings WHERE session_id = ? AND item_id = ? AND is_repeat = ? AND "
            "withdrawn_at IS NULL", (session_id, item_id, int(is_repeat)))), None)

    def session_progress(self, session_id: int) -> tuple[int, int, int, float | None]:
        """(first rankings, repeats, entries waiting after a skip, mean seconds per ranking)."""
        with self.snapshot() as c:
            counts = dict(c.execute(
                "SELECT is_repeat, COUNT(*) FROM rankings WHERE session_id = ? "
                "AND withdrawn_at IS NULL GROUP BY is_repeat", (session_id,)))
            skipped = c.execute(
                "SELECT COUNT(*) FROM shown_orders o WHERE o.session_id = ? AND o.queue_key > 0 "
                "AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.session_id = o.session_id AND "
                "r.item_id = o.item_id AND r.is_repeat = o.is_repeat AND r.withdrawn_at IS NULL)",
                (session_id,)).fetchone()[0]
            mean = c.execute(
                "SELECT AVG(duration_s) FROM rankings WHERE session_id = ? AND withdrawn_at IS NULL "
                "AND duration_s IS NOT NULL", (session_id,)).fetchone()[0]
        return counts.get(0, 0), counts.get(1, 0), skipped, mean
