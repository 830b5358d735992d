"""What a model's tensors take in memory: its parameters, what autograd keeps of a training
step, a KV cache and a forward's scratch, in bytes, from the model's config and the step's shape.
engine.memory_plan adds them up into a stage's phases.

The activation model counts what autograd saves for our Block (engine/model.py), tensor by
tensor (tests/test_memory_plan.py checks it against torch's saved-tensor hooks):
* each RMSNorm saves its input and the fp32 rsqrt of each row (engine.fused_ops: the
  backward recomputes the rest); each linear saves its input;
* attention goes through SDPA's fused kernels (flash / efficient on CUDA, the flash CPU kernel
  on CPU), which save q, k, v (k and v after repeat_kv, so n_head wide), the output and the
  fp32 logsumexp, never the T x T matrix; only the math fallback (e.g. a float mask on an old
  GPU) keeps it, and our training stages never pass a mask;
* SwiGLU saves gate and up (silu(gate) is recomputed), down_proj their product;
* the LM head, two ways (see fused_loss_bytes and _head_saved):
  - pretraining and SFT (shape causal-lm) take their loss from engine.fused_loss, which never
    holds the whole logits: it keeps the gradients of h [B*T, d] and, in full fine-tuning, of the
    head's weight [vocab, d] (fp32 while it sums them), computed chunk by chunk of rows in the
    forward pass. Its working set (a chunk's logits and log-softmax, and the one before it, the
    rows copied out when some targets are -100, the bf16 casts under autocast) lives only during
    its forward; its backward makes one scaled copy of each kept gradient;
  - PPO, GRPO and DPO ask for logits at the states their answer tokens are drawn from only
    (`model(ids, at=mask)` -> [M, vocab]): the head's input there, the fp32 log-softmax [M, vocab]
    and the gather index are kept, and the backward makes two more fp32 [M, vocab] copies (the
    gather's gradient, then log_softmax's). M is batch x max_new_tokens for PPO and GRPO; for DPO
    the plan does not know the answers' share of seq_len and takes every position.
  A small model with a large vocabulary is dominated by these.
Under CUDA autocast every linear casts its input to bf16 (one copy per projection) and every
weight once (kept for the backward); the fused loss casts h and the head's weight itself, for its
forward only, and keeps its softmax in fp32. Off CUDA the trainer runs fp32 whatever `dtype` says
(engine.device.autocast), and so does the plan.
"""
from __future__ import annotations

from typing import Optional

from engine.decode import FUSE_UP_TO_PARAMS
from engine.fused_loss import CHUNK_BYTES, MIN_ROWS

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGETS = LINEARS


def _linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    d, att, kv = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {"q_proj": (d, att), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (att, d),
            "gate_proj": (d, cfg.d_ff), "up_proj": (d, cfg.d_ff), "down_proj": (cfg.d_ff, d)}


def param_count(cfg, kind: str = "lm") -> int:
    """Unique parameters of Transformer (kind "lm") or ScalarModel ("scalar") of this config."""
    shapes = _linear_shapes(cfg)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * cfg.d_model
    if cfg.qkv_bias:
        per_layer += shapes["q_proj"][1] + 2 * shapes["k_proj"][1]
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    embed = cfg.vocab_size * cfg.d_model
    head = cfg.d_model if kind == "scalar" else (0 if cfg.tie_embeddings else embed)
    return cfg.n_layer * per_layer + embed + cfg.d_model + head


def adapter_count(cfg, rank: int, targets) -> int:
    """LoRA parameters: A [r, in] and B [out, r] for every targeted linear of every layer."""
    shapes = _linear_shapes(cfg)
    return cfg.n_layer * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def largest_param(cfg, kind: str, rank: int, targets) -> int:
    if rank:
        shapes = _linear_shapes(cfg)
        return max([rank * max(shapes[t]) for t in targets] + [cfg.d_model])
    return max(cfg.vocab_size * cfg.d_model, max(i * o for i, o in _linear_shapes(cfg).values()))


# --- activations: what autograd keeps, per token -------------------------------------------

