"""Sampling from a Transformer: batched, left-padded, with a KV cache, seeded and streamed.

`generate_batch` is the one decoding loop; `generate` is its single-sequence wrapper. Each step
runs: repetition penalty -> temperature -> top-k -> top-p -> a draw (or argmax at temperature 0).

Seeds are per row. An int seed gives row i the seed `seed + i`; a list gives each row its own.
Row i's draws come from its own generator and nothing else, so a row's answer depends only on
its prompt and its seed, not on which other prompts share the batch: K answers to one prompt at
batch K are the answers `generate(prompt, seed=s + j)` would give one at a time (up to the float
rounding of batched matmuls, which can flip a draw that lands on a probability boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from engine.decode import Padding, make_step
from engine.model import KVCache, Transformer

Seed = Union[int, Sequence[int], None]


def _check_settings(temperature, top_k, top_p, repetition_penalty=1.0) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 = off), got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def apply_repetition_penalty(logits, seen, penalty: float):
    """The CTRL rule as Hugging Face applies it: for each token already in the row (`seen`, bool
    [B, V]), divide a positive logit by `penalty` and multiply a negative one, so penalty > 1
    always makes a repeat less likely (dividing a negative logit would raise it)."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Union[torch.Generator, Sequence[torch.Generator], None] = None):
    """Pick one token id per row of logits [B, V] -> [B].

    temperature 0 is greedy (argmax). Otherwise top-k, then top-p (nucleus: the smallest set of
    most likely tokens whose probability reaches top_p, never empty), then a multinomial draw
    with `generator`, so the same seed gives the same tokens. A list of generators, one per row,
    makes each row's draw independent of the others.
    """
    _check_settings(temperature, top_k, top_p)
    if temperature == 0:
        return logits.max(dim=-1).indices    # argmax's first-max rule, in one faster pass
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    # With top-k the draw runs over the k candidates (their logits in descending order, `ids`
    # their tokens): softmax, top-p and the draw then read k numbers, not the whole vocabulary.
    ids = None
    if 0 < top_k < logits.size(-1):
        values, ids = torch.topk(logits, top_k + 1, dim=-1)   # one more, to see a tie at the k-th
        kth = values[..., top_k - 1:top_k]
        if bool((values[..., top_k:] == kth).any()):           # then every tied token stays
            logits, ids = logits.masked_fill(logits < kth, float("-inf")), None
        else:
            logits, ids = values[..., :top_k], ids[..., :top_k]
    if top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
        drawn = _draw_per_row(probs, generator)
    else:
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return drawn if ids is None else ids.gather(-1, drawn[:, None]).squeeze(-1)


def _draw_per_row(probs, generators: Sequence[torch.Generator]):
    """One token per row of probs, drawn with that row's own generator and nothing else.

    The exponential race, which is how torch.multinomial draws one sample: argmax(p / q) over
    q ~ Exp(1) picks token i with probability p_i. q is made as -log(u) of uniform draws: one
    uniform_ per row from its generator, then one log for the batch, several times faster than
    the per-row exponential_ (which sets up a random stream of its own in every call on CPU);
    and the B per-row multinomial calls, each with its own checks and host syncs, become B fills
    and one division and max for the batch. u = 0 would make q infinite and its token's share 0,
    a zero-probability token's equal: q is kept finite, so a row whose one possible token drew
    u = 0 still picks it.
    """
    if not bool((probs >= 0).all()):  # a NaN compares false, so this also catches NaN rows
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    q = torch.empty_like(probs)
    for row, g in zip(q, generators):
        row.uniform_(generator=g)
    q = q.log_().neg_().clamp_(max=torch.finfo(q.dtype).max)
    return (probs / q).max(dim=-1).indices


def _row_generators(seed: Seed, n: int, device) -> Optional[list[torch.Generator]]:
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"seed: {len(seeds)} seeds for {n} prompts")
    else:
        seeds = [int(seed) + i for i in range(n)]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _left_padded(prompts: Sequence[Sequence[int]], keep: int, pad_id: int,
                 device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids, real, lengths): each prompt's last `keep` tokens, right-aligned over `pad_id`;
    `real` marks the prompt tokens."""
    rows = [[int(t) for t in p][-keep:] for p in prompts]
    lens = [len(r) for r in rows]
    P = max(lens)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), P), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        real[i, P - len(r):] = True
    return ids.to(device), real.to(device), lens


def _last(ids: torch.Tensor) -> torch.Tensor:
    """The forward's `at` for the last position of every (left-padded) row: the head and the
    last layer's MLP run there only, which is all a prefill reads."""
    at = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    at[:, -1] = True
    return at


