"""engine.generate: sampling rules, seeding, the KV cache path, stop ids, the context limit,
batched left-padded generation and the repetition penalty."""
import pytest
import torch

from engine import decode
from engine import generate as gen_module
from engine.generate import apply_repetition_penalty, generate, generate_batch, sample_next
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


def test_top_k_draws_each_candidate_at_its_renormalised_probability_and_keeps_ties():
    # The draw runs over the k candidates only: their odds must be the full softmax's, renormalised.
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().expand(6000, 5)
    want = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.0]) / 0.85
    want[4] = 0.15 / 0.85
    for gen in ([torch.Generator().manual_seed(i) for i in range(6000)], torch.Generator().manual_seed(7)):
        share = torch.bincount(sample_next(logits, 1.0, top_k=3, generator=gen), minlength=5).float() / 6000
        assert torch.allclose(share, want, atol=0.025), share
    # A tie at the k-th logit keeps every tied token (the rule transformers' top-k warper has).
    tied = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.0]).expand(4000, 5)
    drawn = set(sample_next(tied, 1.0, top_k=3, generator=torch.Generator().manual_seed(8)).tolist())
    assert drawn == {0, 1, 2, 3}


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


def test_per_row_generators_draw_each_token_at_its_probability():
    # One generator per row (the seeded path): the race over -log(uniform) must draw token i with
    # probability p_i, never a token of probability 0, and each row from its own generator only.
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(6000, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(6000)]
    drawn = sample_next(logits, 1.0, generator=gens)
    share = torch.bincount(drawn, minlength=4).float() / 6000
    assert share[3] == 0
    assert torch.allclose(share[:3], probs[:3], atol=0.025), share
    again = [torch.Generator().manual_seed(i) for i in range(6000)]
    assert torch.equal(sample_next(logits, 1.0, generator=again), drawn)
    alone = sample_next(logits[4:5], 1.0, generator=[torch.Generator().manual_seed(4)])
    assert alone.item() == drawn[4].item()


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


def spy_on_steps(monkeypatch, m, calls: list, record) -> None:
    """Record each forward of `m` and each decoding step after the prompt (engine.decode)."""
    orig = m.forward

    def forward(idx, *a, cache=None, attention_mask=None, **kw):
        out = orig(idx, *a, cache=cache, attention_mask=attention_mask, **kw)
        calls.append(record(idx, cache, attention_mask, out))
        return out

    def make_step(model, max_len):
        real = decode.make_step(model, max_len)

        def step(tokens, cache, padding):    # its mask: the prompts' padding, then every token
            out = real(tokens, cache, padding)
            mask = None if padding is None else padding.additive[:, 0, 0, :cache.length]
            calls.append(record(tokens[:, None], cache, mask, out))
            return out
        return step

    m.forward = forward
    monkeypatch.setattr(gen_module, "make_step", make_step)


def test_generate_restores_mode_uses_cache_and_tracks_no_grad(monkeypatch):
    m = model()
    m.train()
    calls = []
    spy_on_steps(monkeypatch, m, calls,
                 lambda idx, cache, _mask, out: (idx.shape[1], cache is not None, m.training,
                                                 out.requires_grad))
    generate(m, PROMPT, 4, seed=0)
    # a prefill of the prompt, then one token per step through the cache, all in eval, no grad
    assert calls == [(len(PROMPT), True, False, False)] + [(1, True, False, False)] * 3
    assert m.training
    calls.clear()
    generate(m, PROMPT, 4, seed=0, use_cache=False)
    assert [c[:2] for c in calls] == [(len(PROMPT) + i, False) for i in range(4)]


# --- generate_batch -------------------------------------------------------------------------------

PROMPTS = [[3, 14, 15, 9, 26, 5], [7], [2, 7, 18, 28], [11, 22, 33, 44, 55, 6, 17, 28, 39]]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kv", [4, 2])
def test_left_padded_greedy_batch_equals_each_prompt_alone(use_cache, kv):
    m = model(n_kv_head=kv)
    alone = [generate(m, p, 20, temperature=0.0, use_cache=use_cache) for p in PROMPTS]
    assert all(a == greedy_reference(m, p, 20) for a, p in zip(alone, PROMPTS))
    assert len({tuple(a) for a in alone}) == len(PROMPTS)
    batch = generate_batch(m, PROMPTS, 20, temperature=0.0, pad_id=0, use_cache=use_cache)
    assert batch == alone
    # the pad id is masked out, so its value cannot matter
    assert generate_batch(m, PROMPTS, 20, temperature=0.0, pad_id=59, use_cache=use_cache) == alone


