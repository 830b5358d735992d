"""workbench.annotation: next item, submit in display numbers, skip, undo, resume, repeats."""
from __future__ import annotations

import pytest

from workbench.annotation import AnnotationSession, parse_ordering
from workbench.store import RankingError, Store


@pytest.fixture
def db(tmp_path):
    return tmp_path / "workbench.db"


@pytest.fixture
def store(db):
    s = Store(db)
    yield s
    s.close()


def make_batch(store, n=5, k=3, name="b"):
    return store.create_batch(name, [
        {"prompt": f"prompt {i}", "answers": [{"text": f"answer {i}.{j}"} for j in range(k)]}
        for i in range(n)], k=k)


def shown_ids(cur):
    return [a.answer_id for a in cur.answers]


def test_parse_ordering_forms():
    for text in ("3 1=2 4", "3>1=2>4", "3,1=2,4", "31=24", " 3 > 1 = 2 > 4 "):
        assert parse_ordering(text) == [[3], [1, 2], [4]], text
    assert parse_ordering("21") == [[2], [1]]
    for text, message in (("", "empty"), ("=1 2", "'=' must stand between"),
                          ("1==2", "'=' must stand between"), ("1 2=", "ends with '='"),
                          ("1 x 2", "unexpected 'x'")):
        with pytest.raises(RankingError, match=message):
            parse_ordering(text)


def test_rank_a_batch_fully_storing_orderings_in_answer_ids(store):
    b = make_batch(store)
    s = AnnotationSession(store, b, "ann", seed=3)
    expected = {}
    positions = []
    while (cur := s.current()) is not None:
        assert [a.number for a in cur.answers] == [1, 2, 3] and cur.k == 3
        assert sorted(a.text for a in cur.answers) == [f"answer {cur.position}.{j}" for j in range(3)]
        order = shown_ids(cur)
        # "2 1=3": the second answer shown is best, the first and third tie below it.
        rid = s.submit("2 1=3", flags={3: ["harmful"]}, scores={2: 7, 1: 3}, note=f"n{cur.position}")
        expected[rid] = ([[order[1]], [order[0], order[2]]], {order[2]: ["harmful"]},
                         {order[1]: 7, order[0]: 3})
        positions.append(cur.position)
    assert positions == [0, 1, 2, 3, 4]
    stored = {r.id: (r.ordering, r.flags, r.scores) for r in store.rankings(batch_id=b)}
    assert stored == expected
    p = s.progress()
    assert (p.done, p.total, p.skipped, p.remaining, p.finished) == (5, 5, 0, 0, True)
    with pytest.raises(RankingError, match="nothing left to rank"):
        s.submit("1 2 3")


def test_answers_are_shuffled_by_seed_and_recorded(store):
    b = make_batch(store, n=8, k=4)
    orders = {}
    for seed in (1, 2):
        s = AnnotationSession(store, b, f"ann{seed}", seed=seed)
        seen = []
        while (cur := s.current()) is not None:
            seen.append(shown_ids(cur))
            s.submit([1, 2, 3, 4])
        orders[seed] = seen
    natural = [item.answer_ids for item in store.items(b)]
    assert orders[1] != natural and orders[1] != orders[2]
    recorded = store.conn.execute("SELECT COUNT(*) FROM shown_orders").fetchone()[0]
    assert recorded == 16


def test_two_annotators_with_the_same_seed_see_their_own_orders(store):
    # One order for all would make a shared liking for the first answer shown read as agreement.
    b = make_batch(store, n=8, k=4)
    orders = {}
    for name in ("ana", "ben"):
        s = AnnotationSession(store, b, name)            # the default seed for both
        orders[name] = []
        while (cur := s.current()) is not None:
            orders[name].append(shown_ids(cur))
            s.submit([1, 2, 3, 4])
    assert sum(a != b for a, b in zip(orders["ana"], orders["ben"])) >= 6


def test_resume_in_a_new_object_and_connection_continues_with_the_same_orders(db, store):
    b = make_batch(store)
    s = AnnotationSession(store, b, "ann", seed=5)
    first = s.current()
    s.submit([1, 2, 3])
    second = s.current()
    s.skip()
    third = s.current()
    with Store(db) as other:
        resumed = AnnotationSession(other, b, "ann")
        assert resumed.id == s.id and resumed.settings["seed"] == 5
        cur = resumed.current()
        assert (cur.item_id, shown_ids(cur)) == (third.item_id, shown_ids(third))
        assert resumed.progress().done == 1 and resumed.progress().skipped == 1
        seen = []
        while (cur := resumed.current()) is not None:
            seen.append(cur.item_id)
            if cur.item_id == second.item_id:
                assert shown_ids(cur) == shown_ids(second)     # same order after resume
            resumed.submit([[1, 2, 3]])
        assert seen[-1] == second.item_id                    # the skipped item came last
        assert first.item_id not in seen
    with pytest.raises(ValueError, match="started with seed=5"):
        AnnotationSession(store, b, "ann", seed=6)


