"""One decoding step, one new token per row, written straight on the weights.

`generate_batch` runs the prompt through the model's forward, which fills the KV cache; each
token after it comes here. The arithmetic is the model's own for one token with a cache (the
same ops in the same order, so the logits are the same to the bit: tests/test_decode.py), but
without the module calls, with the cos/sin of every position computed once per generate call,
and, for a small model, with q/k/v and gate/up each one matmul over weights concatenated once
per call (a matmul's columns do not depend on their neighbours: the same bits). On CPU at
batch 1 the step's weight matmuls are about half its time (bench/decode_floor.py); the rest is
Python and dispatch, a microsecond or more per op whatever its size, so the step is written in
as few ops as give the same bits: 2-D activations and torch.mm on the transposed weights (what
F.linear calls, without its layers), q and k rotated together, in-place adds, RMSNorm without
no-op casts and with its constants as tensors, the prompts' padding made an additive mask once
a generate call (Padding) rather than by SDPA in every layer of every step.

Only a plain Transformer takes this path: a model whose layers are wrapped (LoRA adapters
while they train) keeps the forward, which knows its wrappers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.fused_ops import rms_norm, rope_swapped, swap_halves
from engine.model import KVCache, Transformer, repeat_kv, rope_cos_sin

# Concatenated weights cost a copy of most of the model for the length of a generate call:
# worth it for the small models a CPU decodes token by token, not for a large one.
FUSE_UP_TO_PARAMS = 50_000_000



@dataclass
class Padding:
    """Left-padded prompts already in the cache, as a decoding step needs them: each row's count
    of pad tokens (a row counts positions from its first real token, the model's rule) and the
    additive attention mask the model's attention_mask implies for every step after the prompt,
    prompt_real followed by ones (generate_batch feeds a finished row a pad token that no one
    reads). Made once a generate call: SDPA would make the additive mask of a bool one in every
    layer of every step."""
    pads: torch.Tensor         # [B] long
    additive: torch.Tensor     # [B, 1, 1, max_len]: -inf at the prompts' pads, 0 after

    @classmethod
    def of(cls, prompt_real: torch.Tensor, max_len: int, dtype: torch.dtype) -> "Padding":
        additive = torch.zeros((prompt_real.shape[0], max_len), dtype=dtype, device=prompt_real.device)
        additive[:, :prompt_real.shape[1]].masked_fill_(~prompt_real, float("-inf"))
        return cls((~prompt_real).sum(-1), additive[:, None, None])

    def rows(self, index: torch.Tensor) -> "Padding":
        return Padding(self.pads[index], self.additive[index])


Step = Callable[[torch.Tensor, KVCache, Optional[Padding]], torch.Tensor]


def _plain(model: Transformer) -> bool:
    """A Transformer whose projections are plain nn.Linear (not wrapped by LoRA adapters)."""
    if type(model) is not Transformer:
        return False
    return all(type(getattr(b.self_attn, n)) is nn.Linear for b in model.model.layers
               for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        type(getattr(b.mlp, n)) is nn.Linear for b in model.model.layers
        for n in ("gate_proj", "up_proj", "down_proj"))


def _layer_weights(block, fuse: bool) -> dict:
    """Each projection's weight as the transposed view F.linear multiplies by (so torch.mm here
    is the very call F.linear makes), q/k/v and gate/up concatenated when `fuse`."""
    a, mlp = block.self_attn, block.mlp
    w = {"norm1": block.input_layernorm.weight, "norm2": block.post_attention_layernorm.weight,
         "o": a.o_proj.weight.t(), "down": mlp.down_proj.weight.t(),
         "q_norm": a.q_norm.weight if a.qk_norm else None,
         "k_norm": a.k_norm.weight if a.qk_norm else None}
    if fuse:
        w["qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t()
        w["qkv_b"] = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                      if a.q_proj.bias is not None else None)
        w["gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()
    else:
        for n in "qkv":
            proj = getattr(a, n + "_proj")
            w[n], w[n + "_b"] = proj.weight.t(), proj.bias
        w.update(gate=mlp.gate_proj.weight.t(), up=mlp.up_proj.weight.t())
    return w


def _mm(h, weight_t, bias):
    """F.linear(h, weight, bias) for a 2-D h, minus its dispatch layers."""
    return torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)


def _norm(x, weight, eps: float, consts):
    """fused_ops.rms_norm's arithmetic. For fp32 without its two casts (each a no-op) and with
    mean written as what it runs on CPU, sum then divide; the divisor and eps are 0-dim tensors
    made once, since a Python number is wrapped into a tensor on every call."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm(x, weight, eps)
    width, eps_t = consts
    return (x * (x * x).sum(-1, keepdim=True).div_(width).add_(eps_t).rsqrt_()).mul_(weight)


