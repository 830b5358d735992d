"""The run index's table in the project store: the SQL of `runs`, as a part of Store.

The run folders are the truth; this table is an index over them that workbench/runs.py keeps
in step (RunStore.sync). Its rows are plain dicts with the table's columns.
"""
from __future__ import annotations

import sqlite3
from typing import Iterable, Optional

COLUMNS = ("name", "stage", "status", "parents", "created_at", "started_at", "ended_at", "error",
           "pid", "step", "metrics", "events_offset")
_UPSERT = (f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
           "ON CONFLICT(name) DO UPDATE SET "
           + ", ".join(f"{c}=excluded.{c}" for c in COLUMNS if c not in ("name", "created_at")))


def _dict_row(cursor, row) -> dict:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class RunIndexTable:
    """Mixed into Store (which provides `conn` and `transaction()`)."""
    conn: sqlite3.Connection

    def run_rows(self, stage: Optional[str] = None) -> list[dict]:
        """Every indexed run (of a stage), newest first."""
        query = ("SELECT * FROM runs" + (" WHERE stage = ?" if stage else "")
                 + " ORDER BY created_at DESC, name DESC")
        cur = self.conn.execute(query, (stage,) if stage else ())
        cur.row_factory = _dict_row
        return list(cur)

    def write_runs(self, rows: Iterable[dict], forget: Iterable[str] = ()) -> None:
        """Insert or update the rows and drop the named runs, in one transaction."""
        with self.transaction() as c:
            for name in forget:
                c.execute("DELETE FROM runs WHERE name = ?", (name,))
            for row in rows:
                c.execute(_UPSERT, tuple(row[k] for k in COLUMNS))

    def index_without_fsync(self) -> None:
        """The index is rebuilt from the folders whenever it is lost, so its commits need not
        wait for the disk (FULL, the annotation store's setting, fsyncs every one; the app
        syncs every few seconds on the UI thread). For a connection of the index's own."""
        self.conn.execute("PRAGMA synchronous=OFF")
