"""engine.fused_ops: RMSNorm, RoPE and SwiGLU as single autograd nodes give the plain formulas'
outputs to the bit and their gradients, keep fewer tensors for the backward pass, and train a
model exactly as the plain formulas do."""
import pytest
import torch
import torch.nn.functional as F

import engine.model as model_mod
from engine import fused_ops
from engine.fused_ops import rms_norm, rope, swiglu
from engine.model import Transformer, config_from_preset, rope_cos_sin
from engine.trainer import TrainConfig, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


# The plain formulas, as engine.model wrote them before (and as transformers writes them).
def plain_rms_norm(x, weight, eps):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def plain_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def plain_swiglu(gate, up):
    return F.silu(gate) * up


def leaf(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_()


def grads(fn, inputs, seed=99):
    """fn(*inputs) and the gradients of a random projection of it for every input that wants one."""
    out = fn(*inputs)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    want = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, want, dy)


def angles(B, T, hd, dtype=torch.float32, per_row=False):
    pos = torch.arange(T)[None] + (torch.arange(B)[:, None] * 3 if per_row else 0)
    cos, sin = rope_cos_sin(pos, hd, 10000.0, dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)        # broadcast over heads, as apply_rope does


# --- RMSNorm -----------------------------------------------------------------------------------

# Odd widths and row counts; a transposed view, as Qwen3's q/k norms see [B, H, T, hd].
@pytest.mark.parametrize("shape,transposed", [((7, 13), False), ((2, 5, 33), False), ((2, 5, 3, 6), True)])
def test_rms_norm_is_the_plain_formula_to_the_bit_and_has_its_gradients(shape, transposed):
    x = leaf(shape, 0, scale=3.0)
    w = leaf(shape[-1], 1)
    xin = x.transpose(1, 2) if transposed else x
    y, (gx, gw) = grads(lambda a, b: rms_norm(a, b, 1e-5), (xin, w))
    y_ref, (gx_ref, gw_ref) = grads(lambda a, b: plain_rms_norm(a, b, 1e-5), (xin, w))
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    # Against float64 arithmetic (the plain formula's fp32 cast taken out): the fused gradients
    # are as exact as autograd's own.
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _, (gx64, gw64) = grads(lambda a, b: b * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)),
                            (x64.transpose(1, 2) if transposed else x64, w64))
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-5, atol=1e-5)


def test_rms_norm_with_a_frozen_weight_or_input_and_without_grad():
    x, w = leaf((4, 9), 0), leaf(9, 1)
    w.requires_grad_(False)                       # LoRA freezes the norms
    (gx,) = grads(lambda a, b: rms_norm(a, b, 1e-6), (x, w))[1]
    (gx_ref,) = grads(lambda a, b: plain_rms_norm(a, b, 1e-6), (x, w))[1]
    torch.testing.assert_close(gx, gx_ref)
    x2, w2 = x.detach(), w.detach().requires_grad_()
    (gw,) = grads(lambda a, b: rms_norm(a, b, 1e-6), (x2, w2))[1]
    (gw_ref,) = grads(lambda a, b: plain_rms_norm(a, b, 1e-6), (x2, w2))[1]
    torch.testing.assert_close(gw, gw_ref)
    with torch.no_grad():
        y = rms_norm(x, w2, 1e-6)
    assert y.grad_fn is None and torch.equal(y, plain_rms_norm(x, w2, 1e-6))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_rms_norm_in_half_precision_keeps_the_plain_dtypes_and_values(x_dtype, w_dtype):
    # bf16 activations with fp32 weights is what autocast gives; all-bf16 a model cast to bf16.
    x, w = leaf((6, 40), 0, x_dtype, scale=4.0), leaf(40, 1, w_dtype)
    y, (gx, gw) = grads(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    y_ref, (gx_ref, gw_ref) = grads(lambda a, b: plain_rms_norm(a, b, 1e-5), (x, w))
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert (gx.dtype, gw.dtype) == (x_dtype, w_dtype)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=2e-2)