def make_step(model: Transformer, max_len: int) -> Optional[Step]:
    """step(tokens [B], cache, padding) -> logits [B, vocab] (fp32), for positions below max_len;
    None when the model must keep its own forward. padding: the prompts' (Padding), None when no
    row of the cache is padded."""
    if not _plain(model):
        return None
    cfg = model.config
    fuse = model.num_params() <= FUSE_UP_TO_PARAMS
    layers = [_layer_weights(b, fuse) for b in model.model.layers]
    emb, final = model.model.embed_tokens.weight, model.model.norm.weight
    head = model.lm_head.weight.t()
    cos_t, sin_t = rope_cos_sin(torch.arange(max_len, device=emb.device)[None], cfg.head_dim,
                                cfg.rope_theta, emb.dtype, cfg.rope_scaling)
    cos_t, sin_t = cos_t[0], swap_halves(sin_t[0])   # once a call, for rope_swapped
    H, K, hd, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    n_rep, d_ff, qk_norm = H // K, cfg.d_ff, cfg.qk_norm
    eps_t = torch.tensor(eps, device=emb.device)
    by_model = (torch.tensor(float(cfg.d_model), device=emb.device), eps_t)
    by_head = (torch.tensor(float(hd), device=emb.device), eps_t)

    def attention(w, h, i, cache, past, cos, sin, mask):
        B = h.shape[0]
        if fuse:
            y = _mm(h, w["qkv"], w["qkv_b"])
            q, k, v = y.narrow(1, 0, H * hd), y.narrow(1, H * hd, K * hd), y.narrow(1, (H + K) * hd, K * hd)
        else:
            q, k, v = (_mm(h, w[n], w[n + "_b"]) for n in ("q", "k", "v"))
        if qk_norm:   # each normed on its own, then rotated on its own
            q = rope_swapped(_norm(q.view(B, H, hd), w["q_norm"], eps, by_head), cos, sin)
            k = rope_swapped(_norm(k.view(B, K, hd), w["k_norm"], eps, by_head), cos, sin)
        elif fuse:    # q and k lie side by side: one rotation for both
            qk = rope_swapped(y.narrow(1, 0, (H + K) * hd).view(B, H + K, hd), cos, sin)
            q, k = qk.narrow(1, 0, H), qk.narrow(1, H, K)
        else:
            q, k = rope_swapped(q.view(B, H, hd), cos, sin), rope_swapped(k.view(B, K, hd), cos, sin)
        cache.k[i].select(2, past).copy_(k)
        cache.v[i].select(2, past).copy_(v.view(B, K, hd))
        keys = repeat_kv(cache.k[i].narrow(2, 0, past + 1), n_rep)
        values = repeat_kv(cache.v[i].narrow(2, 0, past + 1), n_rep)
        att = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask)
        return torch.mm(att.reshape(B, H * hd), w["o"])

    def mlp(w, h):
        if fuse:
            gu = torch.mm(h, w["gate_up"])
            g, u = gu.narrow(1, 0, d_ff), gu.narrow(1, d_ff, d_ff)
        else:
            g, u = torch.mm(h, w["gate"]), torch.mm(h, w["up"])
        return torch.mm(F.silu(g).mul_(u), w["down"])

    def step(tokens: torch.Tensor, cache: KVCache, padding: Optional[Padding]):
        past = cache.length
        if padding is None:
            cos, sin, mask = cos_t[past], sin_t[past], None
        else:
            pos = padding.pads.neg().add_(past)
            cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
            mask = padding.additive.narrow(3, 0, past + 1)
        x = F.embedding(tokens, emb)
        for i, w in enumerate(layers):
            x.add_(attention(w, _norm(x, w["norm1"], eps, by_model), i, cache, past, cos, sin, mask))
            x.add_(mlp(w, _norm(x, w["norm2"], eps, by_model)))
        cache.advance(1)
        return torch.mm(_norm(x, final, eps, by_model), head).float()

    return step
