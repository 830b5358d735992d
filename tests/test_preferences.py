"""workbench.preferences: export, import (K-way, pairs, transcripts), round trips, RM input."""
from __future__ import annotations

import gzip
import json

import pytest

from engine.transcripts import split_transcript
from workbench.annotation import AnnotationSession
from workbench.preferences import (count_for_training, export_rankings, import_preferences, rankings_for_training,
                                   write_rm_dataset)
from workbench.store import InputError, Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "a.db")
    yield s
    s.close()


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def ranked_batch(store):
    """Three prompts with four answers; a human (with ties, flags, scores, a note and one
    hidden repeat) and a simulated annotator rank them all."""
    b = store.create_batch("b", [
        {"prompt": f"What is {i} + {i}?", "answers": [{"text": t} for t in
                                                      (str(2 * i), f"It is {2 * i}.", "7", "no idea")]}
        for i in range(1, 4)], k=4)
    human = AnnotationSession(store, b, "ann", seed=1, repeat_fraction=0.34, repeat_gap=1)
    n = 0
    while (cur := human.current()) is not None:
        by_text = {a.text: a.number for a in cur.answers}
        right, long, wrong, idk = (by_text[t] for t in sorted(by_text, key=lambda t: (
            0 if t.isdigit() and t != "7" else 1 if t.startswith("It") else 2 if t == "7" else 3)))
        ordering = [[right], [long], [wrong, idk]] if n % 2 else [[right, long], [wrong], [idk]]
        human.submit(ordering, flags={wrong: ["made_up_facts"], idk: ["fails_instruction", "other"]},
                     scores={right: 7, wrong: 2}, note="tie at the bottom" if n % 2 else "")
        n += 1
    sim = AnnotationSession(store, b, "sim", seed=2, kind="simulated")
    while (cur := sim.current()) is not None:
        sim.submit([1, 2, 3, 4])
    return b


def test_kway_export_records_who_ranked_and_never_mixes_silently(tmp_path, store):
    ranked_batch(store)
    counts = export_rankings(store, tmp_path / "human.jsonl", include_simulated=False)
    assert counts == {"records": 3, "rankings": 3, "human": 3, "simulated": 0}
    recs = read(tmp_path / "human.jsonl")
    assert {(r["annotator"], r["simulated"]) for r in recs} == {("ann", False)}
    r = recs[0]
    assert r["prompt"] == "What is 1 + 1?" and r["answers"] == ["2", "It is 2.", "7", "no idea"]
    assert r["ranking"] == [[0, 1], [2], [3]]
    assert r["flags"] == [[], [], ["made_up_facts"], ["fails_instruction", "other"]]
    assert r["scores"] == [7, None, 2, None]
    assert "note" not in r and recs[1]["note"] == "tie at the bottom" and recs[1]["ranking"] == \
           [[0], [1], [2, 3]]
    counts = export_rankings(store, tmp_path / "all.jsonl", include_simulated=True,
                             include_repeats=True)
    assert counts == {"records": 7, "rankings": 7, "human": 4, "simulated": 3}
    recs = read(tmp_path / "all.jsonl")
    assert sum(r.get("repeat", False) for r in recs) == 1
    assert sum(r["simulated"] for r in recs) == 3
    export_rankings(store, tmp_path / "sim.jsonl", include_simulated=True, include_human=False)
    assert {r["annotator"] for r in read(tmp_path / "sim.jsonl")} == {"sim"}


def test_pairs_are_every_better_worse_pair_and_ties_give_none(tmp_path, store):
    ranked_batch(store)
    export_rankings(store, tmp_path / "p.jsonl", include_simulated=True, fmt="pairs")
    recs = read(tmp_path / "p.jsonl")
    ann = [r for r in recs if r["annotator"] == "ann"]
    sim = [r for r in recs if r["annotator"] == "sim"]
    # A strict K=4 ranking has C(4,2) = 6 pairs; [[0,1],[2],[3]] has 6 - 1 tie = 5, and so has
    # [[0],[1],[2,3]]. The human's three items alternate 5, 5, 5 pairs.
    assert len(sim) == 3 * 6 and len(ann) == 3 * 5
    assert ann[0] == {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "7",
                      "annotator": "ann", "simulated": False}
    assert [(r["chosen"], r["rejected"]) for r in ann[:5]] == [
        ("2", "7"), ("It is 2.", "7"), ("2", "no idea"), ("It is 2.", "no idea"), ("7", "no idea")]


