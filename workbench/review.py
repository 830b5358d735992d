"""What the ranking view needs beyond the store and AnnotationSession, without a screen: who
has ranked how much of each batch, reopening a ranked item to rank it again, the answer pairs
where a reward model disagrees most with the people who ranked them, and the newest
reward model's held-out accuracy (to set beside the human-human agreement ceiling).

Disagreement. For every active first ranking (hidden repeats are consistency checks, not
labels) and every pair it orders, answer w above answer l, the margin is r(l) - r(w): positive
when the reward model prefers the answer the person put lower. The largest margins are where
the RM learned something other than what people said, or where a person slipped; both are
worth a second look, so each is one call (`reopen_item`) from being ranked again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from engine.transcripts import fold_copies
from workbench.agreement import assigned_items
from workbench.agreement_items import pair_relations
from workbench.store import Batch, Store


@dataclass
class BatchProgress:
    batch: Batch
    ranked: dict[str, int]      # annotator -> items ranked (first rankings, not withdrawn)
    simulated: set[str]         # which of those annotators are simulated
    assigned: dict[str, int]    # annotator -> items theirs to rank: the batch, or a pack's share


def batch_progress(store: Store) -> list[BatchProgress]:
    """Every batch with who has ranked how many of its items (of how many were theirs)."""
    rows = store.ranked_counts()
    out = []
    for b in store.batches():
        mine = [r for r in rows if r[0] == b.id]
        assigned = {name: assigned_items(store, b, name) for _, name, _, _ in mine}
        out.append(BatchProgress(b, {name: n for _, name, _, n in mine},
                                 {name for _, name, kind, _ in mine if kind == "simulated"},
                                 assigned))
    return out


def existing_session(store: Store, batch_id: int, annotator: str) -> dict | None:
    """The settings of `annotator`'s session on the batch, None if there is none yet."""
    return store.session_settings(batch_id, annotator)


def recent_session(store: Store) -> tuple[str, int] | None:
    """(annotator, batch id) of the human session touched last: where the view resumes."""
    return store.recent_session("human")


def reopen_item(session, item_id: int) -> int | None:
    """Put `item_id` at the front of `session`'s queue to be ranked again. The session's
    active first ranking of it, if any, is withdrawn (kept on disk) and offered for editing
    as `current().previous`, exactly as after undo. Returns the withdrawn ranking's id."""
    store = session.store
    if store.item(item_id).batch_id != session.batch.id:
        raise ValueError(f"item {item_id} is not in batch {session.batch.name!r}")
    with store.transaction():
        rid = store.active_ranking(session.id, item_id)
        if rid is not None:
            store.withdraw_ranking(rid)
        # The queue move undo uses: the item becomes the first one shown.
        session._move(item_id, 0, to_back=False)
    return rid


def put_back(store, ranking_id: int | None) -> bool:
    """The ranking reopen_item withdrew comes back when the person left its item without ranking
    it again (ended the session, opened another): Re-rank never loses a ranking by being
    clicked. Nothing happens once a new ranking took its place. True if it came back."""
    return ranking_id is not None and store.restore_ranking(ranking_id)


def project_runs(project_dir: str | Path, kind: str) -> list[tuple[str, Path]]:
    """(name, folder) of the project's runs that hold a complete checkpoint of `kind`
    (checkpoint | reward: which stages make one is the catalogue's), newest first."""
    from engine.checkpoint import latest_checkpoint
    from workbench.stages import ARTIFACT_STAGES, stage_of_folder
    runs = Path(project_dir) / "runs"
    found = [p for p in runs.iterdir() if p.is_dir() and stage_of_folder(p.name) in ARTIFACT_STAGES[kind]
             and latest_checkpoint(p / "checkpoints") is not None] if runs.is_dir() else []
    return [(p.name, p) for p in sorted(found, key=lambda p: p.name, reverse=True)]


@dataclass
class RewardAccuracy:
    run: str                    # the reward run's folder name
    accuracy: float             # held-out pairwise accuracy
    rankings: int | None        # the held-out rankings it rests on


def reward_accuracy(project_dir: str | Path) -> RewardAccuracy | None:
    """The newest reward run's held-out pairwise accuracy: summary.json's "val/accuracy", the
    final checkpoint scored on rankings of prompts it did not train on, written when the run
    completes (a run still going, or stopped, has none yet: the one before it answers)."""
    for name, path in project_runs(project_dir, "reward"):
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        acc = summary.get("val/accuracy") if isinstance(summary, dict) else None
        if isinstance(acc, (int, float)) and not isinstance(acc, bool):
            n = summary.get("val_rankings")
            return RewardAccuracy(name, float(acc), n if isinstance(n, int) else None)
    return None


