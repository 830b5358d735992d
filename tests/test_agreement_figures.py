"""workbench.agreement.figures and workbench.agreement_items, and the training options they
drive, checked against hand computations on one small made-up class batch.

The batch (answers a, b, c, d are an item's answers in order; '>' better, '=' tied):

    item 1 (K=3)   ann a > b > c       bob a > b = c       cy  b > a > c
    item 2 (K=4)   ann a > b > c > d   bob a = b > c > d   cy  d > c > b > a
    item 3 (K=3)   ann a > b > c       (ranked by ann only)
    item 4 (K=4)   ann a > b = c > d   bob a > b = c > d   (cy has not got to it)

Answer-pair relations (pairs in answer order; + first above, 0 tied, - second above):

    item 1  ab ac bc        ann + + +    bob + + 0    cy - + +
    item 2  ab ac ad bc bd cd   ann + + + + + +   bob 0 + + + + +   cy - - - - - -
    item 4  ab ac ad bc bd cd   ann + + + 0 + +   bob + + + 0 + +

A second batch ("extra", two K=2 items) has one ranking by ann and a session of dee's that was
given one item (settings "assigned": 1) and has ranked nothing.
"""
from __future__ import annotations

import json

import pytest

from workbench.agreement import agreement, figures
from workbench.agreement_items import (borda, for_training, item_agreement, kendall_w,
                                       mid_ranks, tally)
from workbench.agreement_items import pair_relations as rel
from workbench.preferences import rankings_for_training, write_rm_dataset
from workbench.store import Store

A, B, C, D = 0, 1, 2, 3
RANKINGS = {  # annotator -> {item position: ordering in answer indexes}
    "ann": {0: [[A], [B], [C]], 1: [[A], [B], [C], [D]], 2: [[A], [B], [C]],
            3: [[A], [B, C], [D]]},
    "bob": {0: [[A], [B, C]], 1: [[A, B], [C], [D]], 3: [[A], [B, C], [D]]},
    "cy": {0: [[B], [A], [C]], 1: [[D], [C], [B], [A]]},
}


def make_class(store: Store) -> tuple[int, int]:
    ks = [3, 4, 3, 4]
    batch = store.create_batch("class", [
        {"prompt": f"prompt {i}", "answers": [{"text": f"answer {i}{'abcd'[j]}"} for j in range(k)]}
        for i, k in enumerate(ks)])
    extra = store.create_batch("extra", [
        {"prompt": f"extra {i}", "answers": [{"text": "yes"}, {"text": "no"}]} for i in range(2)])
    items = store.items(batch)
    for name, mine in RANKINGS.items():
        session, _ = store.session(batch, store.annotator(name, "human").id)
        for pos, ordering in mine.items():
            ids = items[pos].answer_ids
            store.add_ranking(session, items[pos].id, [[ids[i] for i in g] for g in ordering])
    session, _ = store.session(extra, store.annotator("ann").id)
    first = store.items(extra)[0]
    store.add_ranking(session, first.id, [[first.answer_ids[0]], [first.answer_ids[1]]])
    store.session(extra, store.annotator("dee", "human").id, {"assigned": 1})
    return batch, extra


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db")
    yield s
    s.close()


# --- one item ----------------------------------------------------------------------------------

def test_mid_ranks_and_kendall_w_by_hand():
    assert mid_ranks([[7], [5, 6], [8]]) == {7: 1, 5: 2.5, 6: 2.5, 8: 4}
    # Item 1: mid-ranks ann a1 b2 c3, bob a1 b2.5 c2.5, cy a2 b1 c3; R = (4, 5.5, 8.5), mean
    # R = m(K+1)/2 = 6, S = 4 + 0.25 + 6.25 = 10.5; ties: bob's pair, T = 2^3 - 2 = 6.
    # W = 12 * 10.5 / (3^2 (3^3 - 3) - 3 * 6) = 126 / 198 = 7/11.
    assert kendall_w([RANKINGS[n][0] for n in RANKINGS]) == pytest.approx(7 / 11)
    # Item 2: ann 1 2 3 4, bob 1.5 1.5 3 4, cy 4 3 2 1; R = (6.5, 6.5, 8, 9), mean 7.5,
    # S = 1 + 1 + 0.25 + 2.25 = 4.5, T = 6: W = 54 / (9 * 60 - 18) = 54 / 522 = 3/29.
    assert kendall_w([RANKINGS[n][1] for n in RANKINGS]) == pytest.approx(3 / 29)
    # Item 4: both a 1, b = c 2.5, d 4: R = (2, 5, 5, 8), mean 5, S = 18, T = 6 + 6:
    # W = 216 / (4 * 60 - 2 * 12) = 216 / 216 = 1: a shared tie is full agreement.
    assert kendall_w([RANKINGS["ann"][3], RANKINGS["bob"][3]]) == pytest.approx(1.0)
    # Exactly reversed: R all equal, S = 0. Everyone ties everything: 0/0, undefined. One ranker.
    assert kendall_w([[[A], [B], [C]], [[C], [B], [A]]]) == 0.0
    assert kendall_w([[[A, B, C]], [[A, B, C]]]) is None
    assert kendall_w([[[A], [B], [C]]]) is None