# --- RoPE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,T,hd,per_row", [(2, 3, 5, 6, False), (3, 1, 7, 10, True), (2, 4, 33, 64, False)])
def test_rope_is_the_plain_formula_to_the_bit_and_has_its_gradients(B, H, T, hd, per_row):
    x = leaf((B, T, H, hd), 0).transpose(1, 2)     # q as the projection's view gives it
    cos, sin = angles(B, T, hd, per_row=per_row)
    y, (gx,) = grads(rope, (x, cos, sin))
    y_ref, (gx_ref,) = grads(plain_rope, (x, cos, sin))
    assert "Rope" in type(y.grad_fn).__name__
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)                 # the same products and sums, in fp32 too
    with torch.no_grad():                          # both no-grad paths, few and many elements
        assert torch.equal(rope(x, cos, sin), y_ref)
        assert torch.equal(fused_ops._rope(x, cos, sin), y_ref)


def test_rope_on_halves_is_the_plain_formula_to_the_bit_and_a_zero_turn_keeps_values():
    # The decoding step's rope: x viewed [..., 2, hd/2], angles from rope_halves_tables.
    x = leaf((2, 3, 5, 8), 0).detach()
    cos, sin = leaf((1, 1, 5, 8), 1).detach(), leaf((1, 1, 5, 8), 2).detach()
    c, s = fused_ops.rope_halves_tables(cos, sin)
    got = fused_ops.rope_halves(x.unflatten(-1, (2, 4)), c, s).flatten(-2)
    assert torch.equal(got, plain_rope(x, cos, sin))
    c0, s0 = fused_ops.rope_halves_tables(torch.ones(8), torch.zeros(8))   # how values pass through it
    assert torch.equal(fused_ops.rope_halves(x.unflatten(-1, (2, 4)), c0, s0).flatten(-2), x)


def test_rope_takes_any_cos_and_sin_not_only_halves_that_repeat():
    # The model's angles repeat across the two halves; the formula holds for any values.
    x = leaf((2, 3, 5, 8), 0)
    cos, sin = leaf((1, 1, 5, 8), 1).detach(), leaf((1, 1, 5, 8), 2).detach()
    y, (gx,) = grads(rope, (x, cos, sin))
    y_ref, (gx_ref,) = grads(plain_rope, (x, cos, sin))
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_rope_gradcheck_in_float64_and_angles_that_broadcast_or_want_gradients():
    x = leaf((2, 3, 4, 6), 0, torch.float64)
    cos, sin = angles(2, 4, 6, torch.float64, per_row=True)
    assert torch.autograd.gradcheck(rope, (x, cos, sin))
    # One sequence against per-row angles: x's gradient sums over the rows it broadcast to.
    x1 = leaf((1, 3, 4, 6), 1)
    c32, s32 = cos.float(), sin.float()
    (g,) = grads(rope, (x1, c32, s32))[1]
    (g_ref,) = grads(plain_rope, (x1, c32, s32))[1]
    assert g.shape == x1.shape
    torch.testing.assert_close(g, g_ref)
    # Angles that want a gradient take the plain formula, which knows how to give it.
    c, s = c32.clone().requires_grad_(), s32.clone().requires_grad_()
    _, got = grads(rope, (x1, c, s))
    _, want = grads(plain_rope, (x1, c, s))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_rope_under_autocast_dtypes_gives_what_the_plain_product_gives():
    # Autocast: q comes out of its projection in bf16, cos/sin are fp32, the product is fp32.
    x = leaf((2, 5, 3, 8), 0, torch.bfloat16).transpose(1, 2)
    cos, sin = angles(2, 5, 8)
    y, (gx,) = grads(rope, (x, cos, sin))
    y_ref, (gx_ref,) = grads(plain_rope, (x, cos, sin))
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, gx_ref, rtol=1e-2, atol=1e-2)


# --- SwiGLU --------------------------------------------------------------------------------------

