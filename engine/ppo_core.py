"""The arithmetic of PPO for language models, as pure tensor functions.

Layout used throughout: a rollout is B sequences right-padded to length T, `prompt | answer | pad`.
An *action* is an answer token; `mask[b, t]` is 1 where token t of row b is an action. The
log-prob of the token at t comes from the logits at t-1, and the value of the state before
action t is read at t-1 too, so every per-token tensor here is aligned with the token it scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn.functional as F


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # x / 1 is x to the bit: at temperature 1 the division is a pass over [M, V] for nothing.
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


def _picked(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lp.gather(-1, targets[..., None]).squeeze(-1)


# The figures below take logits [..., V] and the tokens they predict [...], aligned
# (AnswerStates gives both for a rollout's answer tokens, and puts each figure back in the
# rollout's layout).

def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(target) in fp32, the sampling temperature dividing the logits exactly as it did
    when the answer was sampled."""
    return _picked(_log_softmax(logits, temperature), targets)


def logprobs_entropy_of(logits: torch.Tensor, targets: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_of` and the entropy of the sampling distribution, from one log-softmax."""
    lp = _log_softmax(logits, temperature)
    return _picked(lp, targets), -(lp.exp() * lp).sum(-1)


def reference_figures_of(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, entropy, reference log-probs, KL(π ‖ π_ref) of the next-token distribution),
    from one log-softmax of each model."""
    lp, ref = _log_softmax(logits, temperature), _log_softmax(ref_logits, temperature)
    p = lp.exp()
    return _picked(lp, targets), -(p * lp).sum(-1), _picked(ref, targets), (p * (lp - ref)).sum(-1)


def state_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(π ‖ π_ref) of the next-token distributions, summed over the vocabulary, aligned with
    the token they predict: column t is the KL at the state before token t (column 0 is 0).

    Summed over an answer's tokens it estimates the answer's KL as the sampled log-ratios do,
    without the noise of which token was drawn at each state."""
    lp = _log_softmax(logits[:, :-1], temperature)
    ref = _log_softmax(ref_logits[:, :-1], temperature)
    return F.pad((lp.exp() * (lp - ref)).sum(-1), (1, 0))


@dataclass
class AnswerStates:
    """Where a batch's answer tokens are drawn from: position t of a row when token t+1 is an
    action. A model called with `at=states.at` returns its logits there only ([M, V], row-major),
    `targets` are the actions they predict, and `spread` puts a figure of each back in the
    rollout's layout. A rollout row is half prompt, so this halves the head's work and its softmax."""
    at: torch.Tensor        # [B, T] bool
    targets: torch.Tensor   # [M]

    @classmethod
    def of(cls, ids: torch.Tensor, mask: torch.Tensor) -> "AnswerStates":
        acts = mask[:, 1:] > 0
        return cls(F.pad(acts, (0, 1)), ids[:, 1:][acts])

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[M] -> [B, T], column t the figure of token t, 0 where token t is no action."""
        out = torch.zeros(self.at.shape, dtype=x.dtype, device=x.device).masked_scatter(self.at, x)
        return F.pad(out[:, :-1], (1, 0))


@dataclass
class Rollout:
    ids: torch.Tensor          # [B, T] prompt | answer | pad
    mask: torch.Tensor         # [B, T] 1 on answer tokens (the actions)
    finished: torch.Tensor     # [B] the answer ended with the end token
    answers: list[list[int]]
    lengths: torch.Tensor      # [B] prompt + answer: the models run these tokens alone (engine.ragged)


def build_rollout(prompts: list[list[int]], answers: list[list[int]], ends: Collection[int], pad_id: int) -> Rollout:
    """Right-padded `prompt | answer | pad` rows and the mask of their actions; an answer is
    finished when it ended at one of `ends` (the tokenizer's turn_end_ids)."""
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    B, T = len(prompts), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for i, (p, a, n) in enumerate(zip(prompts, answers, lengths)):
        ids[i, :n] = torch.tensor(p + a)
        mask[i, len(p):n] = 1
    finished = torch.tensor([bool(a) and a[-1] in ends for a in answers])
    return Rollout(ids, mask, finished, answers, torch.tensor(lengths))


def as_scored(ids: torch.Tensor, last: torch.Tensor, finished: torch.Tensor, end_id: int) -> torch.Tensor:
    """The rows as a reward model reads them: an answer that ended at another of the model's stop
    tokens (an imported model's eos) ends at the end-of-turn token its score is trained at."""
    rows = finished.to(ids.device).nonzero().flatten()
    rows = rows[ids[rows, last[rows]] != end_id]
    if rows.numel() == 0:
        return ids
    out = ids.clone()
    out[rows, last[rows]] = end_id
    return out


def chunks(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Minibatches of row indices, in `order`."""
    return [order[i:i + size] for i in range(0, order.numel(), size)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise over the valid tokens only: padding must not drag the statistics."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def per_token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      scores: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): -β (log π - log π_ref) on every action, plus the score on the last one.

    Nothing after the last action: a row's reward, like its value, is zero past its end token.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = last_action_index(mask)
    rewards[torch.arange(mask.size(0)), last] += scores
    return rewards * mask, kl


def last_action_index(mask: torch.Tensor) -> torch.Tensor:
    t = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), t, torch.full_like(t, -1)).max(dim=1).values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the actions of each row; (advantages, returns).

    Values past the last action are taken as zero (the episode has ended), so the last action's
    advantage is r - V. Non-action positions get zero advantage and zero return.
    """
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(rewards.size(1))):
        nxt = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]        # prompt and padding reset the recursion
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


@dataclass
class Losses:
    total_policy: torch.Tensor
    value: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor
    value_clipfrac: torch.Tensor


def ppo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange: float, cliprange_value: float) -> Losses:
    """The clipped surrogate against the rollout's log-probs and the clipped value loss."""
    logratio = (new_logp - old_logp) * mask
    ratio = torch.exp(logratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf1 = (new_values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approxkl = 0.5 * masked_mean(logratio ** 2, mask)
        mean_ratio = masked_mean(ratio, mask)
        v_clipfrac = masked_mean((vf2 > vf1).float(), mask)
    return Losses(pg_loss, vf_loss, clipfrac, approxkl, mean_ratio, v_clipfrac)


BETA_RANGE = (1e-4, 10.0)      # where an adaptive β stays: scores are normalised, so past 10 a
                               # nat of KL outweighs any score; below 1e-4 the penalty is off
ERROR_RANGE = (-0.2, 1.0)      # the controller's error ln(KL/target) is clipped to this
KL_GAIN = 2.0                  # β's immediate answer to the error: β = b·exp(KL_GAIN·error)


class KLController:
    """β fixed (target None), or adapted toward a target KL per answer.

    Ziegler et al. (2019) move β in proportion to the error, by at most 0.2·n/horizon per update:
    with their horizon of 10000 rollouts and a batch of 32 that is 0.064 % a step, and a policy
    pulled hard by its reward runs to many times the target before β has moved. This is a PI
    controller in log β on the error e = clip(ln(KL/target), -0.2, 1):

        log b ← log b + e·n/horizon     the integral: it finds the β that holds the target
        β = b·exp(KL_GAIN·e)            the proportional part: an overshoot is met at once

    The policy answers β with a lag (Adam's momentum, the PPO epochs), so the integral alone
    overshoots and rings; the proportional part damps that.

    The clip is asymmetric on purpose. Early in a run the KL is near 0 for many iterations; an
    error of ln(0) would wind b down to nothing, and the KL would race far past the target before
    b had climbed back. Lowering β slowly and raising it fast keeps that wind-up small, at the
    cost of a KL that settles a little below the target when it is noisy. β stays in BETA_RANGE.
    """

    def __init__(self, init: float, target: float | None, horizon: float):
        self.value, self.target, self.horizon = init, target, horizon
        self.base = init

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        # A batch's KL estimate can be 0 or even negative: that is "far below" the target.
        error = math.log(max(kl, 1e-12) / self.target)
        error = min(max(error, ERROR_RANGE[0]), ERROR_RANGE[1])
        self.base = _clip_beta(self.base * math.exp(error * n_steps / self.horizon))
        self.value = _clip_beta(self.base * math.exp(KL_GAIN * error))

    def reset(self, value: float) -> None:
        """Start again from β = value (a kl_coef changed on resume)."""
        self.value = self.base = value if self.target is None else _clip_beta(value)

    def state(self) -> dict:
        return {"value": self.value, "base": self.base}

    def load(self, state: dict) -> None:
        self.value = float(state["value"])
        self.base = float(state.get("base", self.value))     # checkpoints before the PI controller


def _clip_beta(beta: float) -> float:
    return min(max(beta, BETA_RANGE[0]), BETA_RANGE[1])
