"""engine.fused_loss: the chunked head + cross-entropy equals F.cross_entropy of the full logits
(loss and every gradient), never holds the whole logits tensor, and trains the model as before."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engine.fused_loss import linear_cross_entropy
from engine.model import Transformer, config_from_preset
from engine.trainer import TrainConfig, make_optimizer

N, D, V = 300, 16, 97


def data(seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t


def reference(h, w, t, scale=1.0):
    loss = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)
    return (loss, *torch.autograd.grad(loss * scale, (h, w)))


# 300 rows: chunks of 1, of 7 and 64 (a last chunk that is not full), of exactly all, of more.
@pytest.mark.parametrize("rows", [1, 7, 64, N, 1000])
def test_loss_and_gradients_equal_the_full_cross_entropy(rows):
    h, w, t = data()
    loss = linear_cross_entropy(h, w, t, chunk_rows=rows)
    # The gradient that reaches the loss (here 3, as 1 / grad_accum would) scales both gradients.
    got = (loss, *torch.autograd.grad(loss * 3, (h, w)))
    for a, b in zip(got, reference(h, w, t, scale=3)):
        torch.testing.assert_close(a, b)


def test_ignored_rows_get_no_gradient_and_all_ignored_is_nan_as_in_torch():
    h, w, t = data(ignore_every=0)
    t[:150] = -100                   # a whole half of the batch (SFT prompts, padding)
    loss = linear_cross_entropy(h, w, t, chunk_rows=64)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh[:150].abs().max() == 0
    for a, b in zip((loss, gh, gw), reference(h, w, t)):
        torch.testing.assert_close(a, b)

    t[:] = -100                      # F.cross_entropy's 0 / 0: NaN, zero gradients
    loss = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = reference(h, w, t)
    assert loss.isnan() and ref[0].isnan()
    assert gh.abs().max() == gw.abs().max() == 0 == ref[1].abs().max() == ref[2].abs().max()


def test_without_grad_only_the_loss_and_a_frozen_head_gets_none():
    h, w, t = data()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=64)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(h, w, t)[0])
    w.requires_grad_(False)          # LoRA freezes lm_head: only h needs a gradient
    loss = linear_cross_entropy(h, w, t, chunk_rows=64)
    loss.backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), h)[0])


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_fp32():
    h, w, t = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=64)
        ref = reference(h, w, t)
    got = (loss, *torch.autograd.grad(loss, (h, w)))
    assert [g.dtype for g in got] == [torch.float32] * 3
    # Logits rounded to bf16 alike; grad_W's products are rounded per chunk instead of once.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_a_target_outside_the_vocabulary_is_an_error_as_in_torch():
    h, w, t = data()
    for bad in (V, -1):
        t[3] = bad
        with pytest.raises(IndexError, match="outside"):
            linear_cross_entropy(h, w, t)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_no_tensor_as_large_as_the_logits_is_ever_made():
    h, w, t = data()
    for fused, limit in ((True, 64 * V), (False, N * V)):
        with LargestTensor() as seen:
            loss = (linear_cross_entropy(h, w, t, chunk_rows=64) if fused
                    else F.cross_entropy(F.linear(h, w).float(), t))
            loss.backward()
        assert seen.numel == limit      # the unfused path shows the test can fail


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(config_from_preset("tiny", V, max_seq_len=32, **kw))


@pytest.mark.parametrize("tied", [False, True])
def test_the_models_fused_loss_has_the_gradients_of_the_plain_one(tied):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 20), generator=g)
    y = torch.randint(0, V, (3, 20), generator=g)
    y[0, :12] = -100                 # a prompt
    y[2] = -100                      # a row with nothing to learn
    model = tiny_model(tie_embeddings=tied)
    fused = model(x, y, loss_only=True)
    got = torch.autograd.grad(fused, list(model.parameters()))
    plain = model(x, y)[1]
    want = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="loss_only needs targets"):
        model(x, loss_only=True)


def test_training_follows_the_same_losses_as_the_plain_loss():
    g = torch.Generator().manual_seed(2)
    # Counting sequences (each token the previous one + 1): something to learn in a few steps.
    batches = [(torch.randint(0, V, (4, 1), generator=g) + torch.arange(33)) % V for _ in range(8)]
    runs = []
    for loss_only in (True, False):
        model = tiny_model()
        opt = make_optimizer(model, TrainConfig(lr=3e-3, warmup_steps=0), torch.device("cpu"))
        losses = []
        for b in batches:
            x, y = b[:, :-1], b[:, 1:]
            loss = model(x, y, loss_only=True) if loss_only else model(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0] - 0.05     # it learns
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
