"""workbench.store: schema and migrations, rankings written whole, and SIGKILL crash safety."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import store as S
from workbench.store import SCHEMA_VERSION, InputError, RankingError, Store, StoreError

ROOT = Path(__file__).resolve().parents[1]


def make_batch(store: Store, n_items: int = 3, k: int = 4, name: str = "b") -> int:
    return store.create_batch(name, [
        {"prompt": f"prompt {i}", "answers": [{"text": f"answer {i}.{j}", "meta": {"j": j}}
                                              for j in range(k)]}
        for i in range(n_items)], k=k)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "workbench.db")
    yield s
    s.close()


def test_new_database_has_current_schema_and_durable_settings(store):
    assert store.schema_version == SCHEMA_VERSION == len(S.MIGRATIONS)
    c = store.conn
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    assert c.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"prompts", "batches", "items", "answers", "annotators", "sessions", "shown_orders",
            "rankings", "flags", "scores"} <= tables


def test_for_project_uses_workbench_db(tmp_path):
    with Store.for_project(tmp_path) as s:
        assert s.path == tmp_path / "workbench.db"
    assert (tmp_path / "workbench.db").is_file()


def _v1_database(path: Path) -> None:
    """A database as the first release wrote it, with a ranking in it."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("BEGIN")
    for statement in S.MIGRATIONS[0]:
        c.execute(statement)
    c.execute("PRAGMA user_version = 1")
    c.execute("INSERT INTO prompts (id, text, created_at) VALUES (1, 'What is 2 + 2?', 0)")
    c.execute("INSERT INTO batches (id, name, kind, created_at, k) VALUES (1, 'old', 'sampled', 0, 2)")
    c.execute("INSERT INTO items (id, batch_id, prompt_id, position) VALUES (1, 1, 1, 0)")
    c.execute("INSERT INTO answers (id, item_id, idx, text) VALUES (1, 1, 0, '4'), (2, 1, 1, '5')")
    c.execute("INSERT INTO annotators (id, name, kind, created_at) VALUES (1, 'ann', 'human', 0)")
    c.execute("INSERT INTO sessions (id, batch_id, annotator_id, started_at, updated_at) "
              "VALUES (1, 1, 1, 0, 0)")
    c.execute("INSERT INTO rankings (id, session_id, item_id, is_repeat, ordering, simulated, "
              "created_at) VALUES (1, 1, 1, 0, '[[1],[2]]', 0, 0)")
    c.execute("INSERT INTO flags VALUES (1, 2, 'made_up_facts')")
    c.execute("INSERT INTO scores VALUES (1, 1, 7), (1, 2, 2)")
    c.execute("COMMIT")
    c.close()


def test_migration_from_v1_keeps_data(tmp_path):
    path = tmp_path / "workbench.db"
    _v1_database(path)
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        [r] = s.rankings()
        assert (r.annotator, r.ordering, r.flags, r.scores) == \
               ("ann", [[1], [2]], {2: ["made_up_facts"]}, {1: 7, 2: 2})
        [item] = s.items(1)
        assert (item.prompt, item.messages, [a.text for a in item.answers]) == \
               ("What is 2 + 2?", None, ["4", "5"])
        # v2's feature works on the migrated data: the same text as a multi-turn prompt is a
        # different prompt, the same single-turn text is the same one.
        assert s.prompt_id("What is 2 + 2?") == 1
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": "What is 2 + 2?"}]
        assert s.prompt_id("What is 2 + 2?", turns) != 1
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_newer_database_is_refused(tmp_path):
    path = tmp_path / "workbench.db"
    Store(path).close()
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 3} is newer .*update"):
        Store(path)


def test_failed_migration_leaves_the_old_version(tmp_path, monkeypatch):
    path = tmp_path / "workbench.db"
    Store(path).close()
    broken = ("CREATE TABLE extra (x INTEGER)", "CREATE TABLE extra (y INTEGER)")
    monkeypatch.setattr(S, "MIGRATIONS", S.MIGRATIONS + [broken])
    monkeypatch.setattr(S, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=rf"from version {SCHEMA_VERSION} to {SCHEMA_VERSION + 1}"):
        Store(path)
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    c.close()