def _layer_saved(cfg, e: int, autocast: bool, targets, first: bool, part: str = "all") -> int:
    """Bytes one Block saves per token. `targets` None: full fine-tuning; else the LoRA targets
    (frozen base weights save no input; a frozen norm gain does not need the normalised x).
    part "attention": up to SDPA's output; "mlp": post_attention_layernorm and the MLP (what a
    last layer that `at` prunes saves per kept position); "all": the whole layer."""
    f, d, dff = 4, cfg.d_model, cfg.d_ff
    att, kvw = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    full = targets is None
    hit = (lambda *names: [n for n in names if full or n in targets])
    # Under LoRA the embedding is frozen, so layer 0's input carries no gradient.
    grad_in = full or not first
    grad_attn = grad_in or bool(hit("q_proj", "k_proj", "v_proj"))
    grad_mid = grad_attn or bool(hit("o_proj"))
    grad_mlp = grad_mid or bool(hit("gate_proj", "up_proj"))
    b = 0
    b += (f * d + f) * grad_in                                   # input_layernorm: x, rsqrt
    qkv = hit("q_proj", "k_proj", "v_proj")
    b += (e * d * len(qkv)) if autocast else (f * d if qkv else 0)   # their (cast) input
    if cfg.qk_norm and grad_attn:   # per-head norms: their input (the projections' dtype), rsqrt
        b += e * (att + kvw) + f * (cfg.n_head + cfg.n_kv_head)
    # SDPA: q, k, v, out, logsumexp. With one kv head repeat_kv is a stride-0 view, so k and v
    # stay one head wide, unless autocast's cast of fp32 k (after RoPE) copies it out.
    kv_saved = 2 * att if cfg.n_kv_head > 1 else (att + kvw if autocast else 2 * kvw)
    b += (e * (2 * att + kv_saved) + f * cfg.n_head) * grad_attn
    o_alone = e * att * (not grad_attn and bool(hit("o_proj")))    # else o_proj's input is SDPA's out
    m = (f * d + f) * grad_mid                                     # post_attention_layernorm
    gate_up = hit("gate_proj", "up_proj")
    m += (e * d * len(gate_up)) if autocast else (f * d if gate_up else 0)
    m += 2 * e * dff * grad_mlp + e * dff * bool(hit("down_proj"))   # gate, up; product
    return {"attention": b, "mlp": m, "all": b + o_alone + m}[part]


def _pruned_last_layer(cfg, e: int, autocast: bool, targets, rank: int, n: int, m: int) -> int:
    """The last Block when `at` keeps m of its n positions (engine.model): attention over all n,
    then o_proj on its own copy of SDPA's output at the m, post norm and MLP over the m, and the
    bool mask [n] its two index ops keep."""
    full = targets is None
    pre = [t for t in ("q_proj", "k_proj", "v_proj") if not full and t in targets]
    post = [t for t in ("o_proj", "gate_proj", "up_proj", "down_proj") if not full and t in targets]
    first = cfg.n_layer == 1
    o_in = e * cfg.n_head * cfg.head_dim * (full or "o_proj" in targets)
    return (n * (_layer_saved(cfg, e, autocast, targets, first, "attention") + _lora_saved(cfg, e, rank, pre))
            + m * (o_in + _layer_saved(cfg, e, autocast, targets, first, "mlp") + _lora_saved(cfg, e, rank, post))
            + n)


def _lora_saved(cfg, e: int, rank: int, targets) -> int:
    """Per token and layer: each adapter's B saves A's output [N, r]."""
    return e * rank * len(targets) if rank else 0