def test_skip_sends_to_the_back_and_loses_nothing(store):
    b = make_batch(store, n=3)
    s = AnnotationSession(store, b, "ann")
    a = s.current().item_id
    s.skip()
    bb = s.current().item_id
    s.skip()
    c = s.current().item_id
    assert len({a, bb, c}) == 3
    assert s.progress().skipped == 2
    s.skip()                                   # everything skipped: the first skipped comes back
    assert s.current().item_id == a
    order = []
    while (cur := s.current()) is not None:
        order.append(cur.item_id)
        s.submit("123")
    assert order == [a, bb, c]
    assert s.progress().skipped == 0
    with pytest.raises(RankingError, match="nothing to skip"):
        s.skip()


def test_undo_withdraws_and_offers_the_previous_input(db, store):
    b = make_batch(store, n=3)
    s = AnnotationSession(store, b, "ann", seed=1)
    a = s.current()
    r1 = s.submit("3 1=2", flags={1: ["other"]}, scores={3: 6}, note="first try")
    bb = s.current()
    r2 = s.submit("1 2 3")
    assert s.undo() == r2
    cur = s.current()
    assert cur.item_id == bb.item_id and cur.previous.ordering == [[1], [2], [3]]
    assert s.undo() == r1                       # a stack: the one before comes back next
    cur = s.current()
    assert cur.item_id == a.item_id and shown_ids(cur) == shown_ids(a)
    assert (cur.previous.ordering, cur.previous.flags, cur.previous.scores, cur.previous.note) == \
           ([[3], [1, 2]], {1: ["other"]}, {3: 6}, "first try")
    assert s.progress().done == 0
    s.submit("1 2 3")
    assert s.current().item_id == bb.item_id    # then the other undone item, before new ones
    # Undo works after resume too, and keeps the withdrawn rows.
    with Store(db) as other:
        resumed = AnnotationSession(other, b, "ann")
        assert resumed.undo() is not None
        assert resumed.current().item_id == a.item_id
        assert resumed.undo() is None
    rows = store.rankings(batch_id=b, include_withdrawn=True)
    assert [r.withdrawn_at is not None for r in rows] == [True, True, True]
    a_order = shown_ids(a)
    assert rows[2].ordering == [[a_order[0]], [a_order[1]], [a_order[2]]]


@pytest.mark.parametrize("ordering,kwargs,message", [
    ("1 2", {}, "answer 3 not ranked: rank every answer exactly once"),
    ("1 2 3 1", {}, "answer 1 appears twice"),
    ("1 2 4", {}, r"answer 4 does not exist here \(there are 1-3\)"),
    ("0 1 2 3", {}, "answer 0 does not exist"),
    ([[1, 2], []], {}, "empty group"),
    ([1.5, 2, 3], {}, "1.5, which is not an answer number"),
    ("1=2=3", {"flags": {4: ["harmful"]}}, r"a flag for answer 4, which does not exist \(answers are 1-3\)"),
    ("1=2=3", {"flags": {1: ["rude"]}}, "unknown flag 'rude'"),
    ("1=2=3", {"scores": {2: 0}}, "from 1 to 7, got 0"),
    ("1=2=3", {"duration_s": -1.0}, "duration must be"),
])
def test_invalid_input_is_rejected_with_a_clear_message(store, ordering, kwargs, message):
    b = make_batch(store, n=1)
    s = AnnotationSession(store, b, "ann")
    with pytest.raises(RankingError, match=message):
        s.submit(ordering, **kwargs)
    assert store.rankings(include_withdrawn=True) == [] and s.current() is not None


def test_durations_are_measured_unless_given(store):
    b = make_batch(store, n=2)
    s = AnnotationSession(store, b, "ann")
    s.current()
    s.submit("123", duration_s=4.0)
    s.submit("123", duration_s=8.0)
    assert s.progress().mean_seconds == 6.0
    b2 = make_batch(store, n=1, name="b2")
    s2 = AnnotationSession(store, b2, "ann")
    s2.current()
    s2.submit("123")
    [r] = store.rankings(batch_id=b2)
    assert r.duration_s is not None and r.duration_s >= 0


def test_hidden_repeats_come_back_later_and_do_not_count_twice(store):
    b = make_batch(store, n=10, k=4)
    s = AnnotationSession(store, b, "ann", seed=0, repeat_fraction=0.3, repeat_gap=3)
    log = []
    while (cur := s.current()) is not None:
        log.append((cur.item_id, cur.is_repeat))
        p = s.progress()
        assert p.total == 10 and p.done == sum(1 for _, rep in log[:-1] if not rep)
        s.submit([1, 2, 3, 4])
    repeats = [i for i, rep in log if rep]
    assert len(log) == 13 and len(repeats) == 3 and len(set(repeats)) == 3
    for item in repeats:
        first, again = log.index((item, False)), log.index((item, True))
        firsts_between = sum(1 for _, rep in log[first + 1:again] if not rep)
        # At least the gap, unless the batch ran out of new items first.
        assert firsts_between >= 3 or all(rep for _, rep in log[again:])
    p = s.progress()
    assert (p.done, p.total, p.repeats_done, p.repeats_total, p.remaining) == (10, 10, 3, 3, 0)
    rows = store.rankings(batch_id=b)
    assert sum(r.is_repeat for r in rows) == 3
    assert store.conn.execute("SELECT COUNT(*) FROM shown_orders WHERE is_repeat = 1").fetchone()[0] == 3


