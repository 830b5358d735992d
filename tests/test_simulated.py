"""workbench.simulated: a programmable preference, labelled simulated, through the session API."""
from __future__ import annotations

import pytest

from engine.tasks import generate_tasks
from workbench.agreement import agreement
from workbench.preferences import rankings_for_training
from workbench.simulated import (DEFAULT_NAME, correct_first, rank_answers, rank_batch,
                                 shorter_first)
from workbench.store import Store


def ans(text, finished=True):
    return (text, {"finished": finished, "n_tokens": len(text)})


def test_demo_preference_correct_then_finished_then_short():
    answers = [
        ans("The answer is 68."),          # 0 correct, long
        ans("67"),                         # 1 wrong, short
        ans("68"),                         # 2 correct, short
        ans("68\nQuestion: What", False),  # 3 correct on its first line, but never ended
        ans("68"),                         # 4 the same as 2: tied with it
        ans("sixty-eight or so"),          # 5 wrong, long
    ]
    assert rank_answers("What is 50 + 18?", answers) == [[2, 4], [0], [3], [1], [5]]


def test_not_a_task_falls_through_to_the_next_keys():
    answers = [ans("a longer reply"), ans("short"), ans("tiny", False), ans("short")]
    # No task: correctness ties everything; unfinished last; then brevity, ties for equals.
    assert rank_answers("Tell me about owls.", answers) == [[1, 3], [0], [2]]


def test_custom_preference():
    answers = [ans("bb"), ans("a"), ans("ccc")]
    longest = [lambda c: -len(c.text)]
    assert rank_answers("anything", answers, longest) == [[2], [0], [1]]
    assert rank_answers("anything", answers, [shorter_first]) == [[1], [0], [2]]
    assert rank_answers("anything", answers, [correct_first]) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="at least one key"):
        rank_answers("anything", answers, [])


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db")
    yield s
    s.close()


def demo_batch(store, n=12):
    """Demo prompts with one right answer (long-winded), one right and short, and a wrong one."""
    items = []
    for task in generate_tasks(n, seed=5):
        items.append({"prompt": task.prompt, "answers": [
            {"text": f"The answer is {task.answer}.", "meta": {"finished": True}},
            {"text": "I do not know", "meta": {"finished": True}},
            {"text": task.answer, "meta": {"finished": True}}]})
    return store.create_batch("demo", items, k=3)


def test_rank_batch_ranks_everything_marked_simulated(store):
    b = demo_batch(store)
    assert rank_batch(store, b) == 12
    assert rank_batch(store, b) == 0                        # nothing left: resumes, adds nothing
    rankings = store.rankings(batch_id=b)
    assert len(rankings) == 12 and all(r.simulated and r.annotator == DEFAULT_NAME for r in rankings)
    [who] = store.annotators()
    assert who.kind == "simulated"
    # Stored in answer ids, whatever order the session showed them in: short right answer,
    # long right answer, wrong answer; the wrong one flagged.
    for item in store.items(b):
        [r] = [r for r in rankings if r.item_id == item.id]
        right_long, wrong, right_short = item.answer_ids
        assert r.ordering == [[right_short], [right_long], [wrong]]
        assert r.flags == {wrong: ["fails_instruction"]}
    assert rankings_for_training(store, include_simulated=False) == []
    assert len(rankings_for_training(store, include_simulated=True)) == 12


def test_rank_batch_stops_between_chunks_and_keeps_what_it_ranked(store, monkeypatch):
    import workbench.simulated as simulated
    monkeypatch.setattr(simulated, "CHUNK", 5)
    monkeypatch.setattr(simulated, "CHUNK_S", float("inf"))    # chunks by count alone here
    b = demo_batch(store)
    seen = []
    assert rank_batch(store, b, cancelled=lambda: len(seen) >= 1,
                      progress=lambda done, total: seen.append((done, total))) == 5
    assert seen == [(5, 12)] and len(store.rankings(batch_id=b)) == 5
    assert rank_batch(store, b, progress=lambda done, total: seen.append((done, total))) == 7
    assert seen[1:] == [(10, 12), (12, 12)] and len(store.rankings(batch_id=b)) == 12


def test_simulated_commits_skip_the_fsync_and_a_persons_do_not(store):
    b = demo_batch(store)
    synchronous = lambda: store.conn.execute("PRAGMA synchronous").fetchone()[0]
    during = []
    rank_batch(store, b, progress=lambda done, total: during.append(synchronous()))
    assert set(during) == {1}               # NORMAL: no fsync per commit, for re-makeable rankings
    assert synchronous() == 2               # FULL again for whatever the store writes next


def test_simulated_name_cannot_be_a_human(store):
    b = demo_batch(store, n=2)
    store.annotator("me")
    with pytest.raises(ValueError, match="exists as human"):
        rank_batch(store, b, annotator_name="me")


def test_two_simulated_preferences_disagree_measurably(store):
    b = demo_batch(store, n=6)
    rank_batch(store, b)
    rank_batch(store, b, "simulated:longest", [lambda c: -len(c.text)])
    r = agreement(store)
    # Per item: correct-then-short gives short > long > wrong; longest-first gives
    # long ("The answer is ...") first, then the short one and "I do not know" by length.
    assert r.items == 6 and r.agreement is not None and r.agreement < 1.0
