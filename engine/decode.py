"""One decoding step, one new token per row, written straight on the weights.

`generate_batch` runs the prompt through the model's forward, which fills the KV cache; each
token after it comes here. The arithmetic is the model's own for one token with a cache (the
same ops in the same order, so the logits are the same to the bit: tests/test_decode.py), but
without the module calls, with the rope angles of every position computed once per generate
call, and, for a small model, with q/k/v and gate/up each one matmul over weights concatenated
once per call (a matmul's columns do not depend on their neighbours: the same bits). On CPU at
batch 1 the step's weight matmuls are about half its time (bench/decode_floor.py); the rest is
dispatch, a microsecond or so per op whatever its size, so the step is written in as few ops as
give the same bits and runs as one TorchScript function (no Python between its ops): 2-D
activations and torch.mm on the transposed weights (what F.linear calls, without its layers);
q, k and v rotated by one rope (the values by an angle of 0) and k, v written to the cache
(KVCache.kv) with one copy; in-place adds; RMSNorm without no-op casts and with its constants as
tensors; the prompts' padding made an additive mask once a generate call (Padding) rather than
by SDPA in every layer of every step.

Only a plain Transformer takes this path: a model whose layers are wrapped (LoRA adapters
while they train) keeps the forward, which knows its wrappers.
"""
from __future__ import annotations

import copy
import threading
import typing
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.fused_ops import _rms_norm, rope_halves, rope_halves_tables
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


def _layer_weights(block, fuse: bool) -> dict[str, list]:
    """Each projection's weight as the transposed view F.linear multiplies by (so torch.mm here
    is the very call F.linear makes); q/k/v and gate/up as one matmul over concatenated weights
    when `fuse`, else one each. Every value a list, as the scripted step takes them."""
    a, mlp = block.self_attn, block.mlp
    projs = [a.q_proj, a.k_proj, a.v_proj]
    if fuse:
        qkv = [torch.cat([p.weight for p in projs]).t()]
        qkv_b = [torch.cat([p.bias for p in projs]) if a.q_proj.bias is not None else None]
        gate_up = [torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()]
    else:
        qkv, qkv_b = [p.weight.t() for p in projs], [p.bias for p in projs]
        gate_up = [mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()]
    return {"norms": [block.input_layernorm.weight, block.post_attention_layernorm.weight]
            + ([a.q_norm.weight, a.k_norm.weight] if a.qk_norm else []),
            "qkv": qkv, "qkv_b": qkv_b, "o": a.o_proj.weight.t(), "gate_up": gate_up,
            "down": mlp.down_proj.weight.t()}


def _mm(h, weight_t, bias: Optional[torch.Tensor]):
    """F.linear(h, weight, bias) for a 2-D h, minus its dispatch layers."""
    if bias is None:
        return torch.mm(h, weight_t)
    return torch.addmm(bias, h, weight_t)


