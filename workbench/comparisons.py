"""Compare-mode judgements as preference data: two answers to one prompt and which was better.

A judgement is stored like any other ranking, so everything downstream (agreement, exports,
the reward model's dataset) reads it without knowing about compare mode: one item with two
answers in a batch named "compare", and a ranking of the two by a human annotator. "left" or
"right" better is a ranking of two groups, which the exports turn into one {chosen, rejected}
pair; "tie" is one group of both, which gives no pair (the store keeps it, the RM skips it).

Every judgement from the compare view goes into the same batch, found by its source key and
made on the first vote. Answer 0 is always the left pane and answer 1 the right. Each answer's
meta says which checkpoint wrote it; the item's meta says whether the vote was blind and with
which sampling settings, so a later analysis can tell blind votes from sighted ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from workbench.store import Store

BATCH_NAME = "compare"
SOURCE_KEY = "compare-view"
VERDICTS = ("left", "right", "tie")


@dataclass
class Side:
    """One pane's answer."""
    text: str
    checkpoint: str                 # the checkpoint folder that wrote it
    label: str = ""                 # what the picker called it
    meta: dict = field(default_factory=dict)   # n_tokens, seed, stopped, ...


@dataclass
class Stored:
    batch_id: int
    item_id: int
    ranking_id: int
    answer_ids: tuple[int, int]     # (left, right)


def ordering(verdict: str, left_id: int, right_id: int) -> list[list[int]]:
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if verdict == "tie":
        return [[left_id, right_id]]
    return [[left_id], [right_id]] if verdict == "left" else [[right_id], [left_id]]


def compare_batch(store: Store) -> int:
    """The id of the project's compare batch, made empty if there is none yet."""
    with store.transaction():
        found = store.batch_by_source_key(SOURCE_KEY)
        if found is not None:
            return found.id
        return store.create_batch(store.unique_batch_name(BATCH_NAME), [], kind="imported",
                                  source="compare view", source_key=SOURCE_KEY,
                                  settings={"format": "compare"}, k=2)


def record(store: Store, prompt: str, left: Side, right: Side, verdict: str, *, annotator: str,
           blind: bool, system_prompt: Optional[str] = None, settings: Optional[dict] = None,
           duration_s: Optional[float] = None) -> Stored:
    """Store one judgement (item, answers, ranking) in one transaction.

    A preference between two identical texts would teach the reward model nothing but noise,
    so only "tie" is accepted for them.
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if verdict != "tie" and left.text == right.text:
        raise ValueError("the two answers are identical; only a tie can be recorded")
    ordering(verdict, 0, 1)  # validates the verdict before anything is written
    # The system prompt is part of what the model saw, so it is part of the prompt the RM
    # scores: a multi-turn prompt, as imported transcripts store theirs.
    messages = ([{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
                if system_prompt else None)
    meta = {"source": "compare", "blind": bool(blind), "verdict": verdict,
            "left": left.checkpoint, "right": right.checkpoint, "settings": dict(settings or {})}
    with store.transaction():
        batch_id = compare_batch(store)
        who = store.annotator(annotator, "human")
        session_id, _ = store.session(batch_id, who.id, {"source": "compare view"})
        [(item_id, answer_ids)] = store.add_items(batch_id, [{
            "prompt": prompt, "messages": messages, "meta": meta, "answers": [
                {"text": left.text, "meta": {"side": "left", "checkpoint": left.checkpoint,
                                             "label": left.label, **left.meta}},
                {"text": right.text, "meta": {"side": "right", "checkpoint": right.checkpoint,
                                              "label": right.label, **right.meta}}]}])
        ranking_id = store.add_ranking(session_id, item_id, ordering(verdict, *answer_ids),
                                       duration_s=duration_s)
    return Stored(batch_id, item_id, ranking_id, tuple(answer_ids))


@dataclass
class Tally:
    """The votes between two checkpoints, whichever side each stood on: blind rounds swap the
    sides, so "left" and "right" say nothing of which model won."""
    wins: tuple[int, int]           # votes for the first checkpoint, for the second
    ties: int
    total: int                      # every compare vote in the project, of any pair

    @property
    def votes(self) -> int:
        return sum(self.wins) + self.ties


def tally(store: Store, first: str, second: str) -> Tally:
    """The project's compare votes between the checkpoints `first` and `second` (folders as a
    vote's answers name them)."""
    found = store.batch_by_source_key(SOURCE_KEY)
    wins, ties, total = [0, 0], 0, 0
    for item in (store.items(found.id) if found is not None else []):
        total += 1
        sides = (item.meta.get("left"), item.meta.get("right"))
        if sorted(sides) != sorted((first, second)):
            continue
        verdict = item.meta.get("verdict", "tie")
        if verdict == "tie" or first == second:
            ties += verdict == "tie"
            wins[0] += verdict != "tie"        # one model against itself: a win is its own
            continue
        winner = sides[0] if verdict == "left" else sides[1]
        wins[0 if winner == first else 1] += 1
    return Tally((wins[0], wins[1]), ties, total)