def test_kway_round_trip(tmp_path, store, fresh):
    ranked_batch(store)
    first = tmp_path / "first.jsonl"
    export_rankings(store, first, include_simulated=True, include_repeats=True)
    result = import_preferences(fresh, first)
    # Same prompt and answers ranked by two annotators (and once more as a repeat): one item.
    assert (result.records, result.items) == (7, 3)
    second = tmp_path / "second.jsonl"
    export_rankings(fresh, second, include_simulated=True, include_repeats=True)
    assert second.read_text() == first.read_text()
    assert {a.name: a.kind for a in fresh.annotators()} == {"ann": "human", "sim": "simulated"}


def test_pairs_round_trip(tmp_path, store, fresh):
    ranked_batch(store)
    first = tmp_path / "first.jsonl"
    export_rankings(store, first, include_simulated=False, fmt="pairs")
    import_preferences(fresh, first)
    second = tmp_path / "second.jsonl"
    export_rankings(fresh, second, include_simulated=False, fmt="pairs")
    assert second.read_text() == first.read_text()
    # Two annotators: the same pairs, though grouped by item rather than by annotator.
    both = tmp_path / "both.jsonl"
    export_rankings(store, both, include_simulated=True, fmt="pairs")
    third = Store(tmp_path / "c.db")
    import_preferences(third, both)
    again = tmp_path / "again.jsonl"
    export_rankings(third, again, include_simulated=True, fmt="pairs")
    third.close()
    assert sorted(again.read_text().splitlines()) == sorted(both.read_text().splitlines())


HH_SINGLE = {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
             "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Lyon, I think."}
HH_MULTI = {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Add 2 and 3."
                      "\n\nAssistant: 5",
            "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Add 2 and 3."
                        "\n\nAssistant: 23"}


def test_transcript_form_shared_prefix_is_the_prompt(tmp_path, store):
    path = write(tmp_path / "hh.jsonl", [HH_SINGLE, HH_MULTI])
    result = import_preferences(store, path)
    assert (result.records, result.items, result.existing) == (2, 2, False)
    one, multi = store.items(result.batch_id)
    assert (one.prompt, one.messages, [a.text for a in one.answers]) == \
           ("What is the capital of France?", None, ["Paris.", "Lyon, I think."])
    assert multi.messages == [{"role": "user", "content": "Hi!"},
                              {"role": "assistant", "content": "Hello. How can I help?"},
                              {"role": "user", "content": "Add 2 and 3."}]
    assert multi.prompt == "Human: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Add 2 and 3."
    assert [a.text for a in multi.answers] == ["5", "23"]
    rankings = store.rankings(batch_id=result.batch_id)
    assert [r.ordering for r in rankings] == [[[a.id for a in it.answers][:1],
                                               [a.id for a in it.answers][1:]] for it in (one, multi)]
    # Records that say nothing are credited to an annotator named after the file, as a human.
    assert {(r.annotator, r.simulated) for r in rankings} == {("hh.jsonl", False)}
    # The RM input keeps the turns of the multi-turn prompt.
    data = rankings_for_training(store, include_simulated=False)
    assert data[1] == {"prompt": multi.prompt, "messages": multi.messages, "answers": ["5", "23"],
                       "ranking": [[0], [1]]}
    assert split_transcript("\n\nHuman: a\n\nAssistant: b") == [("user", "a"), ("assistant", "b")]
    # Exported, the turns travel with the record, and come back the same.
    out, back = tmp_path / "out.jsonl", tmp_path / "back.jsonl"
    export_rankings(store, out, include_simulated=False)
    other = Store(tmp_path / "other.db")
    import_preferences(other, out)
    export_rankings(other, back, include_simulated=False)
    other.close()
    assert back.read_text() == out.read_text() and read(out)[1]["messages"] == multi.messages