def _norm(x, weight, eps: float, consts: list[torch.Tensor]):
    """fused_ops.rms_norm's arithmetic. For fp32 without its two casts (each a no-op) and with
    mean written as what it runs on CPU, sum then divide (mean is a composite that adds a cast);
    consts: the divisor and eps, 0-dim tensors made once, since a number is wrapped into a tensor
    on every call."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return _rms_norm(x, weight, eps)[0]
    return (x * (x * x).sum(-1, keepdim=True).div_(consts[0]).add_(consts[1]).rsqrt_()).mul_(weight)


class _Decoder(nn.Module):
    """What a decoding step reads, made once a generate call (lists over layers), and the step.
    Scripted, it lives on the C++ side: a step passes it no weights."""
    norms: list[list[torch.Tensor]]           # input, post-attention[, q, k] norm weights
    qkv: list[list[torch.Tensor]]             # [qkv] or [q, k, v], transposed
    qkv_b: list[list[Optional[torch.Tensor]]]
    o: list[torch.Tensor]
    gate_up: list[list[torch.Tensor]]         # [gate_up] or [gate, up]
    down: list[torch.Tensor]
    shape: list[int]                          # n_head, n_kv_head, head_dim, d_ff
    eps: float
    by_model: list[torch.Tensor]              # d_model, eps as 0-dim tensors (_norm's consts)
    by_head: list[torch.Tensor]               # head_dim, eps
    emb: torch.Tensor
    final: torch.Tensor
    head: torch.Tensor
    cos: torch.Tensor                         # _rope_tables
    sin: torch.Tensor

    def __init__(self, layers: list[dict], emb, final, head, cos, sin, shape: list[int], eps: float):
        super().__init__()
        for name in ("norms", "qkv", "qkv_b", "o", "gate_up", "down"):
            setattr(self, name, [x[name] for x in layers])
        self.emb, self.final, self.head = emb, final, head
        self.cos, self.sin = cos, sin
        self.shape, self.eps = shape, eps
        const = lambda v: torch.tensor(float(v), device=emb.device)   # noqa: E731
        self.by_model = [const(emb.shape[1]), const(eps)]
        self.by_head = [const(shape[2]), const(eps)]

    def attention(self, h, i: int, kv, past: int, cos, sin, mask: Optional[torch.Tensor]):
        """q, k and v side by side, [B, heads, 2, head_dim / 2], go through one rope (the values
        a turn by 0: v * 1 + 0, the same values) and k, v into the cache (KVCache.kv) with one copy."""
        H, K, hd = self.shape[0], self.shape[1], self.shape[2]
        B = h.size(0)
        w_qkv, b_qkv = self.qkv[i], self.qkv_b[i]
        if len(w_qkv) == 1:
            y = _mm(h, w_qkv[0], b_qkv[0])
        else:
            y = torch.cat([_mm(h, w_qkv[0], b_qkv[0]), _mm(h, w_qkv[1], b_qkv[1]), _mm(h, w_qkv[2], b_qkv[2])], 1)
        norms = self.norms[i]
        if len(norms) == 4:       # q and k each normed on its own before the rotation
            y = torch.cat([_norm(y.narrow(1, 0, H * hd).view(B, H, hd), norms[2], self.eps, self.by_head),
                           _norm(y.narrow(1, H * hd, K * hd).view(B, K, hd), norms[3], self.eps, self.by_head),
                           y.narrow(1, (H + K) * hd, K * hd).view(B, K, hd)], 1)
        r = rope_halves(y.view(B, H + 2 * K, 2, hd // 2), cos, sin)
        kv.select(2, past).copy_(r.narrow(1, H, 2 * K).view(B, 2 * K, hd))
        cached = kv.narrow(2, 0, past + 1)
        keys, values = repeat_kv(cached.narrow(1, 0, K), H // K), repeat_kv(cached.narrow(1, K, K), H // K)
        att = F.scaled_dot_product_attention(r.narrow(1, 0, H).view(B, H, 1, hd), keys, values, attn_mask=mask)
        return torch.mm(att.reshape(B, H * hd), self.o[i])

    def mlp(self, h, i: int):
        d_ff, w_gate_up = self.shape[3], self.gate_up[i]
        if len(w_gate_up) == 1:
            gu = torch.mm(h, w_gate_up[0])
            g, u = gu.narrow(1, 0, d_ff), gu.narrow(1, d_ff, d_ff)
        else:
            g, u = torch.mm(h, w_gate_up[0]), torch.mm(h, w_gate_up[1])
        return torch.mm(F.silu(g).mul_(u), self.down[i])

    def forward(self, tokens, kv: list[torch.Tensor], past: int, pads: Optional[torch.Tensor],
                additive: Optional[torch.Tensor]):
        """[B, vocab] for one new token per row at position `past` (less each row's pads)."""
        if pads is None or additive is None:
            cos, sin, mask = self.cos[past], self.sin[past], additive
        else:
            pos = pads.neg().add_(past)
            cos, sin = self.cos[pos], self.sin[pos]
            mask = additive.narrow(3, 0, past + 1)
        x = F.embedding(tokens, self.emb)
        for i in range(len(self.o)):
            x.add_(self.attention(_norm(x, self.norms[i][0], self.eps, self.by_model), i, kv[i], past, cos, sin, mask))
            x.add_(self.mlp(_norm(x, self.norms[i][1], self.eps, self.by_model), i))
        return torch.mm(_norm(x, self.final, self.eps, self.by_model), self.head).float()


# The attributes' types as objects, not the strings postponed annotations leave: TorchScript
# reads a module's attribute types from __annotations__ as they are.
_Decoder.__annotations__ = {k: v for k, v in typing.get_type_hints(_Decoder).items() if k in _Decoder.__annotations__}


def _scripted(decoder: _Decoder):
    """The decoder compiled by TorchScript, whose interpreter runs the step's few hundred small
    ops without a trip through Python for each (the same kernels in the same order: the same
    bits); the decoder itself where TorchScript is off (PYTORCH_JIT=0) or cannot compile it.

    torch.jit.script is deprecated in favour of torch.compile, which makes a chat wait many
    seconds for its first reply while it compiles, for about the same step (docs/PERFORMANCE.md);
    the plain module is the fallback the day TorchScript goes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(decoder)
    except Exception:   # noqa: BLE001 - the plain module computes the same
        return decoder


# The first decoder's compilation, emptied of its weights: every later step gets a copy with its
# own weights bound, since scripting a module costs milliseconds (a short answer's whole
# decoding) and a copy and its binding some microseconds. False: TorchScript could not compile it.
_template = None
_compiling = threading.Lock()


def _compiled(plain: _Decoder):
    """plain as a scripted module of its own (plain itself where TorchScript cannot compile)."""
    global _template
    with _compiling:           # the app's chat and a comparison may start decoding at once
        if _template is None:
            scripted = _scripted(plain)
            _template = copy.copy(scripted) if scripted is not plain else False
            if _template is not False:           # holds no model's weights
                for name, kind in _Decoder.__annotations__.items():
                    if kind is torch.Tensor:
                        setattr(_template, name, torch.empty(0))
                    elif kind is not float:
                        setattr(_template, name, [])
            return scripted
    if _template is False:
        return plain
    dec = copy.copy(_template)
    for name in _Decoder.__annotations__:
        setattr(dec, name, getattr(plain, name))
    return dec


def _rope_tables(cfg, max_len: int, like: torch.Tensor):
    """rope_halves' cos and sin for every position below max_len and every head of q, k and v
    [max_len, n_head + 2 n_kv_head, 2, head_dim / 2]: the values' an angle of 0 (cos 1, sin 0)."""
    H, K, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    cos, sin = rope_cos_sin(torch.arange(max_len, device=like.device)[None], hd, cfg.rope_theta, like.dtype,
                            cfg.rope_scaling)
    cos, sin = rope_halves_tables(cos[0], sin[0])
    heads = (max_len, H + 2 * K, 2, hd // 2)
    cos_t = torch.ones(heads, dtype=like.dtype, device=like.device)
    sin_t = torch.zeros(heads, dtype=like.dtype, device=like.device)
    cos_t[:, :H + K], sin_t[:, :H + K] = cos[:, None], sin[:, None]
    return cos_t, sin_t


def make_step(model: Transformer, max_len: int) -> Optional[Step]:
    """step(tokens [B], cache, padding) -> logits [B, vocab] (fp32), for positions below max_len;
    None when the model must keep its own forward. padding: the prompts' (Padding), None when no
    row of the cache is padded."""
    if not _plain(model):
        return None
    cfg = model.config
    fuse = model.num_params() <= FUSE_UP_TO_PARAMS
    cos, sin = _rope_tables(cfg, max_len, model.lm_head.weight)
    dec = _compiled(_Decoder([_layer_weights(b, fuse) for b in model.model.layers], model.model.embed_tokens.weight,
                             model.model.norm.weight, model.lm_head.weight.t(), cos, sin,
                             [cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff], cfg.norm_eps))

    def step(tokens: torch.Tensor, cache: KVCache, padding: Optional[Padding]):
        logits = dec.forward(tokens, cache.kv, cache.length,
                             None if padding is None else padding.pads, None if padding is None else padding.additive)
        cache.advance(1)
        return logits

    return step