def test_item_agreement_and_strict_pairs_by_hand():
    # Item 1: ann~bob agree on ab, ac (bc: + vs 0), ann~cy on ac, bc, bob~cy on ac: 5 of 9.
    # Strict (both +/-): ann~bob ab ac 2/2, ann~cy 2/3, bob~cy ab(+,-) ac(+,+) 1/2: 5 of 7.
    t = tally([rel(RANKINGS[n][0]) for n in RANKINGS])
    assert (t.agree, t.total, t.strict_agree, t.strict_total) == (5, 9, 5, 7)
    # Item 2: ann~bob 5/6 (ab + vs 0), ann~cy and bob~cy reverse everything: 5 of 18.
    assert item_agreement([RANKINGS[n][1] for n in RANKINGS]) == pytest.approx(5 / 18)
    assert item_agreement([RANKINGS["ann"][2]]) is None


def test_borda_aggregate_by_hand():
    # Doubled points: 2 per answer below, 1 per other answer in the tie.
    # Item 1: ann a4 b2 c0, bob a4 b1 c1, cy a2 b4 c0: a 10, b 7, c 1 -> a > b > c.
    assert borda([RANKINGS[n][0] for n in RANKINGS]) == [[A], [B], [C]]
    # Item 2: ann a6 b4 c2 d0, bob a5 b5 c2 d0, cy a0 b2 c4 d6: a 11, b 11, c 8, d 6
    # -> a = b > c > d: equal points tie in the aggregate.
    assert borda([RANKINGS[n][1] for n in RANKINGS]) == [[A, B], [C], [D]]
    assert borda([[[C], [A, B]]]) == [[C], [A, B]]          # one ranking is its own aggregate


def test_training_choice_for_one_item():
    item1 = [RANKINGS[n][0] for n in RANKINGS]              # agreement 5/9 = 0.556
    assert for_training(item1, min_agreement=0.5) == item1
    assert for_training(item1, min_agreement=0.6) == []
    assert for_training(item1, aggregate="borda") == [[[A], [B], [C]]]
    single = [RANKINGS["ann"][2]]
    assert for_training(single, min_agreement=0.9) == single
    assert for_training(single, min_agreement=0.9, keep_single=False) == []
    # Two people who disagree on the one real preference, over six copies of "6" and two of "5":
    # 16 of 28 pairs (copies) agree unfolded, none folded; the rankings kept hold every answer.
    text_of = dict(enumerate(["6", "6", "5", "6", "6", "6", "6", "5"]))
    sixes, fives = [0, 1, 3, 4, 5, 6], [2, 7]
    split = [[sixes, fives], [fives, sixes]]
    assert for_training(split, min_agreement=0.5) == split
    assert for_training(split, min_agreement=0.5, text_of=text_of) == []
    assert for_training(split, min_agreement=0.0, text_of=text_of) == split
    with pytest.raises(ValueError, match="from 0 to 1"):
        for_training(item1, min_agreement=60)
    with pytest.raises(ValueError, match="aggregate"):
        for_training(item1, aggregate="mean")


# --- a batch and the project -------------------------------------------------------------------