def test_bad_records_are_listed_with_file_and_line(tmp_path, store):
    path = write(tmp_path / "bad.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "not json",
        {"prompt": "p", "answers": ["a", "b", "c"], "ranking": [[0], [1]]},
        {"prompt": "p", "answers": ["a"], "ranking": [[0]]},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
        {"chosen": "no turns at all", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"text": "hello"},
        {"prompt": "p", "answers": ["a", "b"], "ranking": [0, 1], "scores": [9, 1],
         "flags": [["rude"], []], "simulated": "no"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "messages": [{"role": "user"}]},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ])
    with pytest.raises(InputError) as e:
        import_preferences(store, path)
    assert e.value.problems == [
        f"{path}:2: malformed JSON at column 1: Expecting value",
        f"{path}:3: field 'ranking': answer index 2 not ranked: rank every answer index exactly once",
        f"{path}:4: field 'answers' has 1 answers; 2 to 9 needed",
        f"{path}:5: 'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' "
        "(they must share the conversation up to the final answer)",
        f"{path}:6: field 'chosen' has no '\\n\\nAssistant:' turn",
        f"{path}:7: 'chosen' and 'rejected' are the same answer, so the pair holds no preference",
        f"{path}:8: not a preference record: expected {{prompt, answers, ranking}}, "
        "{prompt, chosen, rejected} or {chosen, rejected} transcripts",
        f"{path}:9: field 'flags[0]' must be a list of flags from fails_instruction, "
        "made_up_facts, harmful, other",
        f"{path}:9: field 'scores[0]' must be a whole number from 1 to 7 or null",
        f"{path}:9: field 'simulated' must be true or false",
        f"{path}:10: field 'messages[0].content': missing",
        f"{path}:11: 'chosen' and 'rejected' are the same answer, so the pair holds no preference",
    ]
    assert store.batches() == []
    # "skip" imports the good record and reports the rest.
    result = import_preferences(store, path, on_error="skip")
    assert (result.records, len(result.skipped)) == (1, 12)   # problems, three on line 9


def test_many_bad_records_are_capped_in_the_message(tmp_path, store):
    path = write(tmp_path / "bad.jsonl", [{"nothing": i} for i in range(30)])
    with pytest.raises(InputError, match=r"30 problem\(s\)[\s\S]*bad.jsonl:20: [\s\S]*and 10 more"):
        import_preferences(store, path)


def test_same_file_twice_returns_the_first_batch_and_annotator_options(tmp_path, store):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    first = import_preferences(store, path, annotator="bot", simulated=True, name="mine")
    again = import_preferences(store, path)
    assert again.existing and again.batch_id == first.batch_id and len(store.batches()) == 1
    [r] = store.rankings()
    assert (r.annotator, r.simulated, store.batch(first.batch_id).name) == ("bot", True, "mine")
    # A file that calls a simulated annotator human (or the reverse) is refused.
    clash = write(tmp_path / "clash.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                              "annotator": "bot", "simulated": False}])
    with pytest.raises(InputError, match="annotator 'bot' is simulated elsewhere"):
        import_preferences(store, clash)


def test_gzipped_files_are_read(tmp_path, store):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(HH_SINGLE) + "\n").encode()))
    assert import_preferences(store, path).records == 1


def test_training_records_leave_out_repeats_all_ties_and_maybe_simulated(tmp_path, store):
    b = ranked_batch(store)
    extra = store.create_batch("ties", [{"prompt": "q", "answers": [{"text": "x"}, {"text": "y"}]}])
    s = AnnotationSession(store, extra, "ann")
    s.submit([[1, 2]])                               # all tied: no pair, no training record
    human = rankings_for_training(store, include_simulated=False)
    assert len(human) == 3                            # 3 items; the repeat is not a second label
    assert human[0] == {"prompt": "What is 1 + 1?", "answers": ["2", "It is 2.", "7", "no idea"],
                        "ranking": [[0, 1], [2], [3]]}
    assert len(rankings_for_training(store, include_simulated=True)) == 6
    assert len(rankings_for_training(store, include_simulated=True, batch_ids=[extra])) == 0
    assert count_for_training(store) == (3, 3, 1)                # the tied one counted apart
    n = write_rm_dataset(store, tmp_path / "rankings.jsonl", include_simulated=True, batch_ids=[b])
    assert n == 6 and read(tmp_path / "rankings.jsonl") == \
           rankings_for_training(store, include_simulated=True)


