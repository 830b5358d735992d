"""The PPO stage: the checklist's testable items, resume and the guards."""
import json
import math

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError, from_dict, to_dict
from engine.weights import load_model, safetensors_state
from engine.ppo import PPOConfig, run
from engine.ppo_core import ERROR_RANGE, KL_GAIN, as_scored, build_rollout
from engine.runio import StageError
from engine.trainer import COLLAPSE_STEPS
from helpers import StopAt, metrics


def cfg(lm, rm, prompts, **kw):
    base = dict(policy=str(lm), reward_model=str(rm), prompts=[str(prompts)], steps=3,
                rollout_batch_size=6, minibatch_size=3, ppo_epochs=2, max_new_tokens=8, lr=1e-3,
                value_lr=1e-3, probe_every=100, checkpoint_every=100, device="cpu")
    base.update(kw)
    return from_dict(PPOConfig, base)


def test_first_minibatch_ratio_is_exactly_one_and_kl_is_exactly_zero(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts), tmp_path, events.append) == "completed"
    m = metrics(events)
    assert m[1]["val/ratio_first"] == 1.0          # exactly: same weights, same inputs
    assert m[1]["objective/kl"] == 0.0             # exactly: policy == reference before any update
    assert m[1]["objective/kl_exact"] == 0.0
    assert m[2]["objective/kl"] != 0.0 and m[3]["val/ratio_first"] == 1.0
    assert m[2]["objective/kl_exact"] > 0.0        # a KL over whole distributions is never negative
    required = ["objective/kl", "objective/entropy", "objective/score", "objective/rlhf_reward",
                "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value", "val/ratio",
                "rollout/length", "rollout/eos_fraction", "score/p50"]
    assert all(k in m[3] for k in required)
    # The iteration's phases are reported and add up (each rounded to the millisecond).
    phases = m[3]["time/generation_s"] + m[3]["time/scoring_s"] + m[3]["time/training_s"]
    assert phases <= m[3]["time/step_s"] + 0.002 and 0 <= m[3]["time/generation_share"] <= 1
    probes = [e for e in events if e["type"] == "sample"]
    assert probes and all("score" in e for e in probes)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert {"model.safetensors", "value.safetensors", "value_optimizer.json", "tokenizer.json"} <= {
        p.name for p in last.iterdir()}


def test_only_answer_tokens_are_actions_and_nothing_after_the_end():
    ro = build_rollout([[1, 4, 9, 5], [1, 4, 5]], [[7, 8, 2], [6]], ends=(2,), pad_id=0)
    assert ro.ids.tolist() == [[1, 4, 9, 5, 7, 8, 2], [1, 4, 5, 6, 0, 0, 0]]
    assert ro.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]
    assert ro.finished.tolist() == [True, False]


def test_an_answer_ending_at_another_stop_token_is_finished_and_scored_at_the_end_token():
    # An imported model stops at its eos (3) as well as its end-of-turn token (2).
    ro = build_rollout([[1, 4], [1, 4], [1, 4]], [[7, 2], [7, 3], [7, 8]], ends=(2, 3), pad_id=0)
    assert ro.finished.tolist() == [True, True, False]
    scored = as_scored(ro.ids, ro.lengths - 1, ro.finished, end_id=2)
    assert scored.tolist() == [[1, 4, 7, 2], [1, 4, 7, 2], [1, 4, 7, 8]]
    assert ro.ids[1].tolist() == [1, 4, 7, 3]          # the policy's own tokens stay as sampled
    plain = build_rollout([[1, 4]], [[7, 2]], ends=(2,), pad_id=0)
    assert as_scored(plain.ids, plain.lengths - 1, plain.finished, end_id=2) is plain.ids


@pytest.mark.parametrize("adaptive", [False, True])
def test_resume_is_exact(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path, adaptive):
    # Adaptive: the KL controller's state and the KL window of kl_budget come back too.
    extra = dict(target_kl=0.05, kl_budget=40.0, lr=1e-2) if adaptive else {}
    c = cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=4, ema_decay=0.9, **extra)
    full = []
    run(c, tmp_path / "full", full.append)

    part, rest = [], []
    assert run(c, tmp_path / "res", part.append, StopAt(part, 2)) == "stopped"
    assert run(c, tmp_path / "res", rest.append) == "completed"
    keys = ("objective/score", "objective/kl", "loss/policy", "loss/value", "objective/kl_coef", "objective/kl_mean")
    pick = lambda evs: {s: tuple(e[k] for k in keys) for s, e in metrics(evs).items()}
    assert min(metrics(rest)) == 3
    assert {**pick(part), **pick(rest)} == pick(full)


