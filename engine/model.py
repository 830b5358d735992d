"""A Llama-style decoder: pre-norm RMSNorm, RoPE, SwiGLU, no biases, causal SDPA, a KV cache.

Parameter names and shapes are exactly those of Hugging Face's `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), and RoPE uses HF's "rotate_half" layout, so a
state_dict moves between the two with no renaming and no permutation. `engine.hf_model` reads
and writes the matching `config.json` (Llama, and Qwen2/Qwen3 with the options they add).

Weights are stored as safetensors with our config JSON in the file's metadata, never pickled
(engine.weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.config import ConfigError, from_dict, require
from engine.fused_loss import IGNORE_INDEX, linear_cross_entropy
from engine.fused_ops import rms_norm, rope, swiglu
from engine.ragged import Ragged, layout_of, zero_pads


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int  # grouped-query attention; equal to n_head for plain multi-head attention
    d_ff: int  # SwiGLU hidden size
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # What imported families add (engine.hf_model maps their config.json onto these):
    head_size: int = 0          # per-head width; 0: d_model // n_head (Qwen3 sets its own)
    qkv_bias: bool = False      # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False       # RMSNorm over each head of q and k before RoPE (Qwen3)
    rope_scaling: Optional[dict[str, Any]] = None   # HF's rope_scaling: {"rope_type": "linear"|"llama3", ...}

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    def check_fits(self, field: str, tokens: int) -> None:
        """A training sequence of `tokens` (0: the whole context) fits this model's context."""
        if tokens > self.max_seq_len:
            raise ConfigError(field, f"{tokens} is longer than the model's context ({self.max_seq_len})")

    def check_room(self, field: str, new_tokens: int) -> None:
        """`new_tokens` generated after a prompt still leave the prompt a few tokens of context."""
        if new_tokens >= self.max_seq_len - 4:
            raise ConfigError(field, f"must leave room for the prompt in the context ({self.max_seq_len} tokens)")

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "max_seq_len"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.head_size >= 0, "head_size", "must be 0 (d_model / n_head) or positive")
        require(self.head_size > 0 or self.d_model % self.n_head == 0, "n_head",
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        require(self.n_head % self.n_kv_head == 0, "n_kv_head",
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        require(self.head_dim % 2 == 0, "n_head",
                f"head_dim = d_model / n_head = {self.head_dim} must be even for rotary embeddings")
        require(self.rope_theta > 0, "rope_theta", "must be positive")
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.init_std > 0, "init_std", "must be positive")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)


# Everything but vocab_size, which comes from the tokenizer. d_ff is ~8/3 * d_model (SwiGLU keeps
# the MLP's parameter count near a 4x GELU MLP's), rounded up to a multiple of 64.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layer=2, n_head=4, n_kv_head=4, d_ff=192, max_seq_len=128),
    # The demo's default: big enough to learn the lookup and counting tasks, small enough that
    # the whole pipeline fits in minutes on a 2-core CPU.
    "mini": dict(d_model=128, n_layer=4, n_head=4, n_kv_head=4, d_ff=384, max_seq_len=128),
    "small": dict(d_model=256, n_layer=6, n_head=8, n_kv_head=8, d_ff=704, max_seq_len=256),
    "medium": dict(d_model=512, n_layer=8, n_head=8, n_kv_head=8, d_ff=1408, max_seq_len=512),
    "base": dict(d_model=768, n_layer=12, n_head=12, n_kv_head=12, d_ff=2048, max_seq_len=1024),
}