def _prefill(model: Transformer, ids: torch.Tensor, real: Optional[torch.Tensor], cache_len: int):
    """Run the (left-padded) prompts through the model's forward, filling a KV cache of
    cache_len positions; return the last position's logits [B, vocab] and the cache.

    A prompt that several rows share (K answers to one prompt: the Sample stage, GRPO's groups)
    goes through the forward once, and its keys, values and logits are copied to each of its
    rows: the prompt's work is done once instead of K times. Done when it at least halves the
    rows, so the cache it copies from is at most half the whole (what the memory plan allows)."""
    key = ids if real is None else torch.where(real, ids, -1)     # a pad position is no token
    group: dict[tuple, int] = {}                 # prompt -> its place among the distinct ones
    of_row, leaders = [], []                     # each row's group; each group's first row
    for r, row in enumerate(key.tolist()):
        of_row.append(group.setdefault(tuple(row), len(group)))
        if len(group) > len(leaders):
            leaders.append(r)
    if 2 * len(group) > len(of_row):      # not worth the copy (nor the memory plan's bound)
        cache = model.make_cache(ids.size(0), cache_len, device=ids.device)
        return model(ids, cache=cache, attention_mask=real, at=_last(ids)), cache
    first = torch.tensor(leaders, device=ids.device)
    cache = model.make_cache(len(group), cache_len, device=ids.device)
    mask = None if real is None else real[first]
    logits = model(ids[first], cache=cache, attention_mask=mask, at=_last(ids[first]))
    rows = torch.tensor(of_row, device=ids.device)
    return logits[rows], cache.rows(rows)


@dataclass
class _Rows:
    """The rows a decoding loop still runs, and what each carries in the batch: its index in
    the prompts, its generator, its seen-token marks (repetition penalty), its KV-cache row and
    its padding (the decoding step's Padding, or the bool attention_mask the model's forward
    takes when there is no step). `keep` drops the rest: a finished row fed pad tokens costs a
    decoding step as much as a running one."""
    index: list[int]
    gens: Optional[list[torch.Generator]]
    seen: Optional[torch.Tensor]
    cache: Optional[KVCache]          # None without the cache (never kept then)
    padding: Optional[Padding] = None
    mask: Optional[torch.Tensor] = None

    def keep(self, rows: list[int]) -> "_Rows":
        at = torch.tensor(rows, device=self.cache.k[0].device)
        return _Rows([self.index[r] for r in rows], None if self.gens is None else [self.gens[r] for r in rows],
                     None if self.seen is None else self.seen[at], self.cache.rows(at),
                     None if self.padding is None else self.padding.rows(at),
                     None if self.mask is None else self.mask[at])


def _start_cached(model: Transformer, ids: torch.Tensor, real: Optional[torch.Tensor], cache_len: int,
                  gens, seen) -> tuple[torch.Tensor, _Rows, Optional[Callable]]:
    """The prefill, the rows it starts and the decoding step for the tokens after the prompts
    (None: the model's own forward with the bool mask, for a model the step cannot run)."""
    logits, cache = _prefill(model, ids, real, cache_len)
    step = make_step(model, cache.max_len)
    rows = _Rows(list(range(ids.size(0))), gens, seen, cache)
    if step is None:
        rows.mask = real
    elif real is not None:
        rows.padding = Padding.of(real, cache.max_len, model.lm_head.weight.dtype)
    return logits, rows, step