def test_annotator_kinds_do_not_mix(store):
    b = make_batch(store, n=1)
    AnnotationSession(store, b, "robot", kind="simulated")
    with pytest.raises(ValueError, match="exists as simulated, not human"):
        AnnotationSession(store, b, "robot", kind="human")
    s = AnnotationSession(store, b, "robot")            # no kind asked: the existing one
    s.submit("1 2 3")
    assert store.rankings()[0].simulated
    with pytest.raises(ValueError, match="repeat_fraction must be from 0 to 1"):
        AnnotationSession(store, b, "x", repeat_fraction=1.5)


def test_a_ranking_withdrawn_outside_undo_still_comes_back(store):
    # The queue searches from a cursor; a withdrawal that bypasses undo (another tool on the
    # same database) must still not lose the item.
    b = make_batch(store, n=4)
    s = AnnotationSession(store, b, "ann")
    first = s.current().item_id
    rid = s.submit("123")
    for _ in range(3):
        s.submit("123")
    assert s.current() is None
    store.withdraw_ranking(rid)
    assert s.current().item_id == first and s.progress().done == 3


def test_copies_of_one_answer_left_out_are_tied_with_the_first_placed(store):
    b = store.create_batch("copies", [{"prompt": "p", "answers": [{"text": t} for t in
                                                                  ("6", "6", "5", "6", "5", "7")]}], k=None)
    s = AnnotationSession(store, b, "ana", seed=3)
    shown = {a.number: a for a in s.current().answers}
    first = {}
    for n, a in shown.items():
        first.setdefault(a.text, n)
    # One number per distinct answer ranks them all: "6" first, then "7", then "5".
    s.submit(f"{first['6']} {first['7']} {first['5']}")
    [r] = store.rankings()
    texts = {a.id: a.text for a in store.items(b)[0].answers}
    assert [sorted(texts[a] for a in g) for g in r.ordering] == [["6"] * 3, ["7"], ["5"] * 2]


def test_copies_ranked_apart_and_malformed_orderings_are_refused_by_name(store):
    b = store.create_batch("copies", [{"prompt": "p", "answers": [{"text": t} for t in ("3", "4", "3")]}], k=None)
    s = AnnotationSession(store, b, "ana", seed=3)
    by_text = {}
    for a in s.current().answers:
        by_text.setdefault(a.text, []).append(a.number)
    (x, y), (four,) = by_text["3"], by_text["4"]
    with pytest.raises(RankingError, match=f"answers {x} and {y} are the same answer"):
        s.submit([[x], [four], [y]])       # one text both better and worse than "4"
    for bad in ([[1, [2]]], [[1], {2, 3}]):
        with pytest.raises(RankingError, match="not an answer number"):
            s.submit(bad)
    assert store.rankings() == []


def test_two_rankers_under_one_name_never_store_a_ranking_on_an_item_not_shown(db, store):
    """A window and a terminal (two objects, two connections) rank one batch as one annotator:
    a ranking typed for the item on screen goes to that item or nowhere, and undo takes back
    what this ranker stored, not what the other did."""
    from workbench.annotation import MovedOn
    b = make_batch(store, n=4)
    window = AnnotationSession(store, b, "ann", seed=1)
    with Store(db) as other:
        terminal = AnnotationSession(other, b, "ann")
        on_screen = window.current()
        assert terminal.current().item_id == on_screen.item_id
        mine = terminal.submit("1 2 3", shown=terminal.current())
        # The window still shows the item the terminal just ranked: refused, nothing stored.
        with pytest.raises(MovedOn, match="'ann' ranked or skipped this item meanwhile"):
            window.submit("3 2 1", shown=on_screen)
        assert [r.item_id for r in store.rankings(batch_id=b)] == [on_screen.item_id]
        with pytest.raises(MovedOn):
            window.skip(shown=on_screen)
        nxt = window.current()
        assert nxt.item_id != on_screen.item_id
        theirs = window.submit("3 2 1", shown=nxt)
        stored = {r.id: r.item_id for r in store.rankings(batch_id=b)}
        assert stored == {mine: on_screen.item_id, theirs: nxt.item_id}
        # The terminal's undo takes back its own ranking, though the window's is newer.
        assert terminal.undo() == mine
        assert terminal.undo() is None                 # nothing else of its own to take back
        assert {r.id for r in store.rankings(batch_id=b)} == {theirs}
        # A ranker that has stored nothing yet (a new sitting) takes back the session's last.
        assert AnnotationSession(other, b, "ann").undo() == theirs


def test_undo_goes_on_into_an_earlier_sittings_rankings(store):
    b = make_batch(store, n=5)
    earlier = AnnotationSession(store, b, "ann", seed=1)
    ids = [earlier.submit("1 2 3") for _ in range(3)]
    now = AnnotationSession(store, b, "ann")
    mine = now.submit("3 2 1")
    assert [now.undo(), now.undo(), now.undo()] == [mine, ids[2], ids[1]]