def fused_loss_bytes(n: int, d: int, vocab: int, *, n_valid: Optional[int] = None, compute_bytes: int = 4,
                     hidden_bytes: int = 4, weight_bytes: int = 4, head_trained: bool = True,
                     rows: Optional[int] = None) -> tuple[int, int]:
    """(kept, peak) of engine.fused_loss.linear_cross_entropy over n rows of width d: `kept` is
    what it saves for the backward (grad_h [n, d] in h's dtype; grad_W [vocab, d] in the weight's,
    if the head trains), `peak` the most it holds at once during its forward, `kept` included.

    Follows the code allocation by allocation (tests/test_memory_plan.py holds it to torch's
    allocation events): the indices of the valid rows; when some targets are ignored, a copy of
    the valid rows of h and of their targets; where the compute dtype differs from h's or the
    weight's (autocast), a cast of each; grad_h of the valid rows in the compute dtype and grad_W
    in fp32, filled chunk by chunk. A chunk holds its fp32 logits and their log-softmax (and that
    log-softmax's cast to the compute dtype, which its matmuls read), all freed before the next
    chunk's are computed. At the end grad_h is cast and spread
    back to all n rows, then grad_W cast to the weight's dtype, before the copies are let go.

    n_valid: rows whose target is not -100. None is the worst case for n rows: all of them valid,
    yet copied out as when some are not. The plan has no figure for an SFT batch's share of prompt
    tokens, and fewer valid rows would only shrink the chunks' share and the copies.

    Kernels' own scratch is not counted: CPU bf16 matmuls (oneDNN) allocate some, and a CPU
    in-place add of bf16 into fp32 casts its operand first; CUDA's kernels do neither, and a CPU
    run is fp32 unless its weights are half."""
    c, hb, wb, v = compute_bytes, hidden_bytes, weight_bytes, vocab
    nv = n if n_valid is None else n_valid
    kept = hb * n * d + wb * v * d * head_trained
    if nv == 0:                                    # zeros for both gradients, a NaN loss
        return kept, kept + 4
    every = n_valid == n
    r = min(rows or max(MIN_ROWS, CHUNK_BYTES // (4 * v)), nv)
    grad_w = 4 * v * d * head_trained
    soft = 4 * r * v + c * r * v * (c != 4)       # a chunk's softmax gradient and its cast
    base = 8 * nv + (hb * nv * d + 8 * nv) * (not every)   # valid rows' indices; their rows of h, targets
    casts = c * nv * d * (c != hb) + c * v * d * (c != wb)
    work = 4 + c * nv * d + grad_w + 8 * r        # summed loss, grad_h, grad_W, each row's target offset
    # A chunk: its target index, logits and log-softmax; the one before it is freed by then.
    chunk = 8 * r + 8 * r * v
    if c != 4 and head_trained:   # grad_W's product in the compute dtype, added in fp32 (+ the chunk's loss)
        chunk = max(chunk, soft + 8 * r + c * v * d + 4)
    during = base + casts + work + chunk
    if every:       # grad_h cast to h's dtype beside the compute-dtype one
        spread = hb * n * d * (c != hb)
    else:           # all n rows of grad_h, and the cast of the valid ones copied into it
        spread = hb * n * d + hb * nv * d * (c != hb)
    end = base + 4 + grad_w + c * nv * d + spread
    cast_w = base + 8 + grad_w + hb * n * d + wb * v * d * head_trained * (wb != 4)
    return kept, max(during, end, cast_w)


def _head_saved(cfg, batch: int, seq: int, e: int, autocast: bool, kind: str, full: bool,
                logits_at: Optional[int], w: int) -> int:
    """Bytes the final norm, the head and the loss keep for the backward. kind "scalar": the score
    head; "lm" with logits_at None: the fused loss (pretraining, SFT); with logits_at A: logits at
    A positions of each sequence (`model(ids, at=mask)`: PPO, GRPO, DPO)."""
    f, d = 4, cfg.d_model
    n = batch * (seq if logits_at is None else logits_at)    # `at`: the kept positions alone
    b = n * (f * d + f)                           # the final norm: its input, rsqrt
    h_in = e * d if autocast else f * d           # a linear's (cast) input
    if kind == "scalar":                          # the score head is always trained
        return b + n * h_in
    if logits_at is None:
        return b + fused_loss_bytes(n, d, cfg.vocab_size, compute_bytes=e, hidden_bytes=w, weight_bytes=w,
                                    head_trained=full)[0]
    # lm_head its input (only if it trains), log_softmax its fp32 output, gather the int64 index
    # of each scored token.
    return b + n * (h_in * full + f * cfg.vocab_size + 8)


def saved_activation_bytes(cfg, batch: int, seq: int, *, compute_bytes: int = 4, autocast: bool = False,
                           kind: str = "lm", lora_rank: int = 0, lora_targets=DEFAULT_LORA_TARGETS,
                           checkpointing: bool = False, logits_at: Optional[int] = None,
                           weight_bytes: int = 4) -> int:
    """What autograd holds at the end of a training forward of `batch` x `seq` tokens and its loss.
    For kind "lm", logits_at None is the fused loss of pretraining and SFT (`model(x, y,
    loss_only=True)`), an int the logits at that many positions of each sequence (`at=`); for
    "scalar", the scores at that many (PPO's value model) or at all positions.

    Padded rows, as planned: a forward given the rows' `lengths` (engine.ragged) saves its
    layers' per-token tensors for the real tokens only, plus attention's padded q/k/v/out over
    the longest row and a copy of SDPA's output at the real tokens for o_proj."""
    n, e = batch * seq, compute_bytes
    targets = tuple(lora_targets) if lora_rank else None
    full = targets is None
    head = _head_saved(cfg, batch, seq, e, autocast, kind, full, logits_at, weight_bytes)
    # Shared by every layer: the embedding's int64 indices (if trained), RoPE's cos and sin.
    shared = 8 * n * full + 2 * 4 * seq * cfg.head_dim
    if checkpointing:
        return cfg.n_layer * 4 * n * cfg.d_model + shared + head     # each block's fp32 input
    pruned = logits_at is not None
    layers = sum(_layer_saved(cfg, e, autocast, targets, i == 0) for i in range(cfg.n_layer - pruned))
    layers += (cfg.n_layer - pruned) * _lora_saved(cfg, e, lora_rank, targets or ())
    last = _pruned_last_layer(cfg, e, autocast, targets, lora_rank, n, batch * logits_at) if pruned else 0
    return n * layers + last + shared + head


def train_activations(cfg, batch, seq, e, autocast, kind, rank, targets, ckpt, logits_at=None, w=4) -> dict:
    """Peak activation bytes of one forward+backward, and its terms."""
    n, d, v = batch * seq, cfg.d_model, cfg.vocab_size
    saved = saved_activation_bytes(cfg, batch, seq, compute_bytes=e, autocast=autocast, kind=kind,
                                   lora_rank=rank, lora_targets=targets, checkpointing=ckpt,
                                   logits_at=logits_at, weight_bytes=w)
    # `head`: the most the head and its loss add to `saved` at their worst moment; `head_kept`:
    # what of `saved` they let go before the layers' backward starts.
    head = head_kept = 0
    if kind == "lm" and logits_at is None:
        # The fused loss: its forward's working set beyond what it keeps, or its backward's scaled
        # copy of grad_h (grad_W's copy is the head's gradient, counted with the gradients).
        head_kept, peak = fused_loss_bytes(n, d, v, compute_bytes=e, hidden_bytes=w, weight_bytes=w,
                                           head_trained=not rank)
        head = max(peak - head_kept, w * n * d)
    elif kind == "lm":
        # Logits at the answer states: their log-softmax's backward makes two fp32 copies of it
        # (the gather's gradient, then its own), as many as the forward's logits and tempered
        # logits beside it.
        m = batch * logits_at
        head, head_kept = 2 * 4 * m * v, 4 * m * v
    # A layer's backward: gradients of its input, of the MLP's three d_ff-wide tensors, its q/k/v.
    layer_grads = e * n * (2 * cfg.d_model + 3 * cfg.d_ff)
    recompute = 0
    if ckpt:   # the block being recomputed holds its full saved set again during its backward
        full_targets = tuple(targets) if rank else None
        recompute = n * (_layer_saved(cfg, e, autocast, full_targets, False)
                         + _lora_saved(cfg, e, rank, full_targets or ()))
    autocast_weights = 2 * cfg.n_layer * sum(i * o for i, o in _linear_shapes(cfg).values()) if autocast else 0
    if autocast and kind == "lm" and logits_at is not None:
        autocast_weights += 2 * v * d     # lm_head's bf16 weight (the fused loss's cast is in its peak)
    peak = saved + max(head, layer_grads + recompute - head_kept) + autocast_weights
    return {"saved": saved, "head": head, "head_kept": head_kept, "layer_grads": layer_grads,
            "recompute": recompute, "autocast_weights": autocast_weights, "peak": peak}


def kv_cache_bytes(cfg, batch: int, length: int, elt: int) -> int:
    return cfg.n_layer * 2 * batch * cfg.n_kv_head * length * cfg.head_dim * elt


def forward_scratch(cfg, tokens: int, elt: int) -> int:
    """A no-grad forward's intermediates: one layer's at a time (the residual, its normed copy,
    and the MLP's three d_ff-wide tensors at their widest)."""
    return elt * tokens * (2 * cfg.d_model + 3 * cfg.d_ff)


def prefill_bytes(cfg, batch: int, prompt: int, elt: int) -> int:
    """The prompt's forward in generation: one layer's intermediates, the padding mask (bool,
    and SDPA's float copy), and the fp32 logits of each row's last position (the only ones
    engine.generate asks the head for)."""
    n = batch * prompt
    return 4 * batch * cfg.vocab_size + forward_scratch(cfg, n, elt) + 5 * n * prompt


def decode_step_bytes(cfg, length: int, elt: int) -> int:
    """What engine.decode's step holds through a generate call: rope tables (cos and sin for each
    of q's, k's and v's heads at every position) and, for a model small enough that it fuses
    them, q/k/v's weights (and biases) and gate/up's concatenated."""
    heads = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    tables = 2 * length * heads * elt
    if param_count(cfg) > FUSE_UP_TO_PARAMS:
        return tables
    per_layer = cfg.d_model * (heads + 2 * cfg.d_ff) + (heads if cfg.qkv_bias else 0)
    return tables + cfg.n_layer * per_layer * elt


def generation_workspace(cfg, batch: int, prompt: int, length: int, elt: int) -> int:
    """What generation holds beside its weights and KV cache at its worst moment: the prompts'
    forward, or the decoding step's tables and fused weights with a copy of at most half the
    cache, which engine.generate makes when rows share a prompt (its prefill's cache spread over
    the rows) and when half the rows have finished (the rest's rows moved to a smaller cache)."""
    return max(prefill_bytes(cfg, batch, prompt, elt),
               decode_step_bytes(cfg, length, elt) + kv_cache_bytes(cfg, batch, length, elt) // 2)