def test_guards_stop_with_the_metric_and_step(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    with pytest.raises(StageError, match=r"objective/kl = .* at step 2 exceeds kl_limit"):
        run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, kl_limit=1e-9, lr=1e-2), tmp_path / "a", None)
    with pytest.raises(StageError, match=r"objective/entropy = .* at step 1 .*collapsed"):
        run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, min_entropy=1e6), tmp_path / "b", None)


def test_adaptive_kl_and_bad_settings(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, target_kl=1e-7, kl_horizon=10, steps=3, lr=1e-2),
        tmp_path, events.append)
    betas = [e["objective/kl_coef"] for e in metrics(events).values()]
    # Step 1 has KL 0, below target: the error is clipped at -0.2, and the integral moves by
    # 6/10 of it (6 rollouts, horizon 10). Then KL is far above it: the error is clipped at 1.
    lo, hi = ERROR_RANGE
    b1 = 0.05 * math.exp(lo * 6 / 10)
    assert betas[0] == 0.05 and betas[1] == pytest.approx(b1 * math.exp(KL_GAIN * lo))
    assert betas[2] == pytest.approx(b1 * math.exp(hi * 6 / 10) * math.exp(KL_GAIN * hi))
    for bad in (dict(minibatch_size=64), dict(target_kl=3.0, kl_coef=0.0), dict(target_kl=3.0, kl_coef=50.0),
                dict(kl_horizon=0), dict(kl_budget=0.0), dict(kl_budget=60.0), dict(kl_limit=5.0, kl_budget=5.0)):
        with pytest.raises(ConfigError) as e:
            cfg(tiny_lm_ckpt, rm_ckpt, prompts, **bad)
        assert e.value.field == next(k for k in bad if k not in ("target_kl", "kl_limit")), bad
    with pytest.raises(ConfigError) as e:
        run(cfg(tiny_lm_ckpt, tiny_lm_ckpt, prompts), tmp_path / "x", None)
    assert e.value.field == "reward_model"


def test_a_collapsed_policy_stops_failed_and_a_healthy_one_runs_on(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    small = dict(steps=COLLAPSE_STEPS + 2, rollout_batch_size=3, minibatch_size=3, ppo_epochs=1, max_new_tokens=4)
    healthy = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, **small), tmp_path / "ok", healthy.append) == "completed"
    assert all(e["policy/grad_norm"] > 0 for e in metrics(healthy).values())
    events = []
    with pytest.raises(StageError, match=rf"gradient norm has been 0 for {COLLAPSE_STEPS} steps in a row "
                                         rf"\(to step {COLLAPSE_STEPS + 1}\).*lower lr"):
        run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, lr=1e6, value_lr=1e6, **small), tmp_path / "bad", events.append)
    # What it stopped: after one update the policy is uniform (entropy ln V) and learns nothing.
    m = metrics(events)
    assert m[2]["policy/grad_norm"] == 0 and m[2]["objective/entropy"] == pytest.approx(math.log(300), abs=1e-4)
    with pytest.raises(StageError, match=r"overflowed at step 1: .*lower lr"):
        run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, lr=1e38), tmp_path / "overflow", None)


@pytest.fixture(scope="module")
def peaked_lm(tiny_lm_ckpt, tmp_path_factory):
    """The tiny random model with its logits sharpened 4x, a stand-in for an SFT model: answers
    sampled from a near-uniform policy make the KL of a batch mostly noise."""
    src = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    model = load_model(src / "model.safetensors")
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    weights, meta = safetensors_state(model)
    root = tmp_path_factory.mktemp("peaked")
    ckpt.save_checkpoint(root / "checkpoints", 10, model=weights, model_metadata=meta,
                         state=json.loads((src / "state.json").read_text()),
                         extra_files={"tokenizer.json": src / "tokenizer.json"})
    return root


@pytest.fixture(scope="module")
def digit_rm(peaked_lm, tmp_path_factory):
    """A reward model that pays for the share of digit tokens: a surface property the policy can
    inflate cheaply, so the reward pulls hard (bench/ppo_kl_hold.py measures the same on the demo)."""
    from bench.ppo_kl_hold import digit_tokens, token_share_reward
    from engine.tokenizer import Tokenizer
    digits = digit_tokens(Tokenizer.from_file(peaked_lm / "checkpoints" / "step-000010" / "tokenizer.json"))
    assert len(digits) == 10
    return token_share_reward(peaked_lm, tmp_path_factory.mktemp("digit_rm"), digits)


# No missing-end penalty: a random policy never ends its answers, and ending at once would be
# the cheapest way to a better score, a second pull that is not the one under test.
HARD = dict(rollout_batch_size=16, minibatch_size=8, lr=1e-2, value_lr=1e-2, missing_end_penalty=0.0)


