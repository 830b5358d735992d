"""PPO arithmetic against hand-computed cases."""
import math

import pytest
import torch

from engine.ppo_core import (KLController, gae, last_action_index, logprobs_and_entropy, masked_whiten,
                             per_token_rewards, ppo_losses, shift_values, token_logprobs)


def test_gae_matches_a_hand_computed_example():
    mask = torch.tensor([[0., 1., 1., 1., 0.]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 7.0]])   # the 9 and 7 are not states: ignored
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta3 = 1.0 - 0.3 = 0.7; delta2 = -0.2 + 0.3 - 0.4 = -0.3; delta1 = 0.1 + 0.4 - 0.5 = 0
    a3 = 0.7
    a2 = -0.3 + 0.95 * a3
    a1 = 0.0 + 0.95 * a2
    assert adv[0].tolist() == pytest.approx([0, a1, a2, a3, 0])
    assert ret[0].tolist() == pytest.approx([0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0])
    # gamma < 1 discounts the next value and the running advantage.
    adv_g, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    d3, d2, d1 = 1.0 - 0.3, -0.2 + 0.9 * 0.3 - 0.4, 0.1 + 0.9 * 0.4 - 0.5
    assert adv_g[0, 1:4].tolist() == pytest.approx([d1 + 0.9 * (d2 + 0.9 * d3), d2 + 0.9 * d3, d3])


def test_rewards_put_the_score_on_the_last_action_and_nothing_after():
    mask = torch.tensor([[0., 1., 1., 0., 0.], [0., 0., 1., 1., 1.]])
    logp = torch.tensor([[0., -1., -2., -3., -4.], [0., 0., -1., -1., -1.]])
    ref = torch.tensor([[0., -1.5, -1.0, 0., 0.], [0., 0., -1., -2., -0.5]])
    rewards, kl = per_token_rewards(logp, ref, mask, torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert last_action_index(mask).tolist() == [2, 4]
    assert rewards[0].tolist() == pytest.approx([0, -0.1 * 0.5, -0.1 * -1.0 + 2.0, 0, 0])
    assert rewards[1].tolist() == pytest.approx([0, 0, 0, -0.1 * 1.0, -0.1 * -0.5 - 1.0])
    assert kl[0, 3:].abs().sum() == 0 and rewards[0, 3:].abs().sum() == 0


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[100., 1., 2., 3., -50.]])
    mask = torch.tensor([[0., 1., 1., 1., 0.]])
    w = masked_whiten(x, mask)
    valid = w[0, 1:4]
    assert valid.mean().item() == pytest.approx(0, abs=1e-6)
    assert (valid ** 2).mean().item() == pytest.approx(1, rel=1e-4)
    assert w[0, 0] == 0 and w[0, 4] == 0


def test_logprobs_are_shifted_and_temperature_scaled():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[3, 1, 6, 2]])
    lp = token_logprobs(logits, ids, temperature=0.7)
    expect = torch.log_softmax(logits[0, 1] / 0.7, -1)[6]
    assert lp[0, 0] == 0 and lp[0, 2].item() == pytest.approx(expect.item(), rel=1e-6)
    v = shift_values(torch.tensor([[1., 2., 3., 4.]]))
    assert v.tolist() == [[0., 1., 2., 3.]]


def test_one_pass_logprobs_equal_token_logprobs_and_entropy_is_the_sampling_distributions():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 9)
    ids = torch.randint(0, 9, (2, 5))
    lp, ent = logprobs_and_entropy(logits, ids, temperature=0.7)
    assert torch.equal(lp, token_logprobs(logits, ids, temperature=0.7))   # PPO's ratio-1 start needs equality
    expect = torch.distributions.Categorical(logits=logits[:, :-1] / 0.7).entropy()
    assert torch.allclose(ent[:, 1:], expect, atol=1e-5) and (ent[:, 0] == 0).all()


def test_ratio_is_one_and_losses_clip_as_specified():
    mask = torch.tensor([[0., 1., 1.]])
    old = torch.tensor([[0., -1., -2.]])
    adv = torch.tensor([[0., 1., -1.]])
    vals = torch.tensor([[0., 0.5, 0.5]])
    ret = torch.tensor([[0., 1.0, 0.0]])
    same = ppo_losses(old.clone(), old, adv, vals.clone(), vals, ret, mask, 0.2, 0.2)
    assert same.ratio.item() == 1.0 and same.clipfrac.item() == 0 and same.approxkl.item() == 0
    # A big move up on a positive advantage is clipped at 1.2.
    new = old + torch.tensor([[0., math.log(2.0), 0.]])
    moved = ppo_losses(new, old, adv, vals, vals, ret, mask, 0.2, 0.2)
    assert moved.total_policy.item() == pytest.approx((-1 * 1.2 + 1 * 1.0) / 2)
    assert moved.clipfrac.item() == pytest.approx(0.5)
    # The value loss takes the worse of clipped and unclipped.
    newv = torch.tensor([[0., 1.5, 0.5]])
    vl = ppo_losses(old, old, adv, newv, vals, ret, mask, 0.2, 0.2).value
    # row: t1 unclipped (1.5-1)^2 = .25, clipped (0.7-1)^2 = .09 -> .25; t2 (0.5-0)^2 = .25 both
    assert vl.item() == pytest.approx(0.5 * (0.25 + 0.25) / 2)


def test_adaptive_kl_moves_toward_the_target():
    c = KLController(0.1, target=6.0, horizon=100)
    c.update(12.0, n_steps=10)          # KL too high: error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c2 = KLController(0.1, target=6.0, horizon=100)
    c2.update(3.0, n_steps=10)          # too low: -0.2
    assert c2.value < 0.1
    fixed = KLController(0.1, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
