"""The arithmetic of direct preference optimisation on K-way rankings, as pure tensor functions.

For an answer y to a prompt x, the policy's *log-ratio* is log π(y|x) - log π_ref(y|x), summed
over the answer's tokens (its <|end|> included, as SFT trains it); β times it is DPO's implicit
reward. A ranking of K answers (groups of tied answers, best first) gives:

* pairwise: every (better, worse) pair of the C(K,2) it implies, ties giving none, each scored
  like a chosen/rejected pair; the sum is divided by C(K,2), as the reward model's loss is, so
  a ranking weighs the same whatever its K and ties just contribute less. For K = 2 this is DPO.
  Loss per pair: sigmoid (DPO): -log σ(β·h); IPO: (h - 1/(2β))², h the pair's log-ratio margin.
  For IPO each log-ratio is the mean over the answer's tokens, not the sum (as TRL does, on the
  IPO authors' advice): its squared loss pulls h to a fixed target, which a sum would make
  easier to reach the longer the answers.
* plackett_luce: the likelihood of the whole order, Π over places of softmax(β·log-ratio) over the
  answers not yet placed (tied answers share one denominator, Breslow's way; the last group
  places nothing), divided by K - 1. For K = 2 it is exactly pairwise DPO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.reward_data import Packed, pack_answers, ranking_pairs

LOSSES = ("sigmoid", "ipo")
FORMS = ("pairwise", "plackett_luce")


@dataclass
class AnswerTokens:
    """Rankings' answers packed behind one copy of their prompt (engine.reward_data.Packed: each
    answer reads the prompt and itself, at the positions it has alone), and where each trained
    token's log-prob is read: the position before it, which for an answer's first token is the
    prompt's last, one position shared by all K answers. A batch of K answers to a ~20-token
    prompt runs the prompt once instead of K times."""
    packed: Packed
    at: torch.Tensor        # [R, L] bool: the positions whose logits are read
    rows: torch.Tensor      # [M] each trained token's row among those logits (row-major)
    targets: torch.Tensor   # [M] the token
    owner: torch.Tensor     # [M] its answer
    answers: int

    @classmethod
    def of(cls, groups: list[list[tuple[list[int], list[int]]]], pad_id: int, max_len: int) -> "AnswerTokens":
        """groups: per ranking, each answer's (ids, mask): mask 1 on the tokens trained."""
        packed = pack_answers([[ids for ids, _ in g] for g in groups], pad_id, max_len)
        src, targets, owner = [], [], []
        for j, ((ids, mask), where) in enumerate(zip((a for g in groups for a in g), packed.where)):
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    src.append(where[t])
                    targets.append(ids[t + 1])
                    owner.append(j)
        read, rows = torch.tensor(src, dtype=torch.long).unique(return_inverse=True)
        at = torch.zeros(packed.ids.numel(), dtype=torch.bool)
        at[read] = True
        return cls(packed, at.view(packed.ids.shape), rows, torch.tensor(targets), torch.tensor(owner),
                   len(packed.where))

    def lengths(self) -> torch.Tensor:
        """[answers] each answer's trained tokens."""
        return torch.bincount(self.owner, minlength=self.answers)

    def to(self, device) -> "AnswerTokens":
        return AnswerTokens(self.packed.to(device), self.at.to(device), self.rows.to(device),
                            self.targets.to(device), self.owner.to(device), self.answers)


def sequence_logps(model, batch: AnswerTokens) -> torch.Tensor:
    """Σ log p(token) over each answer's trained tokens: [answers] in fp32. The model is asked
    for its logits at the positions read only (`at`): the prompt's others are never computed."""
    p = batch.packed
    logits = model(p.ids, attention_mask=p.mask, position_ids=p.positions, at=batch.at)
    picked = F.log_softmax(logits.float(), dim=-1)[batch.rows, batch.targets]
    return torch.zeros(batch.answers, dtype=picked.dtype, device=picked.device).index_add_(0, batch.owner, picked)


def pair_margins(logratio: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, chosen log-ratio, rejected log-ratio) of each pair: h = chosen - rejected."""
    w = torch.tensor([p[0] for p in pairs], device=logratio.device)
    l = torch.tensor([p[1] for p in pairs], device=logratio.device)
    return logratio[w] - logratio[l], logratio[w], logratio[l]


def pairwise_loss(logratio: torch.Tensor, groups: list[list[int]], beta: float, loss: str) -> torch.Tensor:
    k = logratio.numel()
    h, _, _ = pair_margins(logratio, ranking_pairs(groups))
    if loss == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        per_pair = -F.logsigmoid(beta * h)
    return per_pair.sum() / math.comb(k, 2)


def plackett_luce_loss(logratio: torch.Tensor, groups: list[list[int]], beta: float) -> torch.Tensor:
    """-log P(order) under Plackett-Luce with scores β·log-ratio, over K - 1."""
    z = beta * logratio
    terms = []
    for i, group in enumerate(groups[:-1]):
        rest = torch.tensor([j for g in groups[i:] for j in g], device=z.device)
        denom = torch.logsumexp(z[rest], dim=0)
        terms.append((denom - z[torch.tensor(group, device=z.device)]).sum())
    return torch.stack(terms).sum() / (logratio.numel() - 1)


def ranking_loss(logratio: torch.Tensor, groups: list[list[int]], beta: float, loss: str = "sigmoid",
                 form: str = "pairwise") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ranking's loss and, for the metrics, its pairs' (β·margin, β·chosen, β·rejected)
    implicit rewards, detached. The ranking must imply at least one pair."""
    if form == "plackett_luce":
        value = plackett_luce_loss(logratio, groups, beta)
    else:
        value = pairwise_loss(logratio, groups, beta, loss)
    h, c, r = pair_margins(logratio.detach(), ranking_pairs(groups))
    return value, beta * h, beta * c, beta * r
