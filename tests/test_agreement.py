"""workbench.agreement: pairwise agreement and Krippendorff's alpha, checked by hand."""
from __future__ import annotations

import pytest

from workbench.agreement import agreement, krippendorff_alpha, pair_relations
from workbench.annotation import AnnotationSession
from workbench.store import Store

N = None


def test_pair_relations():
    # 12 best, 10 and 13 tied, 11 worst; pairs are keyed by (smaller id, larger id).
    assert pair_relations([[12], [10, 13], [11]]) == {
        (10, 11): +1, (10, 12): -1, (10, 13): 0, (11, 12): -1, (11, 13): -1, (12, 13): +1}


def test_alpha_textbook_nominal_and_interval():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the example with four
    # observers, twelve units and missing values: alpha = 0.743 nominal, 0.849 interval.
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3]
    c = [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]
    units = list(zip(a, b, c, d))
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_two_coders_binary_by_hand():
    # Krippendorff's two-coder binary example. Units (A, B): five (0,0), one (1,1), four with
    # one 0 and one 1. Coincidences: o00 = 2*5 = 10, o11 = 2, o01 = o10 = 4; n0 = 14, n1 = 6,
    # n = 20. alpha = 1 - (n - 1) * (o01 + o10) / (2 * n0 * n1) = 1 - 19 * 8 / 168 = 0.0952.
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert krippendorff_alpha(zip(a, b)) == pytest.approx(1 - 19 * 8 / 168)


def test_alpha_undefined_without_variation_or_pairs():
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None       # nothing to disagree about
    assert krippendorff_alpha([[1, N], [N, 2]]) is None       # no unit coded twice


def make_items(store, k=3, n=2):
    return store.create_batch("b", [{"prompt": f"p{i}", "answers": [{"text": f"{i}.{j}"}
                                                                    for j in range(k)]}
                                    for i in range(n)])


def rank(store, batch, name, orderings, kind=None, **kw):
    """Rank items in batch order with orderings given in answer *indexes* (not display numbers)."""
    s = AnnotationSession(store, batch, name, kind=kind, **kw)
    for ordering in orderings:
        cur = s.current()
        number = {a.answer_id: a.number for a in cur.answers}
        ids = store.item(cur.item_id).answer_ids
        s.submit([[number[ids[i]] for i in g] for g in ordering])
    return s


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db")
    yield s
    s.close()


def test_perfect_agreement_between_annotators_gives_alpha_1(store):
    b = make_items(store)
    # Item 1: 0 > 1 > 2, relations (0,1) (0,2) (1,2) = +,+,+.  Item 2: 2 > 1 > 0 = -,-,-.
    # Both annotators agree on all 6 pairs: agreement 6/6; D_o = 0 and D_e > 0, so alpha = 1.
    for name in ("ann", "bob"):
        rank(store, b, name, [[[0], [1], [2]], [[2], [1], [0]]])
    r = agreement(store)
    assert (r.items, r.comparisons, r.agreement, r.alpha, r.alpha_interval) == (2, 6, 1.0, 1.0, 1.0)


def test_a_tie_against_a_preference_is_a_disagreement(store):
    b = make_items(store, n=1)
    # ann: 0 > 1 > 2 -> (+, +, +).  bob: 0 > 1 = 2 -> (+, +, 0).  Agreement 2/3.
    # Nominal alpha: o(+,+) = 2 units * 2 = 4, o(+,0) = o(0,+) = 1; n+ = 5, n0 = 1, n = 6.
    # alpha = 1 - (n - 1) * (o+0 + o0+) / (n+ n0 + n0 n+) = 1 - 5 * 2 / 10 = 0: two identical
    # answers out of three is what chance gives with values this lopsided.
    # Interval, values +1/0: same coincidences, delta^2 = 1 for the mixed pairs, so also 0.
    rank(store, b, "ann", [[[0], [1], [2]]])
    rank(store, b, "bob", [[[0], [1, 2]]])
    r = agreement(store)
    assert r.comparisons == 3 and r.agreement == pytest.approx(2 / 3)
    assert r.alpha == pytest.approx(0.0) and r.alpha_interval == pytest.approx(0.0)


