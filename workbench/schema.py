"""The layout of workbench.db, as a list of migrations; workbench.store applies them.

Tables:

    prompts       one row per distinct prompt (text, plus the turns of a multi-turn prompt)
    batches       a set of items to rank: a sample run or an imported preference file
    items         one prompt of a batch, at a position; its K answers are in `answers`
    answers       (item, idx) -> text and metadata JSON (n_tokens, finished, checkpoint, seed)
    annotators    name (unique) and kind: human | simulated
    sessions      one per (batch, annotator): started/updated times and settings JSON
    shown_orders  the shuffled answer order an item was first shown in, per session, so a
                  resumed session shows the same numbers; also the item's place in the queue
    rankings      an ordering with ties, as JSON groups of answer ids, best group first:
                  [[12], [10, 13], [11]] = 12 best, 10 and 13 tied, 11 worst
    flags         (ranking, answer, flag), flags from workbench.store.FLAGS
    scores        (ranking, answer) -> a 1-7 score

    ranking_sources  where a ranking merged from elsewhere came from: (source, its id there),
                  e.g. ("pack:<uuid>", 12), so merging an annotation pack again adds nothing
    runs          the run store's index of PROJECT/runs/<name>/ folders (workbench/runs.py):
                  stage, status, parent runs, times, last metrics, how far events.jsonl was read

Every part of the workbench that keeps data in this file adds its tables as further migrations
in this one list, since PRAGMA user_version counts one sequence per database.
"""
from __future__ import annotations

# Migrations are append-only: never edit a released step, add a new one. Each runs in one
# transaction together with the bump of PRAGMA user_version, so a crash mid-migration leaves
# the old version intact. Named indexes (not inline UNIQUE) so a later step can drop them.
MIGRATIONS: list[tuple[str, ...]] = [
    # v1: the first layout.
    (
        """CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            text TEXT NOT NULL,
            created_at REAL NOT NULL)""",
        "CREATE UNIQUE INDEX prompts_text ON prompts(text)",
        """CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('sampled', 'imported')),
            created_at REAL NOT NULL,
            source TEXT,
            source_key TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            k INTEGER CHECK (k IS NULL OR k BETWEEN 2 AND 9))""",
        "CREATE UNIQUE INDEX batches_name ON batches(name)",
        "CREATE UNIQUE INDEX batches_source_key ON batches(source_key)",
        """CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            batch_id INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            position INTEGER NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}')""",
        "CREATE UNIQUE INDEX items_position ON items(batch_id, position)",
        "CREATE INDEX items_prompt ON items(prompt_id)",
        """CREATE TABLE answers (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            text TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}')""",
        "CREATE UNIQUE INDEX answers_idx ON answers(item_id, idx)",
        """CREATE TABLE annotators (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('human', 'simulated')),
            created_at REAL NOT NULL)""",
        "CREATE UNIQUE INDEX annotators_name ON annotators(name)",
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            batch_id INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
            annotator_id INTEGER NOT NULL REFERENCES annotators(id),
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}')""",
        "CREATE UNIQUE INDEX sessions_key ON sessions(batch_id, annotator_id)",
        # queue_key: NULL keeps batch order; skip sets it above every other (to the back),
        # undo below every other (to the front).
        """CREATE TABLE shown_orders (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
            is_repeat INTEGER NOT NULL CHECK (is_repeat IN (0, 1)),
            answer_ids TEXT NOT NULL,
            queue_key INTEGER,
            shown_at REAL NOT NULL)""",
        "CREATE UNIQUE INDEX shown_orders_key ON shown_orders(session_id, item_id, is_repeat)",
        """CREATE TABLE rankings (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
            is_repeat INTEGER NOT NULL CHECK (is_repeat IN (0, 1)),
            ordering TEXT NOT NULL,
            simulated INTEGER NOT NULL CHECK (simulated IN (0, 1)),
            note TEXT NOT NULL DEFAULT '',
            duration_s REAL,
            created_at REAL NOT NULL,
            withdrawn_at REAL)""",
        """CREATE UNIQUE INDEX rankings_active ON rankings(session_id, item_id, is_repeat)
            WHERE withdrawn_at IS NULL""",
        "CREATE INDEX rankings_item ON rankings(item_id)",
        # Flag names are checked in Python, not by a CHECK: a new flag should not need a
        # table rebuild, which is the only way SQLite can change a CHECK.
        """CREATE TABLE flags (
            ranking_id INTEGER NOT NULL REFERENCES rankings(id) ON DELETE CASCADE,
            answer_id INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
            flag TEXT NOT NULL,
            PRIMARY KEY (ranking_id, answer_id, flag)) WITHOUT ROWID""",
        """CREATE TABLE scores (
            ranking_id INTEGER NOT NULL REFERENCES rankings(id) ON DELETE CASCADE,
            answer_id INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
            score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 7),
            PRIMARY KEY (ranking_id, answer_id)) WITHOUT ROWID""",
    ),
    # v2: multi-turn prompts (imported "Human: ... Assistant: ..." transcripts). `messages` is
    # the JSON list of turns ('' for a single user message, the common case); the same text
    # with different turns is a different prompt.
    (
        "ALTER TABLE prompts ADD COLUMN messages TEXT NOT NULL DEFAULT ''",
        "DROP INDEX prompts_text",
        "CREATE UNIQUE INDEX prompts_key ON prompts(text, messages)",
    ),
    # v3: the run store. The folders stay the truth; this is an index that RunStore.sync()
    # rebuilds from them, so a lost row costs a re-read, never a run.
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            stage TEXT NOT NULL,
            status TEXT NOT NULL,
            parents TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            error TEXT,
            pid INTEGER,
            step INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            events_offset INTEGER NOT NULL DEFAULT 0)""",
        "CREATE UNIQUE INDEX runs_name ON runs(name)",
    ),
    # v4: annotation packs (workbench/packs.py). A merged ranking remembers the pack ranking it
    # copies; the pack's later undo or re-ranking of that item can then replace it, and a
    # second merge of the same pack finds everything already there.
    (
        """CREATE TABLE ranking_sources (
            ranking_id INTEGER PRIMARY KEY REFERENCES rankings(id) ON DELETE CASCADE,
            source TEXT NOT NULL,
            source_ranking INTEGER NOT NULL)""",
        "CREATE UNIQUE INDEX ranking_sources_key ON ranking_sources(source, source_ranking)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
