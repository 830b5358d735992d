"""The DPO stage: its loss on hand-computed log-probs, pairs from rankings with ties,
Plackett-Luce, the answer mask, learning a preference, KL to the reference, exact resume."""
import json
import math

import pytest
import torch

from engine.config import ConfigError, from_dict
from engine.dpo import DPOConfig, Hooks, encode_ranking, run
from engine.dpo_loss import AnswerTokens, pairwise_loss, plackett_luce_loss, ranking_loss, sequence_logps
from engine.reward_data import Ranking
from engine.tokenizer import Tokenizer
from helpers import StopAt, losses
from test_reward import write_prefs


def logsig(z):
    return math.log(1 / (1 + math.exp(-z)))


def test_dpo_loss_on_hand_computed_log_probs():
    # policy / reference log-probs of the chosen (0) and rejected (1) answer
    pi, ref = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.5])
    beta = 0.5
    h = (-4.0 + 5.0) - (-6.0 + 5.5)                    # 1.5
    loss, margin, chosen, rejected = ranking_loss(pi - ref, [[0], [1]], beta)
    assert loss.item() == pytest.approx(-logsig(beta * h), rel=1e-6)
    assert (margin.item(), chosen.item(), rejected.item()) == pytest.approx((0.75, 0.5, -0.25))
    ipo = pairwise_loss(pi - ref, [[0], [1]], beta, "ipo")
    assert ipo.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)


def test_a_ranking_with_ties_gives_exactly_its_pairs():
    lr = torch.tensor([0.3, -0.2, 0.1, -0.5])
    groups = [[0], [1, 2], [3]]                        # 1 and 2 tied: no (1, 2) pair
    beta = 1.0
    loss, margin, chosen, rejected = ranking_loss(lr, groups, beta)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert margin.tolist() == pytest.approx([float(lr[w] - lr[l]) for w, l in pairs])
    # Summed over those five, scaled by 1/C(4,2) as the reward model's loss is.
    assert loss.item() == pytest.approx(-sum(logsig(float(lr[w] - lr[l])) for w, l in pairs) / 6, rel=1e-6)


def test_plackett_luce_for_two_answers_is_dpo_and_handles_ties_as_one_place():
    torch.manual_seed(0)
    for _ in range(5):
        lr = torch.randn(2, requires_grad=True)
        pl = plackett_luce_loss(lr, [[1], [0]], 0.3)
        dpo = pairwise_loss(lr, [[1], [0]], 0.3, "sigmoid")
        assert pl.item() == pytest.approx(dpo.item(), rel=1e-6)
        g_pl, = torch.autograd.grad(pl, lr)
        g_dpo, = torch.autograd.grad(pairwise_loss(lr, [[1], [0]], 0.3, "sigmoid"), lr)
        assert torch.allclose(g_pl, g_dpo)
    z = torch.tensor([1.0, 0.2, -0.4])
    # Order 0 > {1, 2}: 0 is placed among all three; the tied last group places nothing.
    expected = (math.log(sum(math.exp(v) for v in z.tolist())) - 1.0) / 2
    assert plackett_luce_loss(z, [[0], [1, 2]], 1.0).item() == pytest.approx(expected, rel=1e-6)
    # A full order: each place a softmax over the answers not yet placed.
    full = ((math.log(sum(math.exp(v) for v in z.tolist())) - 1.0)
            + (math.log(math.exp(0.2) + math.exp(-0.4)) - 0.2)) / 2
    assert plackett_luce_loss(z, [[0], [1], [2]], 1.0).item() == pytest.approx(full, rel=1e-6)