def test_reversal_costs_more_than_a_tie_in_interval_alpha(store):
    b = make_items(store, k=2, n=3)
    # Three 2-answer items, one pair each. ann: +, +, -.  bob: +, 0, +.
    # Units (+,+), (+,0), (-,+). Coincidences (each unit has 2 values, so 1/(2-1) per ordered
    # pair): o(+,+) = 2, o(+,0) = o(0,+) = 1, o(-,+) = o(+,-) = 1; n+ = 4, n0 = 1, n- = 1,
    # n = 6. Agreement 1/3.
    # Nominal: D_o = 4/6; D_e = 2*(4*1 + 4*1 + 1*1)/(6*5) = 18/30;
    # alpha = 1 - (4/6)/(18/30) = 1 - 120/108 = -1/9.
    # Interval (delta^2 of +-1 vs 0 is 1, of +1 vs -1 is 4): D_o = (1+1+4+4)/6 = 10/6;
    # D_e = 2*(4*1*1 + 4*1*4 + 1*1*1)/30 = 42/30; alpha = 1 - (10/6)/(42/30) = 1 - 300/252 = -4/21,
    # lower than the nominal alpha: the reversal on item 3 weighs four times a tie.
    rank(store, b, "ann", [[[0], [1]], [[0], [1]], [[1], [0]]])
    rank(store, b, "bob", [[[0], [1]], [[0, 1]], [[0], [1]]])
    r = agreement(store)
    assert r.agreement == pytest.approx(1 / 3)
    assert r.alpha == pytest.approx(-1 / 9)
    assert r.alpha_interval == pytest.approx(-4 / 21)


def test_hidden_repeats_are_compared_per_annotator(store):
    b = make_items(store, k=3, n=4)
    # Every item comes back once (repeat_fraction 1, gap 1), ranked the same way each time
    # except one: item 0 is 0 > 1 > 2 first, then 0 = 1 > 2 on the repeat.
    s = AnnotationSession(store, b, "ann", seed=0, repeat_fraction=1.0, repeat_gap=1)
    ids = {item.id: item.answer_ids for item in store.items(b)}
    first_item = store.items(b)[0].id
    while (cur := s.current()) is not None:
        number = {a.answer_id: a.number for a in cur.answers}
        a0, a1, a2 = (number[i] for i in ids[cur.item_id])
        tied = cur.is_repeat and cur.item_id == first_item
        s.submit([[a0, a1], [a2]] if tied else [[a0], [a1], [a2]])
    rank(store, b, "bob", [[[2], [1], [0]]] * 4)      # another annotator: not a repeat
    r = agreement(store, between="repeats")
    # 4 items x 3 pairs = 12 comparisons, one (0 vs 1 on item 0) differs: 11/12.
    assert (r.items, r.comparisons) == (4, 12) and r.agreement == pytest.approx(11 / 12)
    between = agreement(store, between="annotators")
    assert between.items == 4 and between.agreement == 0.0   # bob reverses every pair
    assert agreement(store, between="annotators", annotators=["ann"]).items == 0


def test_copies_of_one_answer_count_once_in_every_figure(store):
    """Six '6's and two '5's: ann puts 6 first, bob 5 first. They agree on nothing; the pairs of
    copies (tied by every ranking) must not make them look 57% alike."""
    from workbench.agreement import figures
    from workbench.review import disagreements
    b = store.create_batch("b", [{"prompt": "How long is 'bedroom'?", "answers": [
        {"text": t} for t in ("6", "6", "5", "6", "6", "6", "6", "5")]}], k=None)
    sixes, fives = [0, 1, 3, 4, 5, 6], [2, 7]
    rank(store, b, "ann", [[sixes, fives]])
    rank(store, b, "bob", [[fives, sixes]])
    # An item of one text only (k=2, both "6") is one answer: nothing to agree on, no row.
    one = store.create_batch("one", [{"prompt": "p", "answers": [{"text": "6"}, {"text": "6"}]}], k=2)
    rank(store, one, "ann", [[[0, 1]]])
    rank(store, one, "bob", [[[0, 1]]])
    r = agreement(store)
    assert (r.items, r.comparisons, r.agreement) == (1, 1, 0.0)
    f = figures(store)
    assert f.overall.agreement == 0.0 and [it.agreement for it in f.items] == [0.0]
    # The reward model scoring "5" above "6" disagrees with ann once, not once per copy.
    ids = store.item(store.items(b)[0].id).answer_ids
    scores = {aid: (1.0 if i in fives else 0.0) for i, aid in enumerate(ids)}
    found = disagreements(store, scores)
    assert [(d.annotator, d.better, d.worse) for d in found] == [("ann", "6", "5")]