def test_stop_ids_end_rows_independently_and_stream_exactly_the_returned_tokens():
    m = model()
    free = generate_batch(m, PROMPTS, 25, temperature=0.0)
    stop = free[0][3]
    want = [f[:f.index(stop) + 1] if stop in f else f for f in free]
    assert any(len(w) == 25 for w in want) and any(len(w) < 25 for w in want)
    events = []
    out = generate_batch(m, PROMPTS, 25, temperature=0.0, stop_ids=[stop],
                         on_token=lambda r, t: events.append((r, t)))
    assert out == want
    for r in range(len(PROMPTS)):
        assert [t for row, t in events if row == r] == out[r]
    assert len(events) == sum(map(len, out)) and all(type(t) is int for _, t in events)
    # tokens arrive step by step: a row's k-th token comes before any row's (k+1)-th
    steps = [sum(1 for row, _ in events[:j] if row == r) for j, (r, _) in enumerate(events)]
    assert steps == sorted(steps)


def test_repetition_penalty_rule_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0], [2.0, -1.0, 0.5, 0.0, -3.0]])
    seen = torch.tensor([[True, True, False, True, False], [False, False, True, False, True]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, 0.0, -3.0], [2.0, -1.0, 0.25, 0.0, -6.0]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits
    # penalty < 1 rewards repeats by the same rule
    assert torch.equal(apply_repetition_penalty(logits[:1], seen[:1], 0.5)[0, :2], torch.tensor([4.0, -0.5]))


def penalised_greedy_reference(m, prompt, n, penalty):
    """Full forward per step, the CTRL rule over every token of prompt + answer, argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            row = m(torch.tensor([ids]))[0, -1].tolist()
            for t in set(ids):
                row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
            ids.append(max(range(len(row)), key=row.__getitem__))
    return ids[len(prompt):]


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_in_generation_matches_the_rule(use_cache):
    m = model()
    want = [penalised_greedy_reference(m, p, 15, 1.8) for p in PROMPTS]
    got = generate_batch(m, PROMPTS, 15, temperature=0.0, repetition_penalty=1.8, use_cache=use_cache)
    assert got == want
    assert got != generate_batch(m, PROMPTS, 15, temperature=0.0)  # it did change something
    assert generate(m, PROMPTS[0], 15, temperature=0.0, repetition_penalty=1.8) == want[0]


def test_seeds_are_per_row_and_independent_of_the_batch():
    m = model(init_std=0.1)
    kw = dict(temperature=1.0, top_k=30, top_p=0.95)
    a = generate_batch(m, PROMPTS, 20, seed=5, **kw)
    assert a == generate_batch(m, PROMPTS, 20, seed=5, **kw)
    assert a != generate_batch(m, PROMPTS, 20, seed=6, **kw)
    # int seed: row i draws with seed + i, exactly as that prompt alone would
    assert a == [generate(m, p, 20, seed=5 + i, **kw) for i, p in enumerate(PROMPTS)]
    # K answers to one prompt in one batch differ, and each is reproducible alone
    k = generate_batch(m, [PROMPTS[0]] * 4, 20, seed=[40, 41, 42, 43], **kw)
    assert len({tuple(x) for x in k}) == 4
    assert k[2] == generate(m, PROMPTS[0], 20, seed=42, **kw)
    # a row keeps its answer when its neighbours change, and with or without the cache
    mixed = generate_batch(m, [PROMPTS[3], PROMPTS[0], PROMPTS[1]], 20, seed=[1, 42, 2], **kw)
    assert mixed[1] == k[2]
    assert generate_batch(m, PROMPTS, 20, seed=5, use_cache=False, **kw) == a


def test_should_stop_ends_every_row_keeping_what_was_drawn():
    m = model()
    events = []
    out = generate_batch(m, PROMPTS, 30, temperature=0.0, on_token=lambda r, t: events.append(r),
                         should_stop=lambda: len(events) >= 3 * len(PROMPTS))
    assert [len(o) for o in out] == [3] * len(PROMPTS)
    assert out == [g[:3] for g in generate_batch(m, PROMPTS, 3, temperature=0.0)]
    assert generate_batch(m, PROMPTS, 30, should_stop=lambda: True) == [[]] * len(PROMPTS)


def test_batch_context_limit_is_per_row():
    m = model(max_seq_len=16)
    prompts = [list(range(1, 13)), [5, 6, 7], list(range(1, 40))]
    alone = [generate(m, p, 50, temperature=0.0) for p in prompts]
    assert [len(a) for a in alone] == [4, 13, 1]
    assert generate_batch(m, prompts, 50, temperature=0.0) == alone
    slid = generate_batch(m, prompts, 30, temperature=0.0, use_cache=False)
    assert slid == [generate(m, p, 30, temperature=0.0, use_cache=False) for p in prompts]
    assert [s[:len(a)] for s, a in zip(slid, alone)] == alone


def test_padded_batch_prefills_once_then_one_token_per_step(monkeypatch):
    m = model()
    calls = []
    spy_on_steps(monkeypatch, m, calls, lambda idx, _cache, mask, _out: (
        tuple(idx.shape), None if mask is None else tuple(mask.shape)))
    generate_batch(m, PROMPTS, 4, temperature=0.0)
    B, P = len(PROMPTS), max(map(len, PROMPTS))
    assert calls == [((B, P), (B, P))] + [((B, 1), (B, P + i)) for i in (1, 2, 3)]
    calls.clear()
    generate_batch(m, [PROMPTS[0], PROMPTS[0][::-1]], 3, temperature=0.0)  # nothing padded: no mask
    assert calls == [((2, 6), None), ((2, 1), None), ((2, 1), None)]


def test_the_prefill_asks_the_head_for_each_rows_last_position_only(monkeypatch):
    # The only prompt logits a generate call reads are the last position's: the head (and the
    # last layer's MLP) run there alone, and the answers are the same as the reference's.
    m = model()
    calls = []
    spy_on_steps(monkeypatch, m, calls, lambda _idx, _cache, _mask, out: tuple(out.shape))
    out = generate_batch(m, PROMPTS, 3, temperature=0.0)
    assert calls[0] == (len(PROMPTS), V)
    assert out[0] == greedy_reference(m, PROMPTS[0], 3)


def test_a_prompt_shared_by_several_rows_is_prefilled_once(monkeypatch):
    m = model()
    calls = []
    spy_on_steps(monkeypatch, m, calls, lambda idx, _cache, mask, _out: (
        tuple(idx.shape), None if mask is None else tuple(mask.shape)))
    a, b = PROMPTS[0], PROMPTS[2]                     # lengths 6 and 4: b is left-padded
    batch = [a, b, a, a, b]
    kw = dict(temperature=1.0, top_k=20, seed=[7, 8, 9, 10, 11])
    out = generate_batch(m, batch, 5, **kw)
    assert calls[0] == ((2, 6), (2, 6))               # the two distinct prompts, once each
    assert calls[1:] == [((5, 1), (5, 6 + i)) for i in (1, 2, 3, 4)]   # every row, its own seed
    # the same answers as each row alone, whose prefill is its own
    assert out == [generate(m, p, 5, temperature=1.0, top_k=20, seed=s) for p, s in zip(batch, kw["seed"])]
    assert generate_batch(m, batch, 8, temperature=0.0) == [generate(m, p, 8, temperature=0.0) for p in batch]


@pytest.mark.parametrize("with_step", [True, False])
def test_finished_rows_leave_the_batch_and_the_rest_decode_as_alone(with_step, monkeypatch):
    # Rows end at the context limit (24 tokens) after different numbers of tokens; the batch
    # sheds its finished rows once half have finished, and every row still draws exactly what
    # it would alone (its own seed, its own repetition marks, its own padding).
    m = model(max_seq_len=24)
    prompts = [list(range(3, 3 + n)) for n in (20, 4, 18, 2, 12)]
    kw = dict(temperature=1.0, top_k=20, repetition_penalty=1.3)
    seeds = [1, 2, 3, 4, 5]
    alone = [generate(m, p, 50, seed=s, **kw) for p, s in zip(prompts, seeds)]
    calls = []
    spy_on_steps(monkeypatch, m, calls, lambda idx, _cache, _mask, _out: idx.shape[0])
    if not with_step:
        monkeypatch.setattr(gen_module, "make_step", lambda *a: None)
    out = generate_batch(m, prompts, 50, seed=seeds, **kw)
    assert [len(o) for o in out] == [4, 20, 6, 22, 12]
    assert out == alone
    widths = calls[1:]                     # after the prefill: 5 rows, then 2 (3 of 5 done), then 1
    assert widths == [5] * 11 + [2] * 8 + [1] * 2


def test_generate_batch_rejects_bad_input():
    m = model()
    assert generate_batch(m, [], 5) == []
    assert generate_batch(m, PROMPTS, 0) == [[]] * len(PROMPTS)
    with pytest.raises(ValueError, match="prompt 1"):
        generate_batch(m, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        generate_batch(m, PROMPTS, 5, seed=[1, 2])
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate_batch(m, PROMPTS, 5, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(m, PROMPTS, -1)
