"""Sampling from a Transformer: temperature, top-k, top-p, seeded, streamed, with a KV cache.

`generate` handles one sequence; batching with left padding comes later and will reuse
`sample_next` and the model's attention_mask support unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from engine.model import Transformer


def _check_settings(temperature, top_k, top_p) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 = off), got {top_p}")


def sample_next(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None):
    """Pick one token id per row of logits [B, V] -> [B].

    temperature 0 is greedy (argmax). Otherwise top-k, then top-p (nucleus: the smallest set of
    most likely tokens whose probability reaches top_p, never empty), then a multinomial draw
    with `generator`, so the same seed gives the same tokens.
    """
    _check_settings(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, stop_ids: Iterable[int] = (), use_cache: bool = True,
             on_token: Optional[Callable[[int], None]] = None) -> list[int]:
    """Continue `prompt_ids`; return the new tokens only (a stop id, if hit, is the last one).

    Context limit (max_seq_len): a prompt longer than max_seq_len - 1 keeps its last
    max_seq_len - 1 tokens, so at least one token can follow. With the cache, generation then
    stops when prompt + answer reach max_seq_len tokens (the cache is full), so the whole
    sequence still fits one forward pass, which is what training and PPO scoring need. Without
    the cache, the context is cropped from the left every step (a sliding window) and
    generation runs on to max_new_tokens.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token (e.g. the bos token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_settings(temperature, top_k, top_p)
    limit = model.config.max_seq_len
    ids = list(prompt_ids)[-(limit - 1):] if limit > 1 else list(prompt_ids)[-1:]
    stop = set(int(s) for s in stop_ids)
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out: list[int] = []
    if max_new_tokens == 0:
        return out

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                cache = model.make_cache(1, min(limit, len(ids) + max_new_tokens), device=device)
                logits = model(torch.tensor([ids], device=device), cache=cache)[:, -1]
            else:
                logits = model(torch.tensor([ids], device=device))[:, -1]
            while True:
                tok = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
                out.append(tok)
                ids.append(tok)
                if on_token is not None:
                    on_token(tok)
                if tok in stop or len(out) >= max_new_tokens:
                    break
                if use_cache:
                    if len(ids) >= limit:
                        break  # prompt + answer fill max_seq_len: the limit with a cache
                    logits = model(torch.tensor([[tok]], device=device), cache=cache)[:, -1]
                else:
                    logits = model(torch.tensor([ids[-limit:]], device=device))[:, -1]
    finally:
        model.train(was_training)
    return out
