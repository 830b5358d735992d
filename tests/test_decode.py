"""The decoding step written on the weights (engine/decode.py) gives the model's own logits, to
the bit, for every model shape the workbench loads, padded batches included."""
from __future__ import annotations

import os

import pytest
import torch

from engine import decode, generate
from engine.model import Transformer, config_from_preset

SHAPES = {
    "plain": {},
    "gqa": dict(n_head=4, n_kv_head=2),
    "qwen2-bias": dict(qkv_bias=True),
    "qwen3-qk-norm": dict(qk_norm=True, head_size=24),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def model_of(shape: str, fuse: bool, monkeypatch) -> Transformer:
    monkeypatch.setattr(decode, "FUSE_UP_TO_PARAMS", 10**12 if fuse else 0)
    torch.manual_seed(0)
    shape = {**dict(d_model=48, n_head=4, n_kv_head=4, d_ff=96, max_seq_len=64), **SHAPES[shape]}
    m = Transformer(config_from_preset("tiny", 97, **shape)).eval()
    for p in m.parameters():         # scrambled, so every term of the arithmetic matters
        p.data.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("scripted", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_step_gives_the_forwards_logits_to_the_bit(shape, fuse, scripted, monkeypatch):
    if scripted and os.environ.get("PYTORCH_JIT") == "0":
        pytest.skip("TorchScript is turned off in this process (PYTORCH_JIT=0)")
    m = model_of(shape, fuse, monkeypatch)
    made, script = [], decode._compiled
    # scripted: what runs is TorchScript's compilation of the step, not a silent fallback to the
    # plain module; plain: the same source as Python (PYTORCH_JIT=0, or TorchScript gone).
    monkeypatch.setattr(decode, "_compiled", lambda d: made.append(script(d) if scripted else d) or made[-1])
    prompts = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]])      # row 0 left-padded
    real = prompts != 0
    real[1, 0] = True
    with torch.inference_mode():
        mine, theirs = m.make_cache(2, 20), m.make_cache(2, 20)
        m(prompts, cache=mine, attention_mask=real)
        m(prompts, cache=theirs, attention_mask=real)
        step = decode.make_step(m, 20)
        padding = decode.Padding.of(real, 20, torch.float32)
        mask = real
        tok = torch.tensor([11, 12])
        for _ in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            got = step(tok, mine, padding)
            want = m(tok[:, None], cache=theirs, attention_mask=mask)[:, -1]
            assert torch.equal(got, want)
            tok = got.argmax(-1)
        unpadded = torch.tensor([[3, 4, 5]])
        c1, c2 = m.make_cache(1, 10), m.make_cache(1, 10)
        m(unpadded, cache=c1)
        m(unpadded, cache=c2)
        step = decode.make_step(m, 10)
        assert torch.equal(step(torch.tensor([8]), c1, None), m(torch.tensor([[8]]), cache=c2)[:, -1])
    assert len(made) == 2 and all(isinstance(d, torch.jit.ScriptModule) == scripted for d in made)


def test_steps_made_in_turn_keep_their_own_models_weights(monkeypatch):
    # Every step is a copy of one compiled decoder with its own weights bound: a step made for a
    # second model (or the same model after an update) leaves the first step's model alone.
    a, b = model_of("plain", True, monkeypatch), model_of("gqa", True, monkeypatch)
    with torch.inference_mode():
        caches = {m: (m.make_cache(1, 8), m.make_cache(1, 8)) for m in (a, b)}
        steps = {}
        for m in (a, b):
            mine, theirs = caches[m]
            m(torch.tensor([[3, 4]]), cache=mine)
            m(torch.tensor([[3, 4]]), cache=theirs)
            steps[m] = decode.make_step(m, 8)
        for m in (a, b, a):
            mine, theirs = caches[m]
            assert torch.equal(steps[m](torch.tensor([5]), mine, None), m(torch.tensor([[5]]), cache=theirs)[:, -1])
        for p in a.parameters():
            p.mul_(1.5)
        mine, theirs = a.make_cache(1, 8), a.make_cache(1, 8)
        a(torch.tensor([[3, 4]]), cache=mine)
        a(torch.tensor([[3, 4]]), cache=theirs)
        assert torch.equal(decode.make_step(a, 8)(torch.tensor([5]), mine, None), a(torch.tensor([[5]]), cache=theirs)[:, -1])


def test_generation_is_the_same_with_and_without_it(monkeypatch):
    m = model_of("gqa", True, monkeypatch)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 10], [8]]
    fast = generate.generate_batch(m, prompts, 12, temperature=0.9, top_k=20, seed=3)
    monkeypatch.setattr(generate, "make_step", lambda *a, **k: None)
    slow = generate.generate_batch(m, prompts, 12, temperature=0.9, top_k=20, seed=3)
    assert fast == slow


def test_a_model_with_lora_adapters_keeps_its_forward():
    from engine.lora import LoRASettings, add_adapters
    torch.manual_seed(0)
    m = Transformer(config_from_preset("tiny", 97, d_model=32, n_head=2, n_kv_head=2, d_ff=64,
                                       max_seq_len=32))
    assert decode.make_step(m, 16) is not None
    add_adapters(m, LoRASettings(lora_rank=2, lora_targets=["q_proj", "v_proj"]), seed=0)
    assert decode.make_step(m, 16) is None
