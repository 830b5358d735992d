"""Gradient checkpointing: the same loss and gradients, each layer run twice per training step,
and the stages' setting reaching the model."""
import copy

import pytest
import torch

from engine import lora
from engine.config import from_dict
from engine.model import Block, ScalarModel, Transformer, config_from_preset
from engine.trainer import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls=Transformer, seed=0):
    torch.manual_seed(seed)
    return cls(config_from_preset("tiny", 97, d_model=32, n_layer=3, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=24))


def count_block_calls(model) -> list[int]:
    """Counts the layers' forward runs (the recomputation skips forward hooks, so not with those)."""
    calls = [0]

    def counted(forward):
        def run(*args, **kw):
            calls[0] += 1
            return forward(*args, **kw)
        return run
    for block in model.model.layers:
        block.forward = counted(block.forward)
    return calls


def step(model, x, y):
    """Loss and gradients of one training step."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(x, y)[1] if model.kind == "lm" else model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [Transformer, ScalarModel])
def test_same_loss_and_gradients_and_each_layer_runs_twice(cls):
    plain = tiny(cls)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    plain_calls, ckpt_calls = count_block_calls(plain), count_block_calls(ckpt)
    loss_a, grads_a = step(plain, x, y)
    loss_b, grads_b = step(ckpt, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)
    n_layer = plain.config.n_layer
    assert plain_calls[0] == n_layer
    assert ckpt_calls[0] == 2 * n_layer     # forward, then again in the backward pass


def test_lora_adapters_with_dropout_get_the_same_gradients():
    # The base is frozen (its inputs need no grad) and dropout draws masks: the recomputation
    # must replay them.
    settings = from_dict(lora.LoRASettings, dict(lora_rank=4, lora_dropout=0.2))
    plain = lora.add_adapters(tiny(), settings, seed=0)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    with torch.no_grad():
        for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            if ".lora_B." in n:
                p.normal_()
                q.copy_(p)
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    torch.manual_seed(5)
    loss_a, grads_a = step(plain, x, y)
    torch.manual_seed(5)
    loss_b, grads_b = step(ckpt, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(".lora_" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)


def test_not_used_where_no_backward_follows():
    model = tiny()
    model.grad_checkpointing = True
    calls = count_block_calls(model)
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        model.train()(x)                                    # no grad: nothing to recompute for
    model.eval()(x).sum().backward()                        # evaluation mode
    cache = model.make_cache(2, 24)
    with torch.no_grad():
        model.train()(x, cache=cache)                       # generation, with its KV cache
    assert calls[0] == 3 * model.config.n_layer


def test_the_training_stages_set_it_on_their_models(tiny_lm_ckpt, rm_ckpt, tmp_path):
    from engine.grpo import GRPO, GRPOConfig
    from engine.ppo import PPO, PPOConfig
    from engine.runio import Emitter
    assert TrainConfig(grad_checkpointing=True).grad_checkpointing       # pretraining, SFT, RM, DPO
    (tmp_path / "p.txt").write_text("What is 1 + 2?\n")
    device, dtype, ev = torch.device("cpu"), torch.float32, Emitter(None)
    ppo = PPO(from_dict(PPOConfig, dict(policy=str(tiny_lm_ckpt), reward_model=str(rm_ckpt), prompts=["p.txt"],
                                        max_new_tokens=8, grad_checkpointing=True, device="cpu")),
              tmp_path, device, dtype, ev)
    assert ppo.m.policy.grad_checkpointing and ppo.m.value.grad_checkpointing and not ppo.m.rm.grad_checkpointing
    grpo = GRPO(from_dict(GRPOConfig, dict(policy=str(tiny_lm_ckpt), prompts=["p.txt"], max_new_tokens=8,
                                           eval_tokens=8, probe_tokens=8, grad_checkpointing=True, device="cpu")),
                tmp_path, device, dtype, ev)
    assert grpo.policy.grad_checkpointing


def test_an_sft_run_trains_the_same_with_it(tiny_lm_ckpt, tmp_path, monkeypatch):
    import json
    from engine import sft
    from helpers import losses
    lines = [json.dumps({"prompt": f"alpha {w}", "response": f"{w} beta"}) for w in "gamma delta echo fox golf".split()]
    (tmp_path / "d.jsonl").write_text("\n".join(lines * 8) + "\n")
    calls = [0]
    forward = Block.forward

    def counted(self, *a, **kw):
        calls[0] += 1
        return forward(self, *a, **kw)
    monkeypatch.setattr(Block, "forward", counted)
    runs = {}
    for on in (False, True):
        calls[0] = 0
        events = []
        cfg = from_dict(sft.SFTConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "d.jsonl")], batch_size=4,
                                            max_steps=4, eval_every=100, sample_every=0, checkpoint_every=100,
                                            log_every=1, device="cpu", grad_checkpointing=on))
        assert sft.run(cfg, tmp_path / f"run-{on}", events.append) == "completed"
        runs[on] = (losses(events), calls[0])
    (plain, plain_calls), (ckpt, ckpt_calls) = runs[False], runs[True]
    assert plain.keys() == ckpt.keys() and all(abs(plain[s] - ckpt[s]) <= 1e-6 for s in plain)
    # One block per step is recomputed in each backward pass; evaluation runs it once either way.
    assert ckpt_calls - plain_calls == 4 * 1        # 4 steps x 1 layer