def test_pair_figures_by_hand(store):
    batch, _ = make_class(store)
    f = figures(store, batch_ids=[batch])
    pairs = {p.names: p for p in f.pairs}
    assert list(pairs) == [("ann", "bob"), ("ann", "cy"), ("bob", "cy")]
    # ann ~ bob on items 1, 2, 4: agree 2 + 5 + 6 = 13 of 3 + 6 + 6 = 15; strict 2 + 5 + 5 = 12
    # of 12 (bob's ties and item 4's shared tie drop out). Alpha units: 12 (+,+), 2 (+,0),
    # 1 (0,0): o++ = 24, o+0 = o0+ = 2, o00 = 2; n+ = 26, n0 = 4, n = 30. D_o = 4/30,
    # D_e = 2 * 26 * 4 / (30 * 29); alpha = 1 - (4/30) / (208/870) = 1 - 29/52 = 23/52. With
    # only + and 0 present the interval metric gives the same (delta^2 = 1).
    p = pairs[("ann", "bob")]
    assert (p.items, p.tally.agree, p.tally.total, p.tally.strict_agree, p.tally.strict_total) == (
        3, 13, 15, 12, 12)
    assert p.alpha == pytest.approx(23 / 52) and p.alpha_interval == pytest.approx(23 / 52)
    # ann ~ cy on items 1, 2: 2 + 0 of 9, all strict. Units 7 (+,-), 2 (+,+): o++ = 4,
    # o+- = o-+ = 7; n+ = 11, n- = 7, n = 18: alpha = 1 - (14/18) / (2*11*7/(18*17)) = -6/11
    # (two values only: interval the same).
    p = pairs[("ann", "cy")]
    assert (p.items, p.tally.agree, p.tally.total, p.tally.strict) == (2, 2, 9, pytest.approx(2 / 9))
    assert p.alpha == pytest.approx(-6 / 11) and p.alpha_interval == pytest.approx(-6 / 11)
    # bob ~ cy: item 1 ab(+,-) ac(+,+) bc(0,+), item 2 ab(0,-) and 5 x (+,-): agree 1 of 9,
    # strict 1 of 7. o+- = o-+ = 6, o++ = 2, o+0 = o0+ = 1, o0- = o-0 = 1; n+ = 9, n- = 7,
    # n0 = 2, n = 18. Nominal: D_o = 16/18, D_e = 2(63 + 18 + 14)/306 = 190/306,
    # alpha = 1 - 4896/3420 = -41/95. Interval (+- weighs 4): D_o = (48 + 2 + 2)/18,
    # D_e = 2(252 + 18 + 14)/306 = 568/306, alpha = 1 - 15912/10224 = -79/142.
    p = pairs[("bob", "cy")]
    assert (p.tally.agree, p.tally.total, p.tally.strict_agree, p.tally.strict_total) == (1, 9, 1, 7)
    assert p.alpha == pytest.approx(-41 / 95) and p.alpha_interval == pytest.approx(-79 / 142)
    # Each pair's figures are what agreement() gives for the two of them alone.
    old = agreement(store, batch_ids=[batch], annotators=["bob", "cy"])
    assert (old.items, old.comparisons, old.alpha) == (2, 9, pytest.approx(-41 / 95))


def test_overall_w_ceiling_and_items_by_hand(store):
    batch, _ = make_class(store)
    f = figures(store, batch_ids=[batch])
    # Items 1, 2 and 4 were ranked twice or more: 9 + 18 + 6 = 33 comparisons, 13 + 2 + 1 = 16
    # agree. Alpha over all three: units of three values weigh 1/2 per ordered pair:
    # o++ = 1 (item 1 ab) + 3 (ac) + 1 (bc) + 5 (item 2) + 10 (item 4) = 20,
    # o+- = o-+ = 1 + 1/2 + 5 = 6.5, o+0 = o0+ = 1.5, o0- = o-0 = 0.5, o00 = 2;
    # n+ = 28, n- = 7, n0 = 4, n = 39. Nominal: D_o = 17/39, D_e = 2(196 + 112 + 28)/(39 * 38),
    # alpha = 1 - 17 * 38 / 672 = 13/336. Interval: D_o = (13*4 + 3 + 1)/39 = 56/39,
    # D_e = 2(784 + 112 + 28)/1482, alpha = 1 - 56 * 38 / 1848 = -5/33.
    o = f.overall
    assert (o.items, o.comparisons) == (3, 33) and o.agreement == pytest.approx(16 / 33)
    assert o.alpha == pytest.approx(13 / 336) and o.alpha_interval == pytest.approx(-5 / 33)
    old = agreement(store, batch_ids=[batch])
    assert (old.agreement, old.alpha) == (pytest.approx(16 / 33), pytest.approx(13 / 336))
    # Ceiling: strict comparisons 12 + 9 + 7 = 28, agreeing 12 + 2 + 1 = 15.
    assert (f.tally.strict_agree, f.tally.strict_total) == (15, 28)
    assert f.ceiling == pytest.approx(15 / 28)
    # Kendall's W: mean of 7/11, 3/29 and 1 = (203 + 33 + 319) / (3 * 319) = 185/319.
    assert f.kendall_w == pytest.approx(185 / 319)
    # Most disagreed first: item 2 (5/18), item 1 (5/9), item 4 (6/6); item 3 is not listed.
    assert [(it.position, it.rankers) for it in f.items] == [
        (1, ["ann", "bob", "cy"]), (0, ["ann", "bob", "cy"]), (3, ["ann", "bob"])]
    assert [it.agreement for it in f.items] == pytest.approx([5 / 18, 5 / 9, 1.0])
    assert [it.w for it in f.items] == pytest.approx([3 / 29, 7 / 11, 1.0])
    assert f.items[0].prompt == "prompt 1" and f.items[0].batch_id == batch


