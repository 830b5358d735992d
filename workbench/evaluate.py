"""Compare two checkpoints on held-out prompts: task accuracy, reward, and win rate under the
simulated annotator's preference (the one the demo's reward model learned).

Both models answer every prompt greedily, so a comparison is deterministic and paired: the same
prompt, the same decoding, only the weights differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from engine.artifacts import Loaded, load_artifact
from engine.chat import reply_batch, sampled_kl
from engine.reward import NORM_FILE
from engine.reward_data import encode_answer
from engine.tasks import Task, check, parse_task
from workbench.simulated import DEMO_PREFERENCE, Key, rank_answers


@dataclass
class Answers:
    texts: list[str]
    finished: list[bool]


def answer_all(art: Loaded, prompts: Sequence[str], max_new_tokens: int = 32) -> Answers:
    replies = reply_batch(art.model, art.tokenizer, list(prompts), max_new_tokens)
    return Answers([t for t, _ in replies], [f for _, f in replies])


@torch.no_grad()
def reward_scores(rm: Loaded, prompts: Sequence[str], answers: Answers, norm: Optional[dict] = None) -> list[float]:
    tok, model = rm.tokenizer, rm.model
    out = []
    for p, a in zip(prompts, answers.texts):
        ids, _ = encode_answer(tok, p, a, model.config.max_seq_len)
        r = float(model(torch.tensor([ids]))[0, -1])
        out.append((r - norm["mean"]) / norm["std"] if norm else r)
    return out


def tasks_of(prompts: Sequence[Union[str, Task]]) -> list[Optional[Task]]:
    """Each prompt's task: as given (a held-out task file's, however it words its prompts), or
    parsed from a prompt worded as the demo's tasks are; None where there is nothing to check."""
    return [p if isinstance(p, Task) else parse_task(p) for p in prompts]


def accuracy(tasks: Sequence[Optional[Task]], answers: Answers) -> Optional[float]:
    judged = [(t, a) for t, a in zip(tasks, answers.texts) if t is not None]
    return sum(check(t, a) for t, a in judged) / len(judged) if judged else None


def win_rate(prompts: Sequence[str], a: Answers, b: Answers, preference: Sequence[Key] = DEMO_PREFERENCE) -> dict:
    """How often `b` is preferred to `a`; a tie counts half."""
    wins = ties = losses = 0
    for p, ta, fa, tb, fb in zip(prompts, a.texts, a.finished, b.texts, b.finished):
        groups = rank_answers(p, [(ta, {"finished": fa}), (tb, {"finished": fb})], preference)
        if len(groups) == 1:
            ties += 1
        elif groups[0] == [1]:
            wins += 1
        else:
            losses += 1
    n = max(1, wins + ties + losses)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": losses}


def kl_to_base(candidate: Loaded, base: Loaded, prompts: Sequence[str], max_new_tokens: int = 32,
               seed: int = 0) -> float:
    """KL(candidate ‖ base) per answer, in nats (engine.chat.sampled_kl): the same figure for
    every method, so PPO's, DPO's and GRPO's distances from their SFT start compare."""
    kl, _ = sampled_kl(candidate.model, base.model, candidate.tokenizer, list(prompts), max_new_tokens, seed=seed)
    return float(kl.sum()) / max(1, len(prompts))


@dataclass
class Baseline:
    """The model the others are measured against, answered (and scored) once for all of them."""
    art: Loaded
    prompts: list[str]
    tasks: list[Optional[Task]]     # what task accuracy checks each answer against
    answers: Answers
    max_new_tokens: int
    rm: Optional[Loaded] = None
    norm: Optional[dict] = None
    scores: Optional[list[float]] = None


def baseline(base: Path, prompts: Sequence[Union[str, Task]], *, reward_model: Optional[Path] = None,
             max_new_tokens: int = 32) -> Baseline:
    """`base` answers `prompts` (texts, or held-out tasks) once, scored by `reward_model` if given."""
    import json
    art = load_artifact(base, prefer="latest")
    texts = [p.prompt if isinstance(p, Task) else p for p in prompts]
    b = Baseline(art, texts, tasks_of(prompts), answer_all(art, texts, max_new_tokens), max_new_tokens)
    if reward_model is not None:
        b.rm = load_artifact(reward_model)
        norm_file = b.rm.checkpoint / NORM_FILE
        b.norm = json.loads(norm_file.read_text()) if norm_file.exists() else None
        b.scores = reward_scores(b.rm, texts, b.answers, b.norm)
    return b


def compare_to(base: Baseline, candidate: Path) -> dict:
    """Figures for `candidate` against the baseline (e.g. PPO against its SFT start)."""
    prompts, a = base.prompts, base.answers
    b_art = load_artifact(candidate, prefer="latest")
    b = answer_all(b_art, prompts, base.max_new_tokens)
    result = {"n": len(prompts), "base_accuracy": accuracy(base.tasks, a), "accuracy": accuracy(base.tasks, b),
              **win_rate(prompts, a, b),
              "base_mean_chars": sum(map(len, a.texts)) / len(prompts),
              "mean_chars": sum(map(len, b.texts)) / len(prompts),
              "kl": kl_to_base(b_art, base.art, prompts, base.max_new_tokens)}
    if base.rm is not None:
        sb = reward_scores(base.rm, prompts, b, base.norm)
        result.update(base_score=sum(base.scores) / len(base.scores), score=sum(sb) / len(sb))
    return result


def compare(base: Path, candidate: Path, prompts: Sequence[str], *, reward_model: Optional[Path] = None,
            max_new_tokens: int = 32) -> dict:
    """Figures for `candidate` against `base` on `prompts` (one pair; see `baseline` for several)."""
    return compare_to(baseline(base, prompts, reward_model=reward_model, max_new_tokens=max_new_tokens), candidate)