def test_nested_transaction_failure_rolls_back_only_the_inner_part(store):
    with store.transaction():
        store.prompt_id("kept")
        with pytest.raises(ValueError):
            with store.transaction():
                store.prompt_id("dropped")
                raise ValueError("inner")
    texts = {r[0] for r in store.conn.execute("SELECT text FROM prompts")}
    assert texts == {"kept"}


def test_batch_items_and_answers_round_trip(store):
    b = make_batch(store, n_items=2, k=3)
    batch = store.batch(b)
    assert (batch.name, batch.k, batch.n_items, batch.kind) == ("b", 3, 2, "sampled")
    items = store.items(b)
    assert [i.prompt for i in items] == ["prompt 0", "prompt 1"]
    assert [a.meta for a in items[1].answers] == [{"j": 0}, {"j": 1}, {"j": 2}]
    assert store.item(items[1].id) == items[1]
    with pytest.raises(ValueError, match="already exists"):
        make_batch(store)
    with pytest.raises(ValueError, match="10 answers; an item needs 2 to 9"):
        store.create_batch("big", [{"prompt": "p", "answers": [{"text": "x"}] * 10}])
    assert [x.name for x in store.batches()] == ["b"]       # the failed batch left nothing
    assert store.unique_batch_name("b") == "b (2)"


def test_annotator_kind_is_fixed(store):
    a = store.annotator("sim", "simulated")
    assert store.annotator("sim") == a and a.simulated
    with pytest.raises(ValueError, match="exists as simulated, not human"):
        store.annotator("sim", "human")
    with pytest.raises(ValueError, match="kind must be"):
        store.annotator("x", "robot")


def test_add_ranking_stores_flags_scores_and_marks_simulated(store):
    b = make_batch(store)
    item = store.items(b)[0]
    ids = item.answer_ids
    human = store.session(b, store.annotator("ann").id)[0]
    sim = store.session(b, store.annotator("sim", "simulated").id)[0]
    rid = store.add_ranking(human, item.id, [ids[2], [ids[0], ids[3]], ids[1]],
                            flags={ids[1]: ["harmful", "other"]}, scores={ids[2]: 6, ids[1]: None},
                            note="n", duration_s=3.5)
    store.add_ranking(sim, item.id, [[ids[0]], [ids[1]], [ids[2]], [ids[3]]])
    human_r, sim_r = store.rankings(batch_id=b)
    assert human_r.id == rid and not human_r.simulated and sim_r.simulated
    assert human_r.ordering == [[ids[2]], [ids[0], ids[3]], [ids[1]]]
    assert human_r.flags == {ids[1]: ["harmful", "other"]} and human_r.scores == {ids[2]: 6}
    assert (human_r.note, human_r.duration_s) == ("n", 3.5)
    assert [r.id for r in store.rankings(include_simulated=False)] == [rid]
    assert [r.annotator for r in store.rankings(include_human=False)] == ["sim"]


@pytest.mark.parametrize("ordering,flags,scores,message", [
    ("missing", None, None, r"answer id \d+ not ranked: rank every answer id exactly once"),
    ("twice", None, None, r"answer id \d+ appears twice"),
    ("foreign", None, None, r"answer id \d+ does not exist here"),
    ([], None, None, "non-empty list"),
    ([[]], None, None, "empty group"),
    (["x"], None, None, "'x', which is not an answer id number"),
    ("ok", {"first": ["rude"]}, None, "unknown flag 'rude'"),
    ("ok", None, {"first": 8}, "whole number from 1 to 7, got 8"),
    ("ok", None, {"first": True}, "whole number from 1 to 7, got True"),
    ("ok", None, {"foreign": 3}, r"a score names answer id \d+, which does not exist here"),
])
def test_bad_rankings_are_refused_and_leave_nothing(store, ordering, flags, scores, message):
    b = make_batch(store)
    items = store.items(b)
    ids, other = items[0].answer_ids, items[1].answer_ids
    named = {"missing": ids[:3], "twice": ids + [ids[0]], "foreign": ids[:3] + [other[0]],
             "ok": ids}
    names = {"first": ids[0], "foreign": other[0]}
    sid = store.session(b, store.annotator("ann").id)[0]
    with pytest.raises(RankingError, match=message):
        store.add_ranking(sid, items[0].id, named.get(ordering, ordering) if isinstance(ordering, str)
                          else ordering,
                          flags={names[k]: v for k, v in (flags or {}).items()},
                          scores={names[k]: v for k, v in (scores or {}).items()})
    assert store.rankings(include_withdrawn=True) == []