# --- the reward model against the rankings ----------------------------------------------------

@dataclass
class ScoreItem:
    item_id: int
    prompt: str | list          # the text, or the turns of a multi-turn prompt
    answers: list[tuple[int, str]]


def items_to_score(store: Store, *, batch_ids: Iterable[int] | None = None,
                   include_simulated: bool = False) -> list[ScoreItem]:
    """Items with at least one active first ranking, as plain data a worker thread can take
    (a Store must stay on the thread that opened it)."""
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]
    out = []
    for batch_id in ids:
        ranked = {r.item_id for r in store.rankings(batch_id=batch_id, include_repeats=False,
                                                    include_simulated=include_simulated)}
        if ranked:
            out += [ScoreItem(it.id, it.messages or it.prompt, [(a.id, a.text) for a in it.answers])
                    for it in store.items(batch_id, sorted(ranked))]
    return out


def score_answers(rm_path: str | Path, items: Sequence[ScoreItem], *, batch_size: int = 16,
                  emit: Callable | None = None, cancelled: Callable[[], bool] | None = None
                  ) -> dict[int, float]:
    """{answer id: reward} from a reward model run or checkpoint folder, normalised by its
    reward_norm.json when there is one (so margins read in standard deviations). `emit` gets
    (done, total) answers; `cancelled` is polled between batches (then the partial result)."""
    import torch

    from engine.artifacts import load_artifact
    from engine.device import resolve_device
    from engine.reward import NORM_FILE
    from engine.ragged import scores_at_ends
    from engine.reward_data import collate_answers, encode_answer

    device = resolve_device("auto")
    rm = load_artifact(rm_path, device=device, field="reward model")
    if rm.model.kind != "scalar":
        raise ValueError(f"{rm.checkpoint} holds a language model, not a reward model")
    norm_file = rm.checkpoint / NORM_FILE
    norm = json.loads(norm_file.read_text()) if norm_file.exists() else {"mean": 0.0, "std": 1.0}
    model, tok = rm.model.eval(), rm.tokenizer
    flat = [(item.prompt, aid, text) for item in items for aid, text in item.answers]
    scores: dict[int, float] = {}
    with torch.no_grad():
        for lo in range(0, len(flat), batch_size):
            if cancelled is not None and cancelled():
                break
            chunk = flat[lo:lo + batch_size]
            seqs = [encode_answer(tok, p, text, model.config.max_seq_len)[0] for p, _, text in chunk]
            x, last = collate_answers(seqs, tok.pad_id)
            x, last = x.to(device), last.to(device)
            r = scores_at_ends(model, x, last).cpu()
            for (_, aid, _), value in zip(chunk, r.tolist()):
                scores[aid] = (value - norm["mean"]) / norm["std"]
            if emit is not None:
                emit((min(lo + batch_size, len(flat)), len(flat)))
    return scores


@dataclass
class Disagreement:
    ranking_id: int
    batch_id: int
    item_id: int
    annotator: str
    prompt: str
    better: str                 # the answer the person ranked higher
    worse: str
    r_better: float
    r_worse: float

    @property
    def margin(self) -> float:
        """How much more the RM likes the answer the person put lower (> 0: they disagree)."""
        return self.r_worse - self.r_better


def disagreements(store: Store, scores: dict[int, float], *,
                  batch_ids: Iterable[int] | None = None, include_simulated: bool = False,
                  limit: int = 50) -> list[Disagreement]:
    """The ranked pairs the RM gets most wrong, largest margin first; only pairs with both
    answers scored and a positive margin."""
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]
    found: list[Disagreement] = []
    for batch_id in ids:
        rankings = store.rankings(batch_id=batch_id, include_repeats=False,
                                  include_simulated=include_simulated)
        items = {it.id: it for it in store.items(batch_id, sorted({r.item_id for r in rankings}))
                 } if rankings else {}
        for r in rankings:
            text = {a.id: a.text for a in items[r.item_id].answers}
            # Copies of one answer once: six "6"s against a "5" are one disagreement, not six.
            for (a, b), relation in pair_relations(fold_copies(r.ordering, text)).items():
                w, lo = (a, b) if relation > 0 else (b, a)
                if relation and w in scores and lo in scores and scores[lo] > scores[w]:
                    found.append(Disagreement(r.id, batch_id, r.item_id, r.annotator,
                                              items[r.item_id].prompt, text[w], text[lo],
                                              scores[w], scores[lo]))
    found.sort(key=lambda d: d.margin, reverse=True)
    return found[:limit]