def _alone(model, ids, mask):
    """Σ log p(token) over the trained tokens of one sequence run on its own."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1])


@pytest.mark.parametrize("max_len", [64, 14])
def test_packed_answers_log_probs_equal_each_answer_alone(max_len):
    """Answers packed behind one copy of their prompt (engine.dpo_loss.AnswerTokens): each
    answer's log-prob is the one it has as a sequence of its own, including answers that share
    their first tokens, a trained token inside the shared prefix, and rows split at max_len."""
    from engine.model import Transformer, config_from_preset
    torch.manual_seed(0)
    model = Transformer(config_from_preset("tiny", 50, max_seq_len=64)).eval()
    p1, p2 = [1, 5, 6, 7, 8, 3], [1, 9, 9, 4]
    groups = [[(p1 + [10, 11, 2], [0] * 6 + [1] * 3),          # the answers begin alike
               (p1 + [10, 12, 13, 2], [0] * 6 + [1] * 4),
               (p1 + [14, 2], [0] * 6 + [1] * 2)],
              [(p2 + [20, 2], [0, 0, 0, 1, 1, 1]),           # the prompt's last token trained too
               (p2 + [21, 22, 2], [0, 0, 0, 0, 1, 1, 1])]]
    batch = AnswerTokens.of(groups, pad_id=0, max_len=max_len)
    assert (batch.packed.ids.shape[1] <= max_len) and (max_len > 14 or batch.packed.ids.shape[0] > 2)
    with torch.no_grad():
        got = sequence_logps(model, batch)
    want = torch.tensor([_alone(model, ids, mask) for g in groups for ids, mask in g])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Logits are asked for where a trained token is read, once a position: the prompt's last
    # token once for all three answers of the first ranking, no other prompt position.
    asked = []
    sequence_logps(lambda *a, at, **k: asked.append(at) or model(*a, at=at, **k), batch)
    trained = sum(m[t + 1] for g in groups for _, m in g for t in range(len(m) - 1))
    assert int(asked[0].sum()) == batch.rows.max() + 1 < trained


def test_the_mask_covers_the_final_answer_only(tiny_lm_ckpt):
    tok = Tokenizer.from_file(tiny_lm_ckpt / "tok.json")
    prompt = [{"role": "user", "content": "good question"}, {"role": "assistant", "content": "bad answer"},
              {"role": "user", "content": "answer good"}]
    enc = encode_ranking(tok, Ranking(prompt, ["good good", "bad"], [[0], [1]], "f:1"), 48)
    for ex, text in zip(enc.answers, ["good good", "bad"]):
        answer = [i for i, m in zip(ex.ids, ex.mask) if m]
        assert tok.decode(answer[:-1]) .strip() == text and answer[-1] == tok.end_id


def cfg(init, data, **kw):
    base = dict(init=str(init), data=[str(data)], batch_size=4, lr=3e-3, beta=0.5, epochs=0, max_steps=40,
                warmup_steps=2, eval_every=20, checkpoint_every=20, log_every=1, sample_every=0,
                kl_prompts=4, kl_tokens=6, device="cpu")
    base.update(kw)
    return from_dict(DPOConfig, base)


def test_dpo_learns_the_preference_and_moves_away_from_the_reference(tiny_lm_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl")
    events = []
    assert run(cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl"), tmp_path / "run", events.append) == "completed"
    vals = [e for e in events if e["type"] == "metrics" and "val/reward_accuracy" in e]
    assert vals[-1]["val/reward_accuracy"] >= 0.9 and vals[-1]["val/loss"] < math.log(2) - 0.1
    assert vals[-1]["val/kl"] > 0
    train = [e for e in events if e["type"] == "metrics" and "train/reward_margin" in e]
    assert train[-1]["train/reward_chosen"] > train[-1]["train/reward_rejected"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["val/reward_accuracy"] >= 0.9 and summary["train_pairs"] > 0


def test_plackett_luce_learns_it_too(tiny_lm_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl")
    events = []
    c = cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl", form="plackett_luce")
    assert run(c, tmp_path / "run", events.append) == "completed"
    vals = [e for e in events if e["type"] == "metrics" and "val/reward_accuracy" in e]
    assert vals[-1]["val/reward_accuracy"] >= 0.9


def test_kl_to_an_identical_reference_is_exactly_zero(tiny_lm_ckpt, tmp_path):
    from engine.artifacts import load_artifact
    from engine.dpo import load_rankings
    from engine.runio import Emitter
    write_prefs(tmp_path / "prefs.jsonl", n=20)
    c = cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl")
    art = load_artifact(tiny_lm_ckpt)
    ref = load_artifact(tiny_lm_ckpt).model.eval()
    train_items, val_items, _ = load_rankings(c, tmp_path, art.tokenizer, 48, Emitter(None))
    hooks = Hooks(c, art, ref, train_items, val_items, Emitter(None), torch.device("cpu"), "x", 48, {})
    figures = hooks.kl_to_reference(art.model.eval())
    assert figures["val/kl"] == 0.0 and figures["val/answer_tokens"] > 0


def test_ipo_holds_each_answers_per_token_log_ratio_margin_to_its_target(tiny_lm_ckpt, tmp_path):
    from engine.artifacts import load_artifact
    from engine.dpo import load_rankings
    from engine.runio import Emitter
    write_prefs(tmp_path / "prefs.jsonl", n=20)
    c = cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl", loss="ipo", beta=0.5)
    art, ref = load_artifact(tiny_lm_ckpt), load_artifact(tiny_lm_ckpt).model.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in art.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    train_items, val_items, _ = load_rankings(c, tmp_path, art.tokenizer, 48, Emitter(None))
    hooks = Hooks(c, art, ref, train_items, val_items, Emitter(None), torch.device("cpu"), "x", 48, {})
    batch = hooks.batch(train_items[:4])
    value, _ = hooks.ranking_losses(art.model.eval(), batch)
    tokens, spans, _ = batch
    n = tokens.lengths().double()
    assert len(set(n.tolist())) > 1            # a sum and a mean would disagree
    with torch.no_grad():
        per_token = (sequence_logps(art.model, tokens) - sequence_logps(ref, tokens)).double() / n
    want = sum(pairwise_loss(per_token[s:s + k], g, 0.5, "ipo") for s, k, g in spans) / len(spans)
    assert value.item() == pytest.approx(want.item(), rel=1e-5)


def test_resume_is_exact(tiny_lm_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    c = cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl", max_steps=10, eval_every=5, checkpoint_every=100)
    full = []
    run(c, tmp_path / "full", full.append)
    part, rest = [], []
    assert run(c, tmp_path / "res", part.append, StopAt(part, 4)) == "stopped"
    assert run(c, tmp_path / "res", rest.append) == "completed"
    assert min(losses(rest)) == 5
    assert {**losses(part), **losses(rest)} == losses(full)


@pytest.mark.parametrize("change, field", [
    (dict(beta=0), "beta"), (dict(loss="hinge"), "loss"), (dict(form="listwise"), "form"),
    (dict(loss="ipo", form="plackett_luce"), "loss"), (dict(kl_prompts=-1), "kl_prompts")])
def test_bad_settings_are_refused_by_name(tiny_lm_ckpt, tmp_path, change, field):
    with pytest.raises(ConfigError) as e:
        cfg(tiny_lm_ckpt, tmp_path / "prefs.jsonl", **change).validate()
    assert e.value.field == field