def test_one_active_ranking_per_item_and_withdraw_keeps_the_row(store):
    b = make_batch(store)
    item = store.items(b)[0]
    sid = store.session(b, store.annotator("ann").id)[0]
    first = store.add_ranking(sid, item.id, item.answer_ids)
    with pytest.raises(RankingError, match="already has a ranking .* undo it first"):
        store.add_ranking(sid, item.id, item.answer_ids)
    store.add_ranking(sid, item.id, item.answer_ids, is_repeat=True)    # a repeat is separate
    store.withdraw_ranking(first)
    with pytest.raises(KeyError):
        store.withdraw_ranking(first)
    second = store.add_ranking(sid, item.id, list(reversed(item.answer_ids)))
    everything = store.rankings(include_withdrawn=True)
    assert [(r.id, r.withdrawn_at is not None) for r in everything if not r.is_repeat] == \
           [(first, True), (second, False)]


def test_input_error_lists_and_caps_problems():
    e = InputError([f"f.jsonl:{i}: bad" for i in range(1, 26)], "preference file f.jsonl")
    lines = str(e).splitlines()
    assert lines[0] == "25 problem(s) in the preference file f.jsonl:"
    assert lines[1] == "  f.jsonl:1: bad" and lines[20] == "  f.jsonl:20: bad"
    assert lines[-1] == "  ... and 5 more"


# --- crash safety ----------------------------------------------------------------------------

K = 4
FLAGS_PER_RANKING = 2
# A writer that acknowledges each ranking on stdout only after its transaction committed, the
# way the ranking view acknowledges a keypress. It imports nothing heavy, so it starts fast.
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from workbench.store import Store
store = Store(sys.argv[2])
session = int(sys.argv[3])
for item in map(int, sys.argv[4].split(",")):
    ids = [r[0] for r in store.conn.execute(
        "SELECT id FROM answers WHERE item_id = ? ORDER BY idx", (item,))]
    rid = store.add_ranking(session, item, [[ids[0]], ids[1:3], [ids[3]]],
                            flags={ids[0]: ["harmful", "other"]},
                            scores={a: j + 1 for j, a in enumerate(ids)}, note="x" * 3000)
    print(rid, flush=True)
"""


# The negative control: the same rows written as separate autocommitted statements. The check
# below must catch it, or it could not catch a store that lost its transactions.
UNSAFE_WRITER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[2], isolation_level=None)
c.execute("PRAGMA synchronous=FULL")
session = int(sys.argv[3])
for item in map(int, sys.argv[4].split(",")):
    ids = [r[0] for r in c.execute("SELECT id FROM answers WHERE item_id = ? ORDER BY idx", (item,))]
    rid = c.execute("INSERT INTO rankings (session_id, item_id, is_repeat, ordering, simulated, "
                    "created_at) VALUES (?, ?, 0, '[]', 0, ?)", (session, item, time.time())).lastrowid
    for f in ("harmful", "other"):
        c.execute("INSERT INTO flags VALUES (?, ?, ?)", (rid, ids[0], f))
    for j, a in enumerate(ids):
        c.execute("INSERT INTO scores VALUES (?, ?, ?)", (rid, a, j + 1))
    print(rid, flush=True)
"""


