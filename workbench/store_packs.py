"""The SQL annotation packs need (workbench/packs.py), as a part of Store.

`ranking_sources` links a ranking merged into a project to the pack ranking it copies; a
batch's settings hold a pack's description (which annotator, which project batch, the
guidelines), and a pack records there which guidelines its annotator has read.
"""
from __future__ import annotations

import sqlite3
from typing import Mapping, Optional

from workbench.store_types import dumps


class PackTables:
    """Mixed into Store (which provides `conn` and `transaction()`)."""
    conn: sqlite3.Connection

    def merged_from(self, source: str, source_ranking: int) -> Optional[tuple[int, bool]]:
        """(ranking id, still active) of the ranking merged from `source`'s ranking, if any."""
        row = self.conn.execute(
            "SELECT r.id, r.withdrawn_at IS NULL FROM ranking_sources s JOIN rankings r ON "
            "r.id = s.ranking_id WHERE s.source = ? AND s.source_ranking = ?",
            (source, source_ranking)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def ranking_source(self, ranking_id: int) -> Optional[tuple[str, int]]:
        row = self.conn.execute("SELECT source, source_ranking FROM ranking_sources WHERE "
                                "ranking_id = ?", (ranking_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def link_ranking(self, ranking_id: int, source: str, source_ranking: int) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO ranking_sources (ranking_id, source, source_ranking) "
                      "VALUES (?, ?, ?)", (ranking_id, source, source_ranking))

    def set_batch_settings(self, batch_id: int, settings: Mapping) -> None:
        with self.transaction() as c:
            if c.execute("UPDATE batches SET settings = ? WHERE id = ?",
                         (dumps(dict(settings)), batch_id)).rowcount != 1:
                raise KeyError(f"no batch with id {batch_id}")