def test_swiglu_is_the_plain_formula_to_the_bit_and_has_its_gradients():
    gate, up = leaf((3, 5, 11), 0, scale=3.0), leaf((3, 5, 11), 1)
    y, g = grads(swiglu, (gate, up))
    y_ref, g_ref = grads(plain_swiglu, (gate, up))
    assert "SwiGLU" in type(y.grad_fn).__name__
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(swiglu, (leaf((4, 7), 2, torch.float64), leaf((4, 7), 3, torch.float64)))
    up.requires_grad_(False)                       # only one side trains
    (g_gate,) = grads(swiglu, (gate, up))[1]
    assert torch.equal(g_gate, g_ref[0])
    with torch.no_grad():
        assert torch.equal(swiglu(gate, up), y_ref)


# --- What the backward pass keeps ----------------------------------------------------------------

def saved_elements(fn, *inputs) -> int:
    """Elements of the tensors the graph of fn(*inputs) keeps for its backward pass, each
    storage counted once (the inputs themselves included, as autograd keeps them alive)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_the_fused_ops_keep_less_for_the_backward_pass():
    x, w = leaf((64, 32), 0), leaf(32, 1)
    # RMSNorm: x and a scale per row, not also x * r and its fp32 copy.
    assert saved_elements(lambda: rms_norm(x, w, 1e-5)) == 64 * 32 + 32 + 64
    assert saved_elements(lambda: plain_rms_norm(x, w, 1e-5)) > 2 * 64 * 32
    q = leaf((2, 8, 4, 16), 2).transpose(1, 2)
    cos, sin = angles(2, 8, 16)
    # RoPE: only cos and sin, which every layer shares.
    assert saved_elements(lambda: rope(q, cos, sin)) == cos.numel() + sin.numel()
    gate, up = leaf((64, 48), 3), leaf((64, 48), 4)
    # SwiGLU: gate and up, not silu(gate) too.
    assert saved_elements(lambda: swiglu(gate, up)) == 2 * 64 * 48
    assert saved_elements(lambda: plain_swiglu(gate, up)) == 3 * 64 * 48


# --- In the model --------------------------------------------------------------------------------

@pytest.fixture
def plain_ops(monkeypatch):
    """engine.model with the plain formulas in place of the fused ops."""
    def use():
        monkeypatch.setattr(model_mod, "rms_norm", plain_rms_norm)
        monkeypatch.setattr(model_mod, "rope", plain_rope)
        monkeypatch.setattr(model_mod, "swiglu", plain_swiglu)
    return use


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(config_from_preset("tiny", 97, max_seq_len=40, **kw))


def run_training(steps=6, **kw):
    model = tiny(**kw)
    opt = make_optimizer(model, TrainConfig(lr=3e-3, warmup_steps=0), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        # Counting sequences (each token the previous one + 1): something to learn in a few steps.
        b = (torch.randint(0, 97, (4, 1), generator=g) + torch.arange(34)) % 97
        loss = model(b[:, :-1], b[:, 1:], loss_only=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def graph_names(model, x):
    """The autograd node types of one forward pass."""
    seen, todo = set(), [model(x, x, loss_only=True).grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "n_kv_head": 2}])
def test_a_model_trains_along_the_same_losses_with_and_without_the_fused_ops(kw, plain_ops):
    fused, fused_model = run_training(**kw)
    x = torch.randint(0, 97, (2, 8))
    assert {"_RMSNormBackward", "_RopeBackward", "_SwiGLUBackward"} <= graph_names(fused_model, x)
    plain_ops()
    plain, plain_model = run_training(**kw)
    assert not {"_RMSNormBackward", "_RopeBackward", "_SwiGLUBackward"} & graph_names(plain_model, x)
    assert fused[-1] < fused[0] - 0.05             # it learns
    assert fused == pytest.approx(plain, abs=1e-5)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_the_model_under_bf16_autocast_matches_the_plain_ops(plain_ops):
    x = torch.randint(0, 97, (2, 12))
    y = torch.randint(0, 97, (2, 12))
    results = []
    for use_plain in (False, True):
        if use_plain:
            plain_ops()
        model = tiny(qk_norm=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(x, y)
        loss.backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)                     # the same ops in the same dtypes
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
