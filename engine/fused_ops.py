"""RMSNorm, rotary embeddings and SwiGLU, each one autograd node with a hand-written backward.

    rms_norm(x, weight, eps)   == weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
    rope(x, cos, sin)          == x * cos + rotate_half(x) * sin      (rotate_half: cat(-x2, x1))
    swiglu(gate, up)           == silu(gate) * up

Why: written as plain tensor expressions, autograd records every element-wise op as a node of
its own, and each node allocates an activation-sized tensor, keeps inputs for its backward and
makes one more pass over memory. RMSNorm's six ops keep x, its rsqrt and x̂ for the backward
pass, which then runs the chain of mul, mean and rsqrt backwards op by op; RoPE copies both
halves of q and k into a new tensor (cat) only to multiply them, and its backward copies them
back out; SwiGLU keeps silu(gate) beside gate and up. On a CPU these passes, not the arithmetic,
set the time, and in a small model they are a large share of a training step. Here each layer
is a torch.autograd.Function: the forward pass keeps only what its backward needs (RMSNorm: x
and one scale per row; RoPE: cos and sin, shared by every layer; SwiGLU: gate and up; what
engine.memory_tensors counts) and the backward pass computes the gradients directly, in place
where it can.

The forward result is bit-for-bit the plain formula's: the same operations on the same values in
the same dtypes (tests/test_hf_model.py holds our logits equal to transformers' to the last bit).
Gradients are equal up to floating-point rounding (in fp32, RoPE's and SwiGLU's are identical).
The dtypes follow the plain formula's: RMSNorm normalises in fp32 and casts back before the
weight; under autocast an fp32 cos times a bf16 q gives fp32, as the plain product would.
Without grad (generation, evaluation, a frozen reference) the same forward arithmetic runs
without an autograd node. torch.compile traces autograd.Functions like any other code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function


# --- RMSNorm -----------------------------------------------------------------------------------

def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dimension, as Hugging Face's LlamaRMSNorm computes it."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm(x, weight, eps)[0]


def _rms_norm(x, weight, eps: float):
    """(output, r): r = 1 / rms per row, fp32, [..., 1]. (Typed: engine.decode's scripted step
    calls it.)"""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf * r).to(x.dtype)                # a new tensor: scaled in place when dtypes allow
    return (xhat.mul_(weight) if xhat.dtype == weight.dtype else weight * xhat), r


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        # y = w * x r with r = mean(x²)^-1/2 per row, so with g = dy * w:
        #   dw = Σ_rows dy * x r        dx = r g - x r³ mean(g x)
        # and mean(g x) = (dy * x) @ w / D: one product q = dy * x gives both through matvecs.
        x, weight, r = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):     # the matvecs stay fp32
            xf, wf, dyf = x.float(), weight.float(), dy.float()
            q = (dyf * xf).reshape(-1, x.size(-1))
            dw = (r.reshape(-1) @ q).to(weight.dtype) if ctx.needs_input_grad[1] else None
            dx = None
            if ctx.needs_input_grad[0]:
                k = (q @ wf).view(r.shape).mul_(r.pow(3)).div_(-x.size(-1))
                dx = (dyf * wf).mul_(r).addcmul_(xf, k).to(x.dtype)
        return dx, dw, None


# --- Rotary embeddings ---------------------------------------------------------------------------

def rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin for x [..., hd] and cos, sin broadcastable to it."""
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        if not (cos.requires_grad or sin.requires_grad):
            return _Rope.apply(x, cos, sin)
    elif x.numel() > _FEW:
        return _rope(x, cos, sin)
    return _plain_rope(x, cos, sin)


# A decoding step's q and k have a few thousand elements: there each op's dispatch, not its
# pass over memory, is the cost, and the plain formula has fewer ops.
_FEW = 8192


def _plain_rope(x, cos, sin):
    """The reference formula; also what angles that want gradients get (no model trains them)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_halves_tables(cos, sin):
    """cos and sin [..., hd] as rope_halves takes them: [..., 2, hd / 2], sin's halves swapped
    and its first negated ([s2, -s1]; a decoding loop makes these once)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return cos.unflatten(-1, (2, -1)), torch.stack((s2, -s1), dim=-2)


def rope_halves(x, cos, sin):
    """The rope forward in the fewest ops, for a small x (a decoding step's q and k) viewed as
    [..., 2, hd / 2], without autograd; cos, sin from rope_halves_tables. x * [s2, -s1] is
    [x1 * s2, -x2 * s1]; its halves swapped (flip) are rotate_half(x) * sin, added to x * cos in
    one pass. (-a) * b == -(a * b) and p + (-q) == p - q exactly: the plain sum to the bit."""
    return (x * cos).add_((x * sin).flip(-2))


def _rope(x, cos, sin):
    # rotate_half(x) * sin is [-x2 * s1, x1 * s2]: x times sin with its halves swapped (a small
    # tensor, shared by all heads) gives both products; then each half is added where it belongs.
    # (-a) * b == -(a * b) and p + (-q) == p - q exactly, so this is the plain sum to the bit.
    s1, s2 = sin.chunk(2, dim=-1)
    y = x * cos
    t = x * torch.cat((s2, s1), dim=-1)
    y1, y2 = y.chunk(2, dim=-1)
    t1, t2 = t.chunk(2, dim=-1)
    y1.sub_(t2)                      # x1 * c1 - x2 * s1
    y2.add_(t1)                      # x2 * c2 + x1 * s2
    return y


class _Rope(Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_meta = x.dtype, x.shape
        return _rope(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        # The transpose of the rotation: dx = dy * cos + [(dy * sin)2, -(dy * sin)1]
        cos, sin = ctx.saved_tensors
        dx = dy * cos
        d1, d2 = dx.chunk(2, dim=-1)
        t1, t2 = (dy * sin).chunk(2, dim=-1)
        d1.add_(t2)
        d2.sub_(t1)
        dtype, shape = ctx.x_meta
        if dx.shape != shape:           # cos and sin had batch dimensions that x broadcast over
            dx = dx.sum_to_size(shape)
        return dx.to(dtype), None, None


# --- SwiGLU ----------------------------------------------------------------------------------

def swiglu(gate, up):
    """silu(gate) * up, the gated half of a SwiGLU MLP."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return _silu_times(gate, up)


def _silu_times(gate, b):
    s = F.silu(gate)                           # a new tensor: multiplied in place when it can be
    return s.mul_(b) if s.dtype == b.dtype and s.shape == b.shape else s * b


class _SwiGLU(Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)     # silu(gate) is recomputed: one tensor less kept
        return _silu_times(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = (dy * up).to(gate.dtype)   # dL/dsilu(gate); silu's backward in its memory
            d_gate = torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        if ctx.needs_input_grad[1]:
            d_up = _silu_times(gate, dy)
        return d_gate, d_up
