"""The language-model loss without the whole logits tensor: linear head + cross-entropy, fused.

    loss = linear_cross_entropy(h, lm_head.weight, targets)   # == F.cross_entropy(
                                                               #    F.linear(h, W).float(), targets)

Why: the plain loss materialises fp32 logits [B*T, vocab] and, in the backward pass, two more
tensors of that size (the loss's gradient, then log_softmax's). At batch 16 x 128 and vocab 4096
each is 32 MiB, allocated and freed every step: past glibc's mmap threshold every one comes back
as fresh pages (a fifth of a small model's step went to the kernel's page faults), and the
passes over them run from main memory, not cache. Here the
rows go through in chunks whose logits stay cache-sized, and since the loss is the last op of
the graph, each chunk's gradients with respect to h and to W are computed at once in the
forward pass (as Liger-Kernel does): the chunk's softmax minus the one-hot target is the
gradient of its logits, multiplied into grad_h [N, d] and accumulated into grad_W [V, d] before
the next chunk overwrites it. Nothing vocab-wide outlives its chunk; the backward pass only
scales the two stored gradients by the incoming gradient (1 / grad_accum). Rows whose target is
ignored (-100: an SFT prompt, padding) are left out before any logits are computed: they
contribute neither loss nor gradient.

Semantics are F.cross_entropy's with ignore_index -100: the mean over the targets that are not
ignored; NaN with zero gradients when every target is ignored (the trainers' non-finite guard
stops on it, as before). Logits are fp32 whatever the compute dtype: under autocast the
matmuls run in the autocast dtype (as lm_head would) and the softmax in fp32. Without grad
(evaluation) only the loss is computed, chunk by chunk.
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
# Rows per chunk: as many as fill CHUNK_BYTES of fp32 logits, but at least MIN_ROWS. A chunk's
# logits should stay in a core's L2; far smaller chunks lose to the grad_W update (a matmul of
# inner size `rows`, and a read-modify-write of all of grad_W per chunk). A large vocabulary gives
# few rows per byte budget, hence the floor. Chosen by measurement (docs/PERFORMANCE.md).
CHUNK_BYTES = 4 << 20
MIN_ROWS = 128


# Eager under torch.compile: the chunk loop's sizes depend on the data (the rows not ignored),
# which would break the graph inside anyway, with a warning; it gains nothing from fusing.
@torch.compiler.disable
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets (-100: no loss), computed
    chunk by chunk of rows. h: [..., d]; weight: [V, d]; targets: h's shape without d."""
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if t.numel() != h2.size(0):
        raise ValueError(f"targets {list(targets.shape)} do not match the hidden states {list(h.shape)}")
    rows = chunk_rows or max(MIN_ROWS, CHUNK_BYTES // (4 * weight.size(0)))
    grad = torch.is_grad_enabled()
    need = (grad and h.requires_grad, grad and weight.requires_grad)
    if not any(need):
        return _LinearCrossEntropy.compute(h2, weight, t, rows, need)[0]
    return _LinearCrossEntropy.apply(h2, weight, t, rows, need)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows, need):
        loss, grad_h, grad_w = _LinearCrossEntropy.compute(h, weight, targets, rows, need)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Out of place: a backward run twice (retain_graph) must not scale the stored ones twice.
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None

    @staticmethod
    @torch.no_grad()
    def compute(h, weight, targets, rows, need):
        """(loss, grad_h or None, grad_w or None) for the loss's own gradient of 1."""
        need_h, need_w = need
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n = keep.numel()
        if n == 0:  # F.cross_entropy's 0 / 0: NaN, and no gradient
            return (h.new_full((), float("nan"), dtype=torch.float32),
                    torch.zeros_like(h) if need_h else None, torch.zeros_like(weight) if need_w else None)
        every = n == targets.numel()
        rows_h = h if every else h.index_select(0, keep)
        rows_t = targets if every else targets.index_select(0, keep)
        if bool(((rows_t < 0) | (rows_t >= weight.size(0))).any()):  # would index another row's logits
            raise IndexError(f"a target is outside [0, {weight.size(0)}) and is not {IGNORE_INDEX}")
        dtype = _compute_dtype(h, weight)
        with torch.autocast(h.device.type, enabled=False):  # the dtypes below are the ones meant
            total, gh, gw = _chunks(rows_h.to(dtype), weight.to(dtype), rows_t, rows, 1.0 / n, need)
        if gh is not None:
            gh = gh.to(h.dtype) if every else h.new_zeros(h.shape).index_copy_(0, keep, gh.to(h.dtype))
        return total / n, gh, None if gw is None else gw.to(weight.dtype)


def _chunks(h, w, t, rows, scale, need):
    """Summed loss over the rows (all valid) and, as `need` asks, grad_h and grad_W (fp32),
    both already multiplied by `scale` = 1 / valid targets."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need[0] else None
    grad_w = torch.empty(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
    v = w.size(0)
    # Where each row's target sits in a chunk's flattened logits.
    offsets = torch.arange(min(rows, h.size(0)), device=h.device) * v
    for s in range(0, h.size(0), rows):
        total -= _chunk(h[s:s + rows], t[s:s + rows], w, offsets, scale, grad_h, grad_w, s, rows)
    return total, grad_h, grad_w


def _chunk(hc, tc, w, offsets, scale, grad_h, grad_w, s: int, rows: int) -> torch.Tensor:
    """One chunk: its summed log-prob of the targets, its rows of grad_h written, its share added
    to grad_w. A function of its own so that its vocab-wide tensors are freed when it returns,
    before the next chunk's are allocated."""
    at = offsets[:hc.size(0)] + tc
    logp = torch.log_softmax((hc @ w.T).float(), dim=-1)
    picked = logp.view(-1).take(at).sum()
    if grad_h is None and grad_w is None:
        return picked
    g = logp.exp_()                       # softmax ...
    g.view(-1).index_add_(0, at, torch.full_like(at, -1.0, dtype=g.dtype))   # ... minus one-hot
    g = g.mul_(scale).to(hc.dtype)
    if grad_h is not None:
        torch.mm(g, w, out=grad_h[s:s + rows])
    if grad_w is not None:
        if grad_w.dtype == g.dtype:   # beta 0: the first chunk ignores grad_w's garbage
            grad_w.addmm_(g.T, hc, beta=0.0 if s == 0 else 1.0)
        elif s == 0:                  # half-precision products, summed in fp32 across chunks
            grad_w.copy_(g.T @ hc)
        else:
            grad_w += g.T @ hc
    return picked


def _compute_dtype(h, weight) -> torch.dtype:
    """What lm_head's matmul would run in: the autocast dtype under autocast, else h's."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind) and h.is_floating_point():
        return torch.get_autocast_dtype(kind)
    if h.dtype != weight.dtype:
        raise TypeError(f"hidden states are {h.dtype} but the head's weight is {weight.dtype}")
    return h.dtype