def test_copies_ranked_apart_by_an_older_project_train_as_one_answer(tmp_path, store):
    # The app ties copies of one answer text; an older project placed them apart. Such a ranking
    # reaches the reward model with each text once, and one of a single text not at all.
    from engine.reward_data import read_rankings
    b = store.create_batch("b", [
        {"prompt": "p", "answers": [{"text": t} for t in ("6", "7", "6")]},
        {"prompt": "q", "answers": [{"text": "6"}, {"text": "6"}]},
        {"prompt": "r", "answers": [{"text": t} for t in ("6", "7", "6")]}], k=None)
    session, _ = store.session(b, store.annotator("old").id)
    # r: one copy tied with "7", the other below them: folded, "6" and "7" tie, no pair.
    for item, order in zip(store.items(b), ([[0], [1], [2]], [[1], [0]], [[0, 1], [2]])):
        ids = store.item(item.id).answer_ids
        store.add_ranking(session, item.id, [[ids[i] for i in g] for g in order])
    written = write_rm_dataset(store, tmp_path / "rankings.jsonl", include_simulated=False)
    assert written == 1
    (r,) = read_rankings([tmp_path / "rankings.jsonl"])
    assert r.answers == ["6", "7"] and r.pairs() == [(0, 1)]
    # The reward page and the sidebar count what trains: q's ranking has no pair (r's the sidebar's
    # SQL cannot fold, as Store.counts says).
    assert count_for_training(store) == (1, 0, 2)
    assert store.counts() == (1, 2)


def test_rankings_already_in_the_project_are_left_out_of_an_import(tmp_path, store):
    b = ranked_batch(store)
    before = len(store.rankings())
    made = {"all.jsonl": export_rankings(store, tmp_path / "all.jsonl", include_simulated=True,
                                         include_repeats=True),
            "pairs.jsonl": export_rankings(store, tmp_path / "pairs.jsonl", include_simulated=True,
                                           fmt="pairs")}
    # The project's own export, K-way or as pairs, brings nothing new back: no batch, no ranking.
    for name in ("all.jsonl", "pairs.jsonl"):
        res = import_preferences(store, tmp_path / name)
        assert res.existing and res.records == 0 and res.batch_id == b
        # `already` counts the project's rankings, `already_records` the file's records: a
        # pairs export holds several records per ranking.
        assert res.already_records == len(read(tmp_path / name))
        assert res.already == made[name]["rankings"]
        assert (res.already < res.already_records) == (name == "pairs.jsonl")
        assert len(store.batches()) == 1 and len(store.rankings()) == before
    # A new ranking in an edited export joins its item, beside the item's other rankings (to
    # agree with); every other record is counted as held and left out; no batch is made.
    recs = read(tmp_path / "all.jsonl")
    extra = dict(recs[0], annotator="cy", simulated=False)
    res = import_preferences(store, write(tmp_path / "edited.jsonl", recs + [extra]))
    assert (res.existing, res.items, res.records, res.already) == (False, 0, 1, len(recs))
    assert (res.joined, res.joined_items, res.joined_batches, res.batch_id) == (1, 1, (b,), b)
    assert len(store.batches()) == 1 and len(store.rankings()) == before + 1
    item = next(i for i in store.items(b) if i.prompt == extra["prompt"])
    assert {r.annotator for r in store.rankings(item_id=item.id)} == {"ann", "sim", "cy"}
    # The same rankings are new to another project.
    with Store(tmp_path / "other.db") as other:
        res = import_preferences(other, tmp_path / "all.jsonl")
        assert (res.records, res.already) == (len(recs), 0)


def test_a_new_repeat_joins_its_first_ranking_and_pairs_of_repeats_are_known(tmp_path, store):
    ranked_batch(store)              # ann ranks three items, one of them again (a hidden repeat)
    export_rankings(store, tmp_path / "first.jsonl", include_simulated=False)
    export_rankings(store, tmp_path / "all.jsonl", include_simulated=False, include_repeats=True)
    export_rankings(store, tmp_path / "pairs.jsonl", include_simulated=True, fmt="pairs",
                    include_repeats=True)
    with Store(tmp_path / "b.db") as other:
        import_preferences(other, tmp_path / "first.jsonl")
        # The repeat is new there and joins the item its first ranking is on: no new item.
        res = import_preferences(other, tmp_path / "all.jsonl")
        assert (res.items, res.records, res.already, res.joined) == (0, 1, 3, 1)
        rankings = other.rankings(include_repeats=True)
        assert len(rankings) == 3 + 1 and len(other.batches()) == 1
        repeat = next(r for r in rankings if r.is_repeat)
        assert any(r.item_id == repeat.item_id and not r.is_repeat for r in rankings)
    # Pairs carry no repeat mark: a repeat's pairs come back as known, not as new rankings.
    res = import_preferences(store, tmp_path / "pairs.jsonl")
    assert res.existing and res.records == 0