def test_each_annotator_against_the_rest_by_hand(store):
    batch, _ = make_class(store)
    rows = {r.name: r for r in figures(store, batch_ids=[batch]).annotators}
    assert list(rows) == ["ann", "bob", "cy"]
    # ann: against bob 13/15 and cy 2/9 on items 1, 2, 4: 15 of 24. Without ann, only bob and
    # cy share items: alpha = bob ~ cy's, -41/95 (item 4 keeps one value and drops out).
    ann = rows["ann"]
    assert (ann.items, ann.tally.agree, ann.tally.total) == (3, 15, 24)
    assert ann.alpha_without == pytest.approx(-41 / 95)
    # bob: 13/15 with ann, 1/9 with cy: 14 of 24; without bob: ann ~ cy, -6/11.
    assert (rows["bob"].tally.agree, rows["bob"].tally.total) == (14, 24)
    assert rows["bob"].alpha_without == pytest.approx(-6 / 11)
    # cy: 2/9 with ann, 1/9 with bob: 3 of 18; without cy: ann ~ bob, 23/52, far above the
    # overall 13/336: cy is the one out of step.
    assert (rows["cy"].items, rows["cy"].tally.agree, rows["cy"].tally.total) == (2, 3, 18)
    assert rows["cy"].alpha_without == pytest.approx(23 / 52)


def test_progress_per_batch_and_for_the_project(store):
    batch, extra = make_class(store)
    progress = {r.name: (r.done, r.assigned, r.total)
                for r in figures(store, batch_ids=[batch]).annotators}
    assert progress == {"ann": (4, 4, 4), "bob": (3, 4, 4), "cy": (2, 4, 4)}
    # The project: 4 + 2 = 6 items. ann ranked 4 + 1 of 4 + 2 assigned; dee was given 1 of
    # "extra"'s 2 items and has ranked none, shares nothing, so alpha without her is everyone's.
    rows = {r.name: r for r in figures(store).annotators}
    assert {n: (r.done, r.assigned, r.total) for n, r in rows.items()} == {
        "ann": (5, 6, 6), "bob": (3, 4, 6), "cy": (2, 4, 6), "dee": (0, 1, 6)}
    assert rows["dee"].items == 0 and rows["dee"].tally.agreement is None
    assert rows["dee"].alpha_without == pytest.approx(13 / 336)


def test_simulated_annotators_can_be_left_out(store):
    batch, _ = make_class(store)
    session, _ = store.session(batch, store.annotator("sim", "simulated").id)
    item = store.items(batch)[2]
    store.add_ranking(session, item.id, [[i] for i in item.answer_ids])
    assert "sim" in [r.name for r in figures(store).annotators]
    human = figures(store, include_simulated=False)
    assert "sim" not in [r.name for r in human.annotators]
    assert [it.position for it in human.items] == [1, 0, 3]


# --- what a reward/DPO run is given ------------------------------------------------------------

def _rankings(records):
    return [(r["prompt"], r["ranking"]) for r in records]


def test_threshold_and_borda_change_the_training_data(store, tmp_path):
    batch, _ = make_class(store)
    kw = dict(include_simulated=False, batch_ids=[batch])
    every = rankings_for_training(store, **kw)
    assert len(every) == 3 + 3 + 1 + 2                  # every ranking, batch order
    # Threshold 0.5: item 2 (5/18) goes, item 1 (5/9) and item 4 (1) stay, item 3 (ranked
    # once) stays unless keep_single=False.
    kept = rankings_for_training(store, min_agreement=0.5, **kw)
    assert [p for p, _ in _rankings(kept)] == ["prompt 0"] * 3 + ["prompt 2"] + ["prompt 3"] * 2
    strict = rankings_for_training(store, min_agreement=0.5, keep_single=False, **kw)
    assert [p for p, _ in _rankings(strict)] == ["prompt 0"] * 3 + ["prompt 3"] * 2
    assert [p for p, _ in _rankings(rankings_for_training(store, min_agreement=0.6, **kw))] == [
        "prompt 2", "prompt 3", "prompt 3"]
    # Borda: one record per item, ties where the points are equal (item 2: a = b).
    assert _rankings(rankings_for_training(store, aggregate="borda", **kw)) == [
        ("prompt 0", [[0], [1], [2]]), ("prompt 1", [[0, 1], [2], [3]]),
        ("prompt 2", [[0], [1], [2]]), ("prompt 3", [[0], [1, 2], [3]])]
    # Both: the threshold first, then the aggregate of what is left.
    path = tmp_path / "rm.jsonl"
    n = write_rm_dataset(store, path, min_agreement=0.5, aggregate="borda", **kw)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 3 and [r["prompt"] for r in written] == ["prompt 0", "prompt 2", "prompt 3"]
    assert written[0]["answers"] == ["answer 0a", "answer 0b", "answer 0c"]


