"""The PPO stage: the checklist's testable items, resume and the guards."""
import json
import math

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError, from_dict
from engine.model import ScalarModel, load_model, safetensors_state
from engine.ppo import PPOConfig, run
from engine.ppo_core import build_rollout
from engine.reward import NORM_FILE
from engine.runio import StageError
from engine.trainer import COLLAPSE_STEPS
from helpers import StopAt


@pytest.fixture(scope="module")
def rm_ckpt(tiny_lm_ckpt, tmp_path_factory):
    """A reward model made from the tiny LM's backbone, with normalisation stats."""
    root = tmp_path_factory.mktemp("rm")
    lm_ckpt = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    torch.manual_seed(1)
    rm = ScalarModel.from_lm(load_model(lm_ckpt / "model.safetensors"))
    weights, meta = safetensors_state(rm)
    state = json.loads((lm_ckpt / "state.json").read_text())
    path = ckpt.save_checkpoint(root / "checkpoints", 3, model=weights, model_metadata=meta,
                                state={"tokenizer_fingerprint": state["tokenizer_fingerprint"]},
                                extra_files={"tokenizer.json": lm_ckpt / "tokenizer.json"})
    (path / NORM_FILE).write_text(json.dumps({"mean": 0.1, "std": 0.5, "n_answers": 10}))
    return root


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"question alpha beta {i}" for i in range(12)) + "\n")
    return p


def cfg(lm, rm, prompts, **kw):
    base = dict(policy=str(lm), reward_model=str(rm), prompts=[str(prompts)], steps=3,
                rollout_batch_size=6, minibatch_size=3, ppo_epochs=2, max_new_tokens=8, lr=1e-3,
                value_lr=1e-3, probe_every=100, checkpoint_every=100, device="cpu")
    base.update(kw)
    return from_dict(PPOConfig, base)


def metrics(events):
    return {e["step"]: e for e in events if e["type"] == "metrics"}


def test_first_minibatch_ratio_is_exactly_one_and_kl_is_exactly_zero(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    assert run(cfg(tiny_lm_ckpt, rm_ckpt, prompts), tmp_path, events.append) == "completed"
    m = metrics(events)
    assert m[1]["val/ratio_first"] == 1.0          # exactly: same weights, same inputs
    assert m[1]["objective/kl"] == 0.0             # exactly: policy == reference before any update
    assert m[2]["objective/kl"] != 0.0 and m[3]["val/ratio_first"] == 1.0
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
    ro = build_rollout([[1, 4, 9, 5], [1, 4, 5]], [[7, 8, 2], [6]], end_id=2, pad_id=0)
    assert ro.ids.tolist() == [[1, 4, 9, 5, 7, 8, 2], [1, 4, 5, 6, 0, 0, 0]]
    assert ro.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]
    assert ro.finished.tolist() == [True, False]


def test_resume_is_exact(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    c = cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=4, ema_decay=0.9)
    full = []
    run(c, tmp_path / "full", full.append)

    part, rest = [], []
    assert run(c, tmp_path / "res", part.append, StopAt(part, 2)) == "stopped"
    assert run(c, tmp_path / "res", rest.append) == "completed"
    keys = ("objective/score", "objective/kl", "loss/policy", "loss/value", "objective/kl_coef")
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
    # Step 1 has KL 0 (below target): β shrinks by 20 % x 6/10; then KL is above it: β grows.
    assert betas[0] == 0.05 and betas[1] == pytest.approx(0.05 * (1 - 0.2 * 6 / 10))
    assert betas[2] == pytest.approx(betas[1] * (1 + 0.2 * 6 / 10))
    with pytest.raises(ConfigError) as e:
        cfg(tiny_lm_ckpt, rm_ckpt, prompts, minibatch_size=64)
    assert e.value.field == "minibatch_size"
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