def test_an_import_is_not_the_session_someone_last_ranked_in(tmp_path, store):
    b = store.create_batch("b", [{"prompt": "q", "answers": [{"text": "x"}, {"text": "y"}]}], k=2)
    AnnotationSession(store, b, "alice").submit([[1], [2]])
    import_preferences(store, write(tmp_path / "hh.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    assert store.recent_session("human") == ("alice", b)     # where the Rank page and Compare resume


def test_a_colleagues_rankings_from_another_tool_join_the_items_and_agreement_sees_them(tmp_path, store):
    """An exported batch, re-ranked elsewhere (the answers in another order, as another tool
    shows them) and imported: the rankings join the project's items, no batch is made, and
    agreement between annotators counts the colleague's rankings against the ones made here."""
    from workbench.agreement import agreement
    b = ranked_batch(store)
    before = agreement(store, annotators=["ann", "cy"])
    assert before.items == 0
    export_rankings(store, tmp_path / "sim.jsonl", include_simulated=True, include_human=False)
    theirs = []
    for rec in read(tmp_path / "sim.jsonl"):
        flipped = rec["answers"][::-1]                  # their tool showed the answers reversed
        old = {t: i for i, t in enumerate(rec["answers"])}
        back = {old[t]: j for j, t in enumerate(flipped)}
        theirs.append({"prompt": rec["prompt"], "answers": flipped, "annotator": "cy",
                       "ranking": [[back[i] for i in g] for g in rec["ranking"]]})
    path = write(tmp_path / "cy.jsonl", theirs)
    res = import_preferences(store, path)
    assert (res.records, res.items, res.joined, res.joined_items, res.batch_id) == (3, 0, 3, 3, b)
    assert len(store.batches()) == 1
    # Their order, mapped back through the texts, is the simulated annotator's: full agreement.
    sim = {r.item_id: r.ordering for r in store.rankings(batch_id=b) if r.annotator == "sim"}
    cy = {r.item_id: r.ordering for r in store.rankings(batch_id=b) if r.annotator == "cy"}
    assert cy == sim
    both = agreement(store, annotators=["sim", "cy"])
    assert both.items == 3 and both.agreement == 1.0
    # The same file again brings nothing; the rankings are held where they joined.
    again = import_preferences(store, path)
    assert again.existing and again.records == 0 and again.already == 3 and again.batch_id == b


def test_an_import_joins_what_it_can_and_makes_a_batch_of_the_rest(tmp_path, store):
    b = store.create_batch("b", [{"prompt": "q", "answers": [{"text": "x"}, {"text": "y"}]},
                                 {"prompt": "copies", "answers": [{"text": "a"}, {"text": "a"}, {"text": "b"}]}],
                           k=2)
    AnnotationSession(store, b, "alice").submit([[1], [2]])
    path = write(tmp_path / "mixed.jsonl", [
        {"prompt": "q", "answers": ["y", "x"], "ranking": [[1], [0]], "annotator": "bob"},      # joins
        {"prompt": "q", "answers": ["x", "y"], "ranking": [[1], [0]], "annotator": "alice"},    # ranked it already
        {"prompt": "copies", "answers": ["a", "b", "a"], "ranking": [[1], [0, 2]], "annotator": "bob"},
        {"prompt": "new", "answers": ["m", "n"], "ranking": [[0], [1]], "annotator": "bob"}])
    res = import_preferences(store, path)
    assert (res.records, res.joined, res.joined_batches) == (4, 1, (b,))
    # alice's second ranking of "q" is not a repeat, so it cannot join her first; copies in
    # another order have no one mapping of the answers: both come as new items, beside "new".
    assert res.items == 3 and res.batch_id != b
    assert [i.prompt for i in store.items(res.batch_id)] == ["q", "copies", "new"]
    q = store.items(b)[0]
    assert {r.annotator: r.ordering for r in store.rankings(item_id=q.id)} == {
        "alice": [[q.answer_ids[0]], [q.answer_ids[1]]], "bob": [[q.answer_ids[0]], [q.answer_ids[1]]]}
