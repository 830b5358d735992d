"""engine.generate: sampling rules, seeding, the KV cache path, stop ids, the context limit."""
import pytest
import torch

from engine.generate import generate, sample_next
from engine.model import Transformer, config_from_preset

V = 61


def model(seed=0, init_std=0.5, **kw) -> Transformer:
    # A large init spreads the logits over several units, so greedy choices are clear-cut and
    # float noise between the cached and uncached paths cannot flip an argmax.
    torch.manual_seed(seed)
    return Transformer(config_from_preset("tiny", V, init_std=init_std, **kw))


def greedy_reference(m, prompt, n):
    """Full forward pass per step, argmax: the definition generate() must reproduce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPT = [3, 14, 15, 9, 26, 5]


# --- sample_next ----------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


def test_top_k_restricts_the_support():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, V, generator=g).expand(4000, V)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = set(sample_next(logits, 1.0, top_k=3, generator=g).tolist())
    assert drawn == top3  # only those, and (with 4000 draws) each of them
    assert torch.equal(sample_next(logits[:3], 1.0, top_k=1, generator=g), logits[:3].argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.8), 2 (0.95), 0 (1.0)
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(2)
    for p, support in [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        assert set(sample_next(logits, 1.0, top_p=p, generator=g).tolist()) == support, p
    # The kept tokens keep their relative odds: 0.5 : 0.3 renormalised is 0.625 for token 1.
    frac = (sample_next(logits, 1.0, top_p=0.75, generator=g) == 1).float().mean().item()
    assert abs(frac - 0.625) < 0.04
    # top-k first, then top-p on what is left: top_k=2 leaves {1: .625, 3: .375}; p=.5 keeps token 1
    assert set(sample_next(logits, 1.0, top_k=2, top_p=0.5, generator=g).tolist()) == {1}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(4000, 3)
    g = torch.Generator().manual_seed(3)
    share = lambda t: (sample_next(logits, t, generator=g) == 0).float().mean().item()
    cold, warm, hot = share(0.25), share(1.0), share(4.0)  # about 0.98, 0.67, 0.42
    assert cold > warm + 0.2 and warm > hot + 0.15


def test_sample_next_rejects_bad_settings():
    logits = torch.zeros(1, V)
    for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=1.5), dict(top_p=-0.1)):
        with pytest.raises(ValueError):
            sample_next(logits, **{"temperature": 1.0, **kw})


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", [4, 2])
def test_greedy_with_and_without_cache_match_reference(kv):
    m = model(n_kv_head=kv)
    ref = greedy_reference(m, PROMPT, 40)
    assert len(set(ref)) > 3  # a real sequence, not one repeated token
    assert generate(m, PROMPT, 40, temperature=0.0, use_cache=True) == ref
    assert generate(m, PROMPT, 40, temperature=0.0, use_cache=False) == ref


def test_seed_reproduces_and_cache_does_not_change_samples():
    m = model(init_std=0.02)  # near-uniform distribution: seeds should disagree at once
    a = generate(m, PROMPT, 30, seed=123)
    assert a == generate(m, PROMPT, 30, seed=123)
    assert a != generate(m, PROMPT, 30, seed=124)
    m = model()
    s = generate(m, PROMPT, 30, temperature=0.8, top_k=20, top_p=0.95, seed=7)
    assert s == generate(m, PROMPT, 30, temperature=0.8, top_k=20, top_p=0.95, seed=7, use_cache=False)


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = model()
    greedy = generate(m, PROMPT, 25, temperature=0.0)
    assert generate(m, PROMPT, 25, temperature=1.5, top_k=1, seed=1) == greedy
    assert generate(m, PROMPT, 25, temperature=1.5, top_p=1e-6, seed=2) == greedy


def test_stop_id_ends_generation_and_is_included():
    m = model()
    free = generate(m, PROMPT, 30, temperature=0.0)
    stop = free[4]
    cut = free[:free.index(stop) + 1]
    streamed = []
    out = generate(m, PROMPT, 30, temperature=0.0, stop_ids=[stop, V + 5], on_token=streamed.append)
    assert out == cut and out[-1] == stop
    assert streamed == out and all(type(t) is int for t in streamed)


def test_max_new_tokens_and_empty_prompt():
    m = model()
    assert generate(m, PROMPT, 0) == []
    assert len(generate(m, PROMPT, 7, seed=0)) == 7
    with pytest.raises(ValueError):
        generate(m, [], 5)
    with pytest.raises(ValueError):
        generate(m, PROMPT, 5, temperature=-1.0)


def test_context_limit():
    m = model(max_seq_len=16)
    prompt = list(range(1, 13))  # 12 tokens
    # With the cache, prompt + answer stop at max_seq_len.
    cached = generate(m, prompt, 50, temperature=0.0)
    assert len(cached) == 16 - 12
    # Without it, the context slides and generation runs on; the first tokens agree.
    slid = generate(m, prompt, 50, temperature=0.0, use_cache=False)
    assert len(slid) == 50 and slid[:4] == cached
    # A prompt longer than the context keeps its end (one slot is left for the answer).
    long = list(range(1, 40))
    assert generate(m, long, 5, temperature=0.0) == generate(m, long[-15:], 5, temperature=0.0)
    assert len(generate(m, long, 5, temperature=0.0)) == 1


def test_generate_restores_mode_uses_cache_and_tracks_no_grad():
    m = model()
    m.train()
    calls = []
    orig = m.forward

    def spy(idx, *a, cache=None, **kw):
        out = orig(idx, *a, cache=cache, **kw)
        calls.append((idx.shape[1], cache is not None, m.training, out.requires_grad))
        return out

    m.forward = spy
    generate(m, PROMPT, 4, seed=0)
    # a prefill of the prompt, then one token per step through the cache, all in eval, no grad
    assert calls == [(len(PROMPT), True, False, False)] + [(1, True, False, False)] * 3
    assert m.training
    calls.clear()
    generate(m, PROMPT, 4, seed=0, use_cache=False)
    assert [c[:2] for c in calls] == [(len(PROMPT) + i, False) for i in range(4)]
