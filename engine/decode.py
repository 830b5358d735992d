"""One decoding step, one new token per row, written straight on the weights.

`generate_batch` runs the prompt through the model's forward, which fills the KV cache; each
token after it comes here. The arithmetic is the model's own for one token with a cache (the
same ops in the same order, so the logits are the same to the bit: tests/test_decode.py), but
without the module calls, with the cos/sin of every position computed once per generate call,
and, for a small model, with q/k/v and gate/up each one matmul over weights concatenated once
per call (a matmul's columns do not depend on their neighbours: the same bits). On CPU at
batch 1 the step's weight matmuls are about half its time (bench/decode_floor.py); the rest was
Python and dispatch, which this cuts.

Only a plain Transformer takes this path: a model whose layers are wrapped (LoRA adapters
while they train) keeps the forward, which knows its wrappers.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.fused_ops import rms_norm
from engine.model import KVCache, Transformer, apply_rope, repeat_kv, rope_cos_sin

# Concatenated weights cost a copy of most of the model for the length of a generate call:
# worth it for the small models a CPU decodes token by token, not for a large one.
FUSE_UP_TO_PARAMS = 50_000_000

Step = Callable[[torch.Tensor, KVCache, Optional[torch.Tensor]], torch.Tensor]


def _plain(model: Transformer) -> bool:
    """A Transformer whose projections are plain nn.Linear (not wrapped by LoRA adapters)."""
    if type(model) is not Transformer:
        return False
    return all(type(getattr(b.self_attn, n)) is nn.Linear for b in model.model.layers
               for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        type(getattr(b.mlp, n)) is nn.Linear for b in model.model.layers
        for n in ("gate_proj", "up_proj", "down_proj"))


def _layer_weights(block, fuse: bool) -> dict:
    a, mlp = block.self_attn, block.mlp
    w = {"norm1": block.input_layernorm.weight, "norm2": block.post_attention_layernorm.weight,
         "o": a.o_proj.weight, "down": mlp.down_proj.weight,
         "q_norm": a.q_norm.weight if a.qk_norm else None,
         "k_norm": a.k_norm.weight if a.qk_norm else None}
    if fuse:
        w["qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        w["qkv_b"] = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                      if a.q_proj.bias is not None else None)
        w["gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    else:
        w.update(q=a.q_proj, k=a.k_proj, v=a.v_proj, gate=mlp.gate_proj.weight,
                 up=mlp.up_proj.weight)
    return w


def make_step(model: Transformer, max_len: int) -> Optional[Step]:
    """step(tokens [B], cache, attention_mask [B, past + 1] or None) -> logits [B, vocab] (fp32),
    for positions below max_len; None when the model must keep its own forward."""
    if not _plain(model):
        return None
    cfg = model.config
    fuse = model.num_params() <= FUSE_UP_TO_PARAMS
    layers = [_layer_weights(b, fuse) for b in model.model.layers]
    emb, head, final = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
    cos_t, sin_t = rope_cos_sin(torch.arange(max_len, device=emb.device)[None], cfg.head_dim,
                                cfg.rope_theta, emb.dtype, cfg.rope_scaling)
    H, K, hd, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    n_rep, d_ff = H // K, cfg.d_ff

    def qkv(w, h, B):
        if fuse:
            y = F.linear(h, w["qkv"], w["qkv_b"])
            q, k, v = y.split([H * hd, K * hd, K * hd], dim=-1)
        else:
            q, k, v = (F.linear(h, m.weight, m.bias) for m in (w["q"], w["k"], w["v"]))
        return (q.view(B, 1, H, hd).transpose(1, 2), k.view(B, 1, K, hd).transpose(1, 2),
                v.view(B, 1, K, hd).transpose(1, 2))

    def mlp(w, h):
        if fuse:
            g, u = F.linear(h, w["gate_up"]).split(d_ff, dim=-1)
        else:
            g, u = F.linear(h, w["gate"]), F.linear(h, w["up"])
        return F.linear(F.silu(g) * u, w["down"])

    def step(tokens: torch.Tensor, cache: KVCache, attention_mask: Optional[torch.Tensor]):
        B, past = tokens.shape[0], cache.length
        if attention_mask is None:
            pos, mask = torch.full((B,), past, device=tokens.device), None
        else:
            # The model's rule: a left-padded row counts positions from its first real token.
            real = attention_mask.to(torch.bool)
            pos = real.long().sum(-1) - 1
            mask = real[:, None, None, :]
        cos, sin = cos_t[0, pos][:, None], sin_t[0, pos][:, None]
        x = F.embedding(tokens[:, None], emb)
        for i, w in enumerate(layers):
            q, k, v = qkv(w, rms_norm(x, w["norm1"], eps), B)
            if w["q_norm"] is not None:
                q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(i, k, v)
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, -1), w["o"])
            x = x + mlp(w, rms_norm(x, w["norm2"], eps))
        cache.advance(1)
        return F.linear(rms_norm(x, final, eps), head).float()[:, -1]

    return step