def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, seed: Seed = None,
                   stop_ids: Iterable[int] = (), pad_id: int = 0, use_cache: bool = True,
                   on_token: Optional[Callable[[int, int], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None) -> list[list[int]]:
    """Continue every prompt; return the new tokens of each (a stop id, if hit, is its last).

    Prompts are left-padded with `pad_id` to a common length and masked out, so each row sees
    only its own tokens at its own positions; pad_id only has to be a valid id. Rows finish on
    their own (a stop id, max_new_tokens, the context limit) and emit nothing after; the loop
    ends when all have finished, or when `should_stop()` turns true (checked before the first
    draw and after every step; the tokens drawn so far are returned). `on_token(row, id)` sees
    every returned token, in order.

    Context limit (max_seq_len): a prompt longer than max_seq_len - 1 keeps its last
    max_seq_len - 1 tokens, so at least one token can follow. With the cache, a row finishes
    when its prompt + answer reach max_seq_len tokens, so the whole sequence still fits one
    forward pass, which is what training and PPO scoring need. Without the cache, the context
    is cropped from the left every step (a sliding window) and rows run on to max_new_tokens.

    Rows that share a prompt share its prefill (_prefill). With the cache, once half of the
    rows in the batch have finished they leave it (their cache rows are dropped), so a batch
    whose answers end at different lengths does not run its longest one at full width; halving
    keeps the copying to about one cache's worth in all.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_settings(temperature, top_k, top_p, repetition_penalty)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} must hold at least one token (e.g. the bos token)")
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    if B == 0 or max_new_tokens == 0:
        return out

    limit = model.config.max_seq_len
    device = model.lm_head.weight.device
    ids, real, lens = _left_padded(prompts, max(limit - 1, 1), pad_id, device)
    P = ids.size(1)
    padded = min(lens) < P
    stop = set(int(s) for s in stop_ids)
    stopped = should_stop or (lambda: False)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        seen[torch.arange(B, device=device)[:, None].expand(B, P)[real], ids[real]] = True
    gens = _row_generators(seed, B, device)

    def forward_window(ids, real):
        # No cache: the whole sequence every step, its last max_seq_len columns. A window with no
        # pad left in it takes the model's mask-free causal path.
        ids, real = ids[:, -limit:], real[:, -limit:]
        return model(ids, attention_mask=None if bool(real.all()) else real)[:, -1]

    done = [False] * B
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                # Rows stop at their own limit, so the cache must hold the longest-running row:
                # the shortest prompt, after the padding that lines it up with the longest.
                logits, rows, step = _start_cached(model, ids, real if padded else None,
                                                   P + min(max_new_tokens, limit - min(lens)), gens, seen)
            else:
                logits = forward_window(ids, real)
                rows = _Rows(list(range(B)), gens, seen, None)
            if stopped():
                return out
            while True:
                if rows.seen is not None:
                    logits = apply_repetition_penalty(logits, rows.seen, repetition_penalty)
                toks = sample_next(logits, temperature, top_k, top_p, rows.gens).tolist()
                for i, t in zip(rows.index, toks):
                    if done[i]:
                        continue
                    out[i].append(t)
                    if on_token is not None:
                        on_token(i, t)
                    n = len(out[i])
                    if t in stop or n >= max_new_tokens or (use_cache and lens[i] + n >= limit):
                        done[i] = True
                if all(done) or stopped():
                    break
                running = [r for r, i in enumerate(rows.index) if not done[i]]
                if use_cache and 2 * len(running) <= len(rows.index):
                    rows, toks = rows.keep(running), [toks[r] for r in running]
                nxt = torch.tensor([pad_id if done[i] else t for i, t in zip(rows.index, toks)], device=device)
                if rows.seen is not None:   # a finished row's pad mark is never read again
                    rows.seen[torch.arange(len(toks), device=device), nxt] = True
                if use_cache and step is not None:
                    logits = step(nxt, rows.cache, rows.padding)
                elif use_cache:
                    if rows.mask is not None:
                        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(toks), 1))], 1)
                    logits = model(nxt[:, None], cache=rows.cache, attention_mask=rows.mask)[:, -1]
                else:
                    ids = torch.cat([ids, nxt[:, None]], 1)
                    real = torch.cat([real, torch.ones((B, 1), dtype=torch.bool, device=device)], 1)
                    logits = forward_window(ids, real)
    finally:
        model.train(was_training)
    return out


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: Optional[int] = None,
             stop_ids: Iterable[int] = (), use_cache: bool = True,
             on_token: Optional[Callable[[int], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> list[int]:
    """Continue one prompt; return the new tokens only. `generate_batch` with one row, whose
    rules (stop ids, context limit, seeding) apply unchanged; `on_token(id)` gets each token."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token (e.g. the bos token)")
    cb = (lambda _row, t: on_token(t)) if on_token is not None else None
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop_ids=stop_ids, use_cache=use_cache, on_token=cb,
                          should_stop=should_stop)[0]