def kill_writers(path: Path, writer: str, n_kills: int, seed: int) -> tuple[set[int], int]:
    """Start `writer` n_kills times, each on its own session, and SIGKILL it at a varied moment
    once it is writing; returns (acknowledged ranking ids, number of kills that landed)."""
    rng = random.Random(seed)
    with Store(path) as s:
        b = make_batch(s, n_items=300, k=K, name=f"crash {seed}")
        items = s.item_ids(b)
        sessions = [s.session(b, s.annotator(f"writer{seed}.{j}").id)[0] for j in range(n_kills)]
    acked: set[int] = set()
    kills = 0
    for session in sessions:
        child = subprocess.Popen(
            [sys.executable, "-c", writer, str(ROOT), str(path), str(session),
             ",".join(map(str, items))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = child.stdout.readline()      # the writer is in its loop now
        assert first.strip().isdigit(), child.stderr.read()
        acked.add(int(first))
        # Varied moments: after 0-20 more acknowledgements, then a random few milliseconds
        # (about one commit's time), so the kill lands anywhere in the writer's loop.
        for _ in range(rng.choice([0, 1, 2, 5, 10, 20])):
            line = child.stdout.readline()
            if not line:
                break
            acked.add(int(line))
        time.sleep(rng.uniform(0, 0.005))
        os.kill(child.pid, signal.SIGKILL)
        # Through the same buffered reader as readline (communicate() would skip its buffer):
        # every line the writer printed before the kill landed is an acknowledgement.
        acked.update(int(x) for x in child.stdout.read().split())
        child.stderr.read()
        kills += child.wait(timeout=10) == -signal.SIGKILL
        child.stdout.close()
        child.stderr.close()
    return acked, kills


def partial_rankings(c: sqlite3.Connection) -> list[tuple]:
    counts = c.execute(
        "SELECT r.id, (SELECT COUNT(*) FROM scores WHERE ranking_id = r.id), "
        "(SELECT COUNT(*) FROM flags WHERE ranking_id = r.id) FROM rankings r").fetchall()
    return [row for row in counts if row[1:] != (K, FLAGS_PER_RANKING)]


def test_sigkill_while_writing_never_loses_an_acknowledged_ranking(tmp_path):
    path = tmp_path / "workbench.db"
    acked, kills = kill_writers(path, WRITER, 24, seed=1234)
    assert kills >= 20
    with Store(path) as s:
        c = s.conn
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        present = {r[0] for r in c.execute("SELECT id FROM rankings")}
        assert acked <= present, f"lost acknowledged rankings {sorted(acked - present)[:10]}"
        assert len(present) >= 24
        # Whole or absent: every ranking that is there has all its flags and scores.
        assert partial_rankings(c) == []


def test_the_crash_check_catches_a_writer_without_transactions(tmp_path):
    path = tmp_path / "workbench.db"
    kill_writers(path, UNSAFE_WRITER, 8, seed=99)
    with Store(path) as s:
        assert partial_rankings(s.conn) != []


def test_add_items_appends_after_the_last_position_in_one_transaction(tmp_path):
    store = Store(tmp_path / "p.db")
    batch = store.create_batch("b", [{"prompt": "p0", "answers": [{"text": "a"}, {"text": "b"}]}])
    [(item, answers)] = store.add_items(batch, [{"prompt": "p1", "answers": [{"text": "c"}, {"text": "d"}]}])
    assert [i.position for i in store.items(batch)] == [0, 1]
    assert len(answers) == 2 and store.items(batch)[1].id == item
    with pytest.raises(ValueError, match="item 3 has 1 answers"):
        store.add_items(batch, [{"prompt": "p2", "answers": [{"text": "e"}, {"text": "f"}]},
                                {"prompt": "p3", "answers": [{"text": "g"}]}])
    assert len(store.items(batch)) == 2   # the good item of the refused call is not kept either
    store.close()


def test_counts_are_batches_and_the_rankings_to_train_on(store):
    from workbench.preferences import count_for_training
    assert store.counts() == (0, 0)
    batch = make_batch(store, n_items=2, k=2)
    make_batch(store, n_items=1, k=2, name="other")
    who = store.annotator("ann")
    sid, _ = store.session(batch, who.id)
    items = store.items(batch)
    first = store.add_ranking(sid, items[0].id, [[a] for a in items[0].answer_ids])
    store.add_ranking(sid, items[1].id, [[a] for a in items[1].answer_ids])
    assert store.counts() == (2, 2)
    store.add_ranking(sid, items[1].id, [[a] for a in items[1].answer_ids], is_repeat=True)
    store.withdraw_ranking(first)
    store.add_ranking(sid, items[0].id, [items[0].answer_ids])     # every answer tied: no pair
    # the rankings a reward model trains on, as the reward page counts them
    counted = count_for_training(store)
    assert store.counts() == (2, 1) == (2, counted.human + counted.simulated)