def test_target_kl_holds_against_a_reward_that_pulls_hard(peaked_lm, digit_rm, prompts, tmp_path, one_thread):
    fixed = []
    run(cfg(peaked_lm, digit_rm, prompts, steps=40, **HARD), tmp_path / "fixed", fixed.append)
    assert max(e["objective/kl"] for e in metrics(fixed).values()) > 10       # β 0.05 lets it run away
    held = []
    run(cfg(peaked_lm, digit_rm, prompts, steps=120, target_kl=3.0, **HARD), tmp_path / "held", held.append)
    kl = [e["objective/kl_exact"] for e in metrics(held).values()]
    # One batch of 16 answers estimates the KL give or take a nat or so: the KL over any 20
    # steps from step 50 on is what must stay within a factor of 1.5 of the target.
    means = [sum(kl[i - 20:i]) / 20 for i in range(50, 121)]
    assert 2.0 <= min(means) and max(means) <= 4.5, means
    assert sum(kl[49:]) / len(kl[49:]) == pytest.approx(3.0, rel=0.15)
    sampled = [e["objective/kl"] for e in metrics(held).values()]
    assert sum(sampled[49:]) / len(sampled[49:]) == pytest.approx(3.0, rel=0.25)   # the same KL, noisier
    score = [e["objective/score"] for e in metrics(held).values()]
    assert sum(score[49:]) / len(score[49:]) > score[0] + 0.2                 # while the reward is earned


def test_kl_budget_ends_the_run_completed_and_saved(peaked_lm, digit_rm, prompts, tmp_path, one_thread):
    events = []
    c = cfg(peaked_lm, digit_rm, prompts, steps=60, kl_budget=2.0, **HARD)
    assert run(c, tmp_path, events.append) == "completed"
    m = metrics(events)
    stop = max(m)
    assert stop < 60 and m[stop]["objective/kl_mean"] > 2.0
    assert all(m[s]["objective/kl_mean"] <= 2.0 for s in m if s < stop)
    kls = [m[s]["objective/kl_exact"] for s in range(max(1, stop - 9), stop + 1)]
    assert m[stop]["objective/kl_mean"] == pytest.approx(sum(kls) / len(kls))
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == f"step-{stop:06d}"
    said = [e["message"] for e in events if e["type"] == "log" and "KL budget" in e["message"]]
    assert len(said) == 1 and f"passed kl_budget 2 at step {stop} of 60" in said[0]
    assert json.loads((tmp_path / "summary.json").read_text())["kl_budget_step"] == stop
    assert [e["step"] for e in events if e["type"] == "sample"][-1] == stop      # probed where it ended


def test_a_kl_coef_changed_on_resume_is_used(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path, one_thread):
    events = []
    run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=2, checkpoint_every=1), tmp_path, events.append)
    assert {e["objective/kl_coef"] for e in metrics(events).values()} == {0.05}
    more = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=4, kl_coef=0.2), tmp_path, more.append) == "completed"
    assert [e["objective/kl_coef"] for e in metrics(more).values()] == [0.2, 0.2]
    logs = [e["message"] for e in more if e["type"] == "log"]
    assert any("'kl_coef' changed on resume" in x for x in logs)
    assert any("β is kl_coef 0.2 from here on (it was 0.05 when saved)" in x for x in logs)


def test_a_bf16_run_on_a_cpu_says_it_trains_in_float32(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=1, dtype="bfloat16"), tmp_path,
               events.append) == "completed"
    assert "bfloat16 is used on CUDA only; training in float32 on cpu" in [
        e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]


def test_an_ema_switched_on_at_resume_is_refused_and_a_new_temperature_warns(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    # An EMA begins at step 1 or not at all (0 -> 0.9 used to fail on a missing ema.safetensors);
    # the sampling temperature changes the old log-probs, so the run is no longer the same run.
    run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=1, checkpoint_every=1), tmp_path, [].append)
    with pytest.raises(ConfigError, match="ema_decay"):
        run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=2, ema_decay=0.9), tmp_path, [].append)
    more = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=2, temperature=0.7), tmp_path, more.append) == "completed"
    assert any("'temperature' changed on resume" in e["message"] for e in more if e["type"] == "log")


def test_a_finished_run_started_again_keeps_its_summary(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    # As `workbench pipeline --resume` does after a kill between the final checkpoint and the
    # journal: nothing is left to train, and the run's figures stay in its summary.
    from engine.ppo import main
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=2))))
    assert main(["--run-dir", str(tmp_path), "--log-format", "json"]) == 0
    first = json.loads((tmp_path / "summary.json").read_text())
    assert main(["--run-dir", str(tmp_path), "--log-format", "json"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert "objective/kl" in first and "objective/score" in first
    drop = lambda d: {k: v for k, v in d.items() if k not in ("peak_rss_mb", "seconds")}  # noqa: E731
    assert drop(again) == drop(first)
