"""workbench.comparisons: compare-mode votes in the annotation store, and out again as RM data."""
import json

import pytest

from engine.reward_data import read_rankings
from workbench import comparisons
from workbench.comparisons import Side
from workbench.preferences import export_rankings, write_rm_dataset
from workbench.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.for_project(tmp_path) as s:
        yield s


def sides(left="a short answer", right="a much longer answer"):
    return (Side(left, "/runs/sft/checkpoints/step-000010", "sft", {"model": "Model 1", "seed": 3}),
            Side(right, "/runs/ppo/checkpoints/step-000020", "ppo", {"model": "Model 2", "seed": 3}))


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("verdict, chosen, rejected", [("left", "a short answer", "a much longer answer"),
                                                        ("right", "a much longer answer", "a short answer")])
def test_a_vote_is_a_pair_for_the_reward_model(store, tmp_path, verdict, chosen, rejected):
    left, right = sides()
    stored = comparisons.record(store, "What is 2+2?", left, right, verdict, annotator="ada",
                                blind=True, settings={"temperature": 0.7})
    rm = tmp_path / "rm.jsonl"
    assert write_rm_dataset(store, rm, include_simulated=False) == 1
    [ranking] = read_rankings([rm])
    assert ranking.prompt == "What is 2+2?"
    [(w, l)] = ranking.pairs()
    assert (ranking.answers[w], ranking.answers[l]) == (chosen, rejected)

    pairs = tmp_path / "pairs.jsonl"
    export_rankings(store, pairs, include_simulated=False, fmt="pairs")
    assert jsonl(pairs) == [{"prompt": "What is 2+2?", "chosen": chosen, "rejected": rejected,
                             "annotator": "ada", "simulated": False}]

    # Who was where, and that it was blind, stay with the item for later analysis.
    item = store.item(stored.item_id)
    assert item.meta["blind"] is True and item.meta["verdict"] == verdict
    assert [a.meta["side"] for a in item.answers] == ["left", "right"]
    assert item.answers[0].meta["checkpoint"] == left.checkpoint
    assert item.answers[1].meta["model"] == "Model 2"
    assert [a.kind for a in store.annotators()] == ["human"]


def test_a_tie_is_kept_but_gives_no_pair(store, tmp_path):
    comparisons.record(store, "Say hi", *sides(), "tie", annotator="ada", blind=False)
    [r] = store.rankings()
    assert len(r.ordering) == 1 and len(r.ordering[0]) == 2
    assert write_rm_dataset(store, tmp_path / "rm.jsonl", include_simulated=False) == 0
    export_rankings(store, tmp_path / "pairs.jsonl", include_simulated=False, fmt="pairs")
    assert jsonl(tmp_path / "pairs.jsonl") == []
    sft, ppo = (side.checkpoint for side in sides())
    assert comparisons.tally(store, sft, ppo) == comparisons.Tally((0, 0), 1, 1)


def test_votes_share_one_batch_and_keep_the_system_prompt(store, tmp_path):
    store.create_batch("compare", [{"prompt": "p", "answers": [{"text": "x"}, {"text": "y"}]}],
                       kind="imported")  # a user's own batch with the name: not ours
    first = comparisons.record(store, "one", *sides(), "left", annotator="ada", blind=True)
    second = comparisons.record(store, "two", *sides(), "right", annotator="bob", blind=False,
                                system_prompt="Be brief.")
    assert first.batch_id == second.batch_id
    batch = store.batch(first.batch_id)
    assert (batch.name, batch.kind, batch.k, batch.n_items) == ("compare (2)", "imported", 2, 2)
    assert [i.position for i in store.items(batch.id)] == [0, 1]
    rm = tmp_path / "rm.jsonl"
    write_rm_dataset(store, rm, include_simulated=False, batch_ids=[batch.id])
    recs = jsonl(rm)
    assert "messages" not in recs[0]
    assert recs[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "two"}]
    assert read_rankings([rm])[1].prompt == recs[1]["messages"]
    # ada preferred the left answer (sft's), bob the right (ppo's); cy, with the sides swapped
    # as a blind round may, the left one: ppo's.
    comparisons.record(store, "three", *reversed(sides()), "left", annotator="cy", blind=True)
    sft, ppo = (side.checkpoint for side in sides())
    assert comparisons.tally(store, ppo, sft) == comparisons.Tally((2, 1), 0, 3)
    assert comparisons.tally(store, sft, "/runs/other").votes == 0


def test_bad_votes_are_refused_before_anything_is_written(store):
    with pytest.raises(ValueError, match="identical"):
        comparisons.record(store, "q", *sides("same", "same"), "left", annotator="ada", blind=True)
    with pytest.raises(ValueError, match="verdict"):
        comparisons.record(store, "q", *sides(), "both", annotator="ada", blind=True)
    with pytest.raises(ValueError, match="prompt"):
        comparisons.record(store, "  ", *sides(), "tie", annotator="ada", blind=True)
    assert store.batches() == [] and store.rankings() == []
    # Identical answers can still be a tie: that is a true statement about them.
    comparisons.record(store, "q", *sides("same", "same"), "tie", annotator="ada", blind=True)


def test_a_simulated_name_is_not_taken_over(store):
    store.annotator("robot", "simulated")
    with pytest.raises(ValueError, match="simulated"):
        comparisons.record(store, "q", *sides(), "left", annotator="robot", blind=True)
    assert store.rankings() == [] and store.batches() == []  # the batch made on the way rolled back
