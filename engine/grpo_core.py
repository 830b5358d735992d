"""The arithmetic of GRPO (group relative policy optimisation), as pure tensor functions.

A step samples G answers to each of P prompts; rows are grouped, `[g0 a0, g0 a1, ... g0 aG-1,
g1 a0, ...]`, so a reward vector of length P*G reshapes to [P, G]. No value model: an answer's
advantage is its reward relative to the other answers to the same prompt, the same on every one
of its tokens. Per-token tensors use engine/ppo_core.py's layout (`prompt | answer | pad`, the
log-prob of token t at column t, `mask` 1 on answer tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.ppo_core import masked_mean


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.numel() % group_size:
        raise ValueError(f"{x.numel()} rewards do not make groups of {group_size}")
    return x.reshape(-1, group_size)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: the groups whose answers all got the same reward. They teach nothing: every
    advantage in them is zero, so a high share of them means wasted samples (tasks too easy
    or too hard for the policy, or a reward that cannot tell answers apart)."""
    r = group_view(rewards, group_size)
    return (r == r[:, :1]).all(dim=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """[P*G] advantages: reward minus its group's mean, divided by the group's std if `scale`
    (GRPO as DeepSeekMath defines it) or not (Dr. GRPO: dividing by a small std gives
    near-uniform groups, the too easy and the too hard, the largest updates).

    A group whose rewards are all equal gets exactly zero: r - mean(r) is not exactly 0 in
    floating point for every r and G (0.1 * 3 / 3 != 0.1), and divided by a std near 0 that
    rounding would become a large, meaningless advantage.
    """
    r = group_view(rewards.float(), group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    adv = torch.where(uniform_groups(rewards, group_size)[:, None], torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref) per token, for tokens sampled from π:
    exp(d) - d - 1 with d = log π_ref - log π. Unbiased like k1 = -d, but never negative, and
    of low variance when π is near π_ref; its gradient pulls the policy back toward the
    reference (DeepSeekMath's GRPO and TRL's `beta` use it). Zero off the answer tokens: d is
    masked before the exp, because at a pad position nothing holds d small, and an exp that
    overflows to inf would make the masked mean NaN (inf · 0)."""
    d = (ref_logp - logp) * mask
    return torch.exp(d) - d - 1


@dataclass
class GRPOLosses:
    loss: torch.Tensor         # what is backpropagated: the surrogate plus β·KL, token-averaged
    policy: torch.Tensor       # the clipped surrogate alone
    kl: torch.Tensor           # token mean of k3 against the reference
    clipfrac: torch.Tensor
    approxkl: torch.Tensor     # ½ E[(log π - log π_old)²]: how far this update moved
    ratio: torch.Tensor        # token mean of π / π_old


def grpo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, cliprange: float, beta: float) -> GRPOLosses:
    """The clipped surrogate with one advantage per answer, plus β·k3 toward the reference.

    Token-level averaging (DAPO; TRL's loss_type="dapo"/"bnpo"): every answer token of the
    minibatch weighs the same. Averaging per answer first (the original GRPO) gives a token of
    a short answer more weight than one of a long answer, which biases length.
    """
    adv = advantages[:, None]
    logratio = (new_logp - old_logp) * mask
    ratio = torch.exp(logratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    policy = masked_mean(torch.max(pg1, pg2), mask)
    kl = masked_mean(kl_k3(new_logp, ref_logp, mask), mask)
    loss = policy + beta * kl if beta > 0 else policy
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approxkl = 0.5 * masked_mean(logratio ** 2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return GRPOLosses(loss, policy, kl, clipfrac, approxkl, mean_ratio)


def mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std of a 1-D tensor, as floats; std 0 for a single value."""
    x = x.float()
    return float(x.mean()), float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
