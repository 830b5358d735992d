"""Divergence in the shared trainer loop: a collapsed run stops failed and says why; a healthy one
runs on. (PPO's side is in test_ppo.py, next to its fixtures.)"""
import json
import math

import pytest

from conftest import TINY_WORDS
from engine.config import from_dict
from engine.reward import RewardConfig
from engine.reward import run as run_reward
from engine.runio import StageError
from engine.sft import SFTConfig
from engine.sft import run as run_sft
from engine.trainer import COLLAPSE_STEPS, CollapseWatch
from helpers import losses

LN_V = math.log(300)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("div") / "sft.jsonl"
    rows = [{"prompt": f"Repeat: {a} {b}", "response": f"{a} {b}"} for a in TINY_WORDS for b in TINY_WORDS[:5]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("div") / "prefs.jsonl"
    rows = [{"prompt": f"question {w} {i}", "answers": [f"{w} good", f"{w} bad", f"{w} bad bad"],
             "ranking": [[0], [1], [2]]} for i, w in enumerate(TINY_WORDS * 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_cfg(lm, data, **kw):
    base = dict(init=str(lm), data=[str(data)], val_fraction=0.1, batch_size=8, max_steps=14, warmup_steps=1,
                eval_every=100, eval_batches=1, sample_every=0, checkpoint_every=100, log_every=1, device="cpu")
    return from_dict(SFTConfig, {**base, **kw})


def test_sft_at_a_huge_lr_stops_failed_once_its_gradients_have_vanished(tiny_lm_ckpt, sft_data, tmp_path):
    events = []
    with pytest.raises(StageError) as e:
        run_sft(sft_cfg(tiny_lm_ckpt, sft_data, lr=1e6), tmp_path / "bad", events.append)
    # The collapse: from the first update on, the loss is ln V and the gradient exactly 0 ...
    grads = {ev["step"]: ev["train/grad_norm"] for ev in events if ev["type"] == "metrics" and "train/grad_norm" in ev}
    assert grads[2] == 0.0 and abs(losses(events)[2] - LN_V) < 1e-4
    # ... and the run is stopped COLLAPSE_STEPS steps after warmup, saying what to try.
    last = 1 + COLLAPSE_STEPS
    assert max(grads) == last - 1      # the last step raised before its metrics
    assert f"0 for {COLLAPSE_STEPS} steps in a row (to step {last})" in str(e.value)
    assert "lower lr" in str(e.value) and "1e+06" in str(e.value)


def test_a_healthy_sft_run_of_the_same_length_completes(tiny_lm_ckpt, sft_data, tmp_path):
    events = []
    assert run_sft(sft_cfg(tiny_lm_ckpt, sft_data, lr=1e-3), tmp_path, events.append) == "completed"
    assert len(losses(events)) == 14 > 1 + COLLAPSE_STEPS


def test_reward_model_at_a_huge_lr_stops_failed(tiny_lm_ckpt, prefs, tmp_path):
    # A reward model has no vocabulary to be uniform over: its collapse shows as gradients of 0.
    cfg = from_dict(RewardConfig, dict(init=str(tiny_lm_ckpt), data=[str(prefs)], batch_size=4, epochs=0,
                                       max_steps=16, lr=1e6, warmup_steps=1, eval_every=100,
                                       checkpoint_every=100, log_every=1, device="cpu"))
    with pytest.raises(StageError, match=f"gradient norm has been 0 for {COLLAPSE_STEPS} steps"):
        run_reward(cfg, tmp_path, None)


def test_an_lr_that_overflows_the_optimizer_names_the_step(tiny_lm_ckpt, sft_data, tmp_path):
    # Adam's step size lr / (1 - beta1) no longer fits a float32: torch's bare RuntimeError before.
    with pytest.raises(StageError, match=r"overflowed at step 1: .* far too high; lower lr"):
        run_sft(sft_cfg(tiny_lm_ckpt, sft_data, lr=1e38, warmup_steps=0), tmp_path, None)


def test_the_watch_counts_consecutive_steps_only():
    watch = CollapseWatch(LN_V, what="train/loss")
    for step in range(1, COLLAPSE_STEPS):
        watch.check(step, 0.0, 3.0, 1e-3)
    watch.check(COLLAPSE_STEPS, 1e-9, 3.0, 1e-3)    # one real gradient starts the count again
    for step in range(COLLAPSE_STEPS + 1, 2 * COLLAPSE_STEPS):
        watch.check(step, 0.0, 3.0, 1e-3)
    with pytest.raises(StageError, match=f"to step {2 * COLLAPSE_STEPS}"):
        watch.check(2 * COLLAPSE_STEPS, 0.0, 3.0, 1e-3)


def test_the_watch_stops_outputs_at_uniform_but_not_a_fresh_model():
    fresh = CollapseWatch(LN_V, what="objective/entropy")
    for step in range(1, 3 * COLLAPSE_STEPS):
        # A freshly initialised tiny model sits about 0.006 nats below ln V.
        fresh.check(step, 0.5, LN_V - 0.006, 1e-3)
    flat = CollapseWatch(LN_V, what="objective/entropy")
    for step in range(1, COLLAPSE_STEPS):
        flat.check(step, 0.5, LN_V - 1e-6, 1e-3)
    with pytest.raises(StageError, match=r"objective/entropy has sat at ln V = 5\.7038 .* every token alike"):
        flat.check(COLLAPSE_STEPS, 0.5, LN_V - 1e-6, 1e-3)
    no_vocab = CollapseWatch(None, what="train/loss")
    for step in range(1, 3 * COLLAPSE_STEPS):
        no_vocab.check(step, 0.5, LN_V, 1e-3)


def test_a_collapsing_run_stopped_and_resumed_stops_at_the_same_step(tiny_lm_ckpt, sft_data, tmp_path):
    # The counts of steps in a row at a zero gradient are saved with the checkpoint.
    from helpers import StopAt
    events = []
    with pytest.raises(StageError, match=f"to step {1 + COLLAPSE_STEPS}"):
        run_sft(sft_cfg(tiny_lm_ckpt, sft_data, lr=1e6), tmp_path / "res", events.append,
                StopAt(events, COLLAPSE_STEPS - 1))
        run_sft(sft_cfg(tiny_lm_ckpt, sft_data, lr=1e6), tmp_path / "res", events.append)
    assert any(e["type"] == "log" and e["message"].startswith("resumed from") for e in events)