def test_the_agreement_for_the_threshold_is_over_the_rankings_chosen(store):
    batch, _ = make_class(store)
    # A simulated ranking reversing item 4 (d > c > b > a) disagrees with ann and bob on all
    # 6 pairs each: 6 of 18 agree. That counts only when simulated rankings go in: a run on
    # people's rankings alone keeps item 4 (6/6). Single-ranked items (3, extra 0) stay.
    session, _ = store.session(batch, store.annotator("sim", "simulated").id)
    item = store.items(batch)[3]
    store.add_ranking(session, item.id, [[i] for i in reversed(item.answer_ids)])
    human = rankings_for_training(store, include_simulated=False, min_agreement=0.9)
    assert [r["prompt"] for r in human] == ["prompt 2", "prompt 3", "prompt 3", "extra 0"]
    both = rankings_for_training(store, include_simulated=True, min_agreement=0.9)
    assert [r["prompt"] for r in both] == ["prompt 2", "extra 0"]


def test_a_run_folder_gets_the_rankings_chosen(tmp_path):
    from workbench import runfolder
    from workbench.project import create_project

    project = create_project(tmp_path / "p", "p")
    with Store.for_project(project.path) as store:
        batch, _ = make_class(store)
    choice = runfolder.Rankings(batch_ids=[batch], min_agreement=0.5, aggregate="borda")
    run = runfolder.new_run(project, "reward", {"init": "sft"}, rankings=choice)
    written = [json.loads(line) for line in (run / runfolder.RANKINGS).read_text().splitlines()]
    assert [(r["prompt"], r["ranking"]) for r in written] == [
        ("prompt 0", [[0], [1], [2]]), ("prompt 2", [[0], [1], [2]]), ("prompt 3", [[0], [1, 2], [3]])]
    with pytest.raises(ValueError, match="from 0 to 1"):
        runfolder.Rankings(min_agreement=60)


# --- `workbench agreement` and `workbench pipeline --min-agreement` ------------------------------

def test_the_cli_prints_every_figure(tmp_path, capsys, rm_ckpt):
    import shutil

    from workbench.cli import main

    (tmp_path / "workbench.toml").write_text("")
    with Store.for_project(tmp_path) as store:
        make_class(store)
    run = tmp_path / "runs" / "reward-20250101-000000"
    shutil.copytree(rm_ckpt, run)
    (run / "summary.json").write_text(json.dumps({"val/accuracy": 0.5, "val_rankings": 12}))
    assert main(["agreement", "--project", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():       # the first line with those three words
        rows.setdefault(" ".join(line.split()[:3]), line.split())
    # Progress and against the rest (project: 6 items), then the pairs, as worked out above.
    assert rows["cy 2 4"] == ["cy", "2", "4", "6", "2", "18", "0.167", "0.442"]
    assert rows["ann ~ bob"][3:] == ["3", "15", "0.867", "0.442", "0.442"]
    assert rows["bob ~ cy"][3:] == ["2", "9", "0.111", "-0.432", "-0.556"]
    assert rows["all 3 33"] == ["all", "3", "33", "0.485", "0.039", "-0.152"]
    text = " ".join(out.split())
    assert "mean 0.580 over 3 item(s)" in text
    assert "1 2 3 0.278 0.103 prompt 1 1 1 3 0.556 0.636 prompt 0 1 4 2 1.000 1.000 prompt 3" in text
    assert "they chose the same one in 53.6% of 28 comparisons" in text
    assert "ann ~ bob 12 100.0% ann ~ cy 9 22.2% bob ~ cy 7 14.3%" in text
    # 50.0% - 53.6% = -3.6 points.
    assert ("reward model reward-20250101-000000: held-out pairwise accuracy 50.0% on 12 held-out "
            "ranking(s), -3.6 points from the ceiling") in text


def test_the_pipeline_refuses_a_threshold_that_is_not_a_share(tmp_path, capsys):
    from workbench.cli import main

    assert main(["pipeline", "--project", str(tmp_path), "--min-agreement", "60"]) == 2
    assert "--min-agreement is a share from 0 to 1, got 60.0" in capsys.readouterr().err