def config_from_preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return from_dict(ModelConfig, {**PRESETS[name], "vocab_size": vocab_size, **overrides})


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # As HF does it: normalise in fp32 (bf16 squares lose too much), cast back, then scale;
        # one autograd node (engine.fused_ops), the same result to the bit.
        return rms_norm(x, self.weight, self.eps)


ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(rs: dict) -> None:
    kind = rs.get("rope_type", rs.get("type", "default"))
    require(kind in ROPE_TYPES, "rope_scaling",
            f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(kind, ())
    for key in need:
        require(isinstance(rs.get(key), (int, float)) and not isinstance(rs.get(key), bool)
                and rs[key] > 0, "rope_scaling", f"{kind} scaling needs a positive '{key}'")
    if kind == "llama3":
        require(rs["high_freq_factor"] > rs["low_freq_factor"], "rope_scaling",
                "high_freq_factor must exceed low_freq_factor")


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict], device=None):
    """The rotary frequencies, as transformers computes them for each rope type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype, scaling: Optional[dict] = None):
    """cos/sin [B, T, head_dim] for integer positions [B, T].

    Computed per call from the config rather than stored as a buffer: a buffer would be cast by
    `model.to(torch.bfloat16)` and the angles of late positions would lose all precision.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: the two halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) (engine.fused_ops.rope).
    x: [B, H, T, hd]; cos/sin: [B, T, hd], broadcast over heads."""
    return rope(x, cos.unsqueeze(1), sin.unsqueeze(1))


def repeat_kv(x, n_rep: int):
    """[B, n_kv, T, hd] -> [B, n_kv * n_rep, T, hd]; query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class KVCache:
    """Preallocated keys and values for every layer: [B, n_kv_head, max_len, head_dim] each.

    A layer's keys and values are the two halves of one tensor `kv[layer]` [B, 2 n_kv_head,
    max_len, head_dim] (keys first), so a decoding step (engine/decode.py) writes both with one
    copy. `length` counts the positions already written; a forward pass writes its T new
    positions at `length` in every layer, then advances it once.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=None):
        shape = (batch_size, 2 * n_kv_head, max_len, head_dim)
        self._views([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)])
        self.max_len = max_len
        self.length = 0

    def _views(self, kv: list) -> None:
        K = kv[0].shape[1] // 2
        self.kv = kv
        self.k = [t.narrow(1, 0, K) for t in kv]
        self.v = [t.narrow(1, K, K) for t in kv]

    def update(self, layer: int, k, v):
        """Write the new block at `length`; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache whose row i is row index[i] of this one, up to the same length: one
        prompt's keys and values for each of the rows that continue it."""
        new = KVCache.__new__(KVCache)
        new._views([t.index_select(0, index) for t in self.kv])
        new.max_len, new.length = self.max_len, self.length
        return new

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, cache=None, layer=0, keep=None):
        """keep (bool, x's layout without d): the outputs wanted, [M, d]; None: all of them."""
        if isinstance(mask, Ragged):
            return self._ragged(x, cos, sin, mask, keep)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if isinstance(mask, str):  # "causal": the fast path, no mask tensor at all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if keep is None else y[keep])

    def _ragged(self, x, cos, sin, layout: Ragged, keep=None):
        """x [N, d], the real tokens alone (engine.ragged); cos/sin [N, 1, hd]."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_head, self.head_dim)
        k = self.k_proj(x).view(N, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(N, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        n_rep = self.n_head // self.n_kv_head
        q, k, v = layout.to_heads(q), layout.to_heads(k), layout.to_heads(v)
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        y = layout.from_heads(y)
        return self.o_proj(y if keep is None else y[keep])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))   # silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, keep=None):
        """keep: see Attention. Past the attention a position reads no other, so the last
        layer need not run its projection and MLP where no one reads the output."""
        y = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, keep)
        x = x + y if keep is None else x[keep] + y
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named and laid out like HF's `LlamaModel`, so the state_dict keys come out identical."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


def cross_entropy(logits, targets):
    """Mean over the targets that are not -100, as linear_cross_entropy computes it fused."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    kind = "lm"  # what the head computes; stored in the weights file so loading picks the class
    # Recompute each layer's activations in the backward pass instead of keeping them: memory for
    # activations drops from one set per layer to one layer's, for about a third more compute.
    # A training switch (the stages set it from their config), never saved with the weights.
    grad_checkpointing = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Backbone(cfg)
        self._make_head(cfg)
        self.apply(self._init_weights)
        # GPT-2 style: each residual branch's output projection is scaled by 1/sqrt(2 * n_layer)
        # (two branches per layer), so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.tie_weights()

    def _make_head(self, cfg: ModelConfig) -> None:
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)

    def tie_weights(self) -> None:
        """Share one matrix between the input embedding and the output head (HF's convention)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.model.embed_tokens.weight
        cfg = self.config
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def _mask_and_positions(self, B, T, past, attention_mask, position_ids, device):
        """Attention mask for SDPA ("causal", None or bool [B|1, 1, T, past+T]) and positions [B|1, T].

        A query at absolute position past+i may read key j when j <= past+i and, with an
        attention_mask, key j is real. Every query also reads itself: a left-pad query would
        otherwise see no key at all, and SDPA turns an all-masked row into NaN that then
        leaks through 0 * NaN into the real rows of the next layer.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            # Who reads whom, given whole (engine.reward_data.Packed): the caller's positions too.
            if past or position_ids is None or attention_mask.shape[-2:] != (T, T):
                raise ValueError("a [B, 1, T, T] attention_mask takes position_ids and no cache")
            return attention_mask, position_ids
        if attention_mask is None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=device)[None]
            if past == 0:
                return "causal", position_ids
            if T == 1:
                return None, position_ids  # one new token reads everything cached
            j = torch.arange(past + T, device=device)
            i = torch.arange(past, past + T, device=device)[:, None]
            return (j <= i)[None, None], position_ids
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [batch, past + new] = {[B, past + T]}, "
                             f"got {list(attention_mask.shape)}")
        real = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            # Left-padded rows start counting at their first real token.
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        j = torch.arange(past + T, device=device)
        i = torch.arange(past, past + T, device=device)[:, None]
        mask = ((j <= i)[None] & real[:, None, :]) | (j == i)[None]
        return mask[:, None], position_ids

    def hidden(self, idx, *, cache=None, attention_mask=None, position_ids=None, layout=None, at=None):
        """Final normed hidden states [B, T, d_model] (what reward and value heads read). With a
        `layout` (engine.ragged.Ragged of right-padded rows), [N, d_model] for the real tokens
        alone, row-major. With `at` (bool [B, T]), [M, d_model] for those positions alone,
        row-major: the last layer runs its output projection and MLP there only."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if past + T > limit:
            what = "KV cache" if cache is not None else "max_seq_len"
            raise ValueError(f"sequence of {past + T} tokens exceeds the {what} ({limit})")
        cfg = self.config
        if layout is not None:
            mask = layout
            at = None if at is None else mask.take(at)
            x = self.model.embed_tokens(mask.take(idx))
            cos, sin = rope_cos_sin(mask.positions[None], cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
            cos, sin = cos[0, :, None], sin[0, :, None]      # [N, 1, hd]: one angle per token, all heads
        else:
            mask, pos = self._mask_and_positions(B, T, past, attention_mask, position_ids, idx.device)
            x = self.model.embed_tokens(idx)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        # Only where a backward pass will follow: not in evaluation, generation (the KV cache) or
        # under no_grad, where nothing is kept for a backward pass anyway.
        recompute = self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            keep = at if i == last else None
            if recompute:
                # Non-reentrant: works with inputs that need no grad (a frozen base under LoRA),
                # and replays the RNG state so dropout draws the same masks the second time.
                x = checkpoint(block, x, cos, sin, mask, keep=keep, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, keep)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, idx, targets=None, *, cache=None, attention_mask=None, position_ids=None,
                loss_only: bool = False, at=None, lengths=None):
        """Logits [B, T, vocab] in fp32; with targets (aligned with idx: targets[:, t] is the
        token after idx[:, t], -100 where no loss), returns (logits, mean cross-entropy).

        loss_only=True returns the loss alone, computed by engine.fused_loss without ever
        holding the whole logits tensor: what training steps and evaluation use. `at` (bool
        [B, T], no targets) returns the logits of those positions only, [M, vocab] in row-major
        order: the head and its softmax are a large part of a small model's pass, and PPO, GRPO
        and DPO read only the states their answer tokens are drawn from. Keywords of forward
        rather than methods of their own, so that they go through DDP and torch.compile
        wrappers like any call of the model. `lengths` ([B], right-padded rows) runs the real
        tokens alone (engine.ragged): the same results, no loss and zero logits at the pads."""
        if loss_only and targets is None:
            raise ValueError("loss_only needs targets")
        if at is not None and targets is not None:
            raise ValueError("at gives logits only; compute the loss from them")
        if lengths is not None and (cache is not None or attention_mask is not None or position_ids is not None):
            raise ValueError("lengths takes no cache, attention_mask or position_ids")
        real, layout = layout_of(idx, lengths, at)
        h = self.hidden(idx, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                        layout=layout, at=at)
        if targets is not None and real is not None:
            targets = targets.masked_fill(~real, IGNORE_INDEX) if layout is None else layout.take(targets)
        if loss_only:
            return self.head_loss(h, targets)
        logits = self.lm_head(h).float()
        if at is not None:
            return logits
        loss = None if targets is None else cross_entropy(logits, targets)
        logits = zero_pads(logits, real, layout)
        return logits if loss is None else (logits, loss)

    def head_loss(self, h, targets):
        """Mean cross-entropy of the head's logits for hidden states h [B, T, d], fused."""
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(h, head.weight, targets)
        # A head wrapped by something with its own forward (an adapter): that forward decides.
        return cross_entropy(head(h).float(), targets)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters. exclude_embeddings drops the input lookup table, which does no
        matmul work, unless it is tied to lm_head (then it is the head and stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not (self.config.tie_embeddings and self.kind == "lm"):
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate behind MFU:
        6 per matmul weight, plus attention scores and values, 12 * n_layer * d_model * seq_len."""
        cfg = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * cfg.n_layer * cfg.d_model * seq_len


class ScalarModel(Transformer):
    """The backbone with its unembedding replaced by a linear map to one scalar per position.

    The reward model reads it at the answer's end token, the PPO value model at every token.
    Names follow HF's LlamaForSequenceClassification with num_labels=1 (`score.weight`).
    """
    kind = "scalar"

    def _make_head(self, cfg: ModelConfig) -> None:
        self.score = nn.Linear(cfg.d_model, 1, bias=False)

    def tie_weights(self) -> None:
        pass  # no unembedding to tie

    def forward(self, idx, *, attention_mask=None, position_ids=None, lengths=None, at=None):
        """Scalars [B, T] in fp32, one per position (0 at the pads with `lengths`); with `at`
        (bool [B, T]), [M] for those positions only, row-major."""
        if lengths is not None and (attention_mask is not None or position_ids is not None):
            raise ValueError("lengths takes no cache, attention_mask or position_ids")
        real, layout = layout_of(idx, lengths, at)
        h = self.hidden(idx, attention_mask=attention_mask, position_ids=position_ids, layout=layout, at=at)
        out = self.score(h).squeeze(-1).float()
        return out if at is not None else zero_pads(out, real, layout)

    @classmethod
    def from_lm(cls, lm: Transformer) -> "ScalarModel":
        """Start from a language model's backbone with a fresh head (InstructGPT's RM init).

        The head's std 1/sqrt(d_model + 1) keeps initial scores O(1) whatever the width.
        """
        cfg = lm.config
        model = cls(cfg).to(lm.model.embed_tokens.weight.device)
        model.model.load_state_dict(lm.model.state_dict())
        nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(cfg.d_model + 1))
        return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """In eval mode and out of autograd: a reference or reward model that is read, never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
