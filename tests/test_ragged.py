"""engine.ragged: right-padded rows run as their real tokens alone (the models' `lengths`), and
`at` running the last layer's projection and MLP only where an output is read."""
import math

import pytest
import torch

from engine.lora import LoRASettings, add_adapters
from engine.model import ScalarModel, Transformer, config_from_preset
from engine.ragged import MIN_PAD_SHARE, layout_of, scores_at_ends

V = 97
LENGTHS = torch.tensor([13, 3, 9, 1, 11])
T = 13


def scrambled(seed=0, **kw) -> Transformer:
    """Random weights, norms included, so a wrong position, row or pad shows in the logits."""
    torch.manual_seed(seed)
    model = Transformer(config_from_preset("tiny", V, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith("norm.weight") else 1 / math.sqrt(p.shape[-1])
            p.copy_((1 if name.endswith("norm.weight") else 0) + scale * torch.randn(p.shape, generator=g))
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(LENGTHS), T), generator=g)
    real = torch.arange(T)[None] < LENGTHS[:, None]
    return ids, real


SHAPES = [dict(), dict(n_kv_head=2), dict(qk_norm=True, qkv_bias=True)]


@pytest.mark.parametrize("kw", SHAPES, ids=["mha", "gqa", "qknorm-bias"])
def test_real_tokens_alone_give_the_padded_forwards_logits(kw):
    model = scrambled(**kw).eval()
    ids, real = batch()
    with torch.no_grad():
        padded = model(ids)
        ragged = model(ids, lengths=LENGTHS)
    torch.testing.assert_close(ragged[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (ragged[~real] == 0).all()
    # The pads' tokens are never read: other pad ids leave every real logit unchanged.
    other = torch.where(real, ids, (ids + 7) % V)
    with torch.no_grad():
        assert torch.equal(model(other, lengths=LENGTHS)[real], ragged[real])


@pytest.mark.parametrize("kw", SHAPES, ids=["mha", "gqa", "qknorm-bias"])
def test_gradients_equal_the_padded_forwards(kw):
    ids, real = batch(1)
    at = real.clone()
    at[:, 0] = False                 # any subset: here every real position but the first
    grads = []
    for lengths in (None, LENGTHS):
        model = scrambled(**kw)
        model(ids, at=at, lengths=lengths).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_at_gives_the_full_forwards_rows_for_both_heads():
    model = scrambled(n_kv_head=2).eval()
    ids, real = batch(2)
    g = torch.Generator().manual_seed(3)
    at = real & (torch.rand(real.shape, generator=g) < 0.4)
    scalar = ScalarModel.from_lm(model).eval()
    with torch.no_grad():
        for lengths in (None, LENGTHS):
            torch.testing.assert_close(model(ids, at=at, lengths=lengths), model(ids, lengths=lengths)[at],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scalar(ids, at=at, lengths=lengths), scalar(ids, lengths=lengths)[at],
                                       atol=1e-5, rtol=1e-5)
        # The last layer's MLP runs on the rows read, no others.
        seen = []
        hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        model(ids, at=at, lengths=LENGTHS)
        model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        model(ids, at=at, lengths=LENGTHS)
        hook.remove()
        assert seen == [int(at.sum()), int(LENGTHS.sum()), int(at.sum())]
        # Without lengths the padded positions may be read too.
        torch.testing.assert_close(model(ids, at=~real), model(ids)[~real], atol=1e-5, rtol=1e-5)


def test_loss_over_the_real_tokens_equals_the_padded_loss():
    model = scrambled()
    ids, real = batch(4)
    targets = torch.where(real, torch.roll(ids, -1, 1), torch.full_like(ids, -100))
    padded = model(ids, targets, loss_only=True)
    ragged = model(ids, targets, loss_only=True, lengths=LENGTHS)
    torch.testing.assert_close(ragged, padded, atol=1e-5, rtol=1e-5)
    logits, loss = model(ids, targets, lengths=LENGTHS)
    torch.testing.assert_close(loss, padded, atol=1e-5, rtol=1e-5)
    assert logits.shape == (len(LENGTHS), T, V)


def test_grad_checkpointing_and_lora_take_lengths_and_at():
    ids, real = batch(5)
    out = []
    for recompute in (False, True):
        model = scrambled()
        add_adapters(model, LoRASettings(lora_rank=4), seed=0)
        with torch.no_grad():   # B starts at zero: give the adapters something to say
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.1)
        model.grad_checkpointing = recompute
        loss = model(ids, at=real, lengths=LENGTHS).logsumexp(-1).sum()
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and out[0][1]
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_layout_maps_rows_and_positions():
    real, r = layout_of(torch.zeros(3, 4, dtype=torch.long), torch.tensor([2, 3, 1]))
    assert real.tolist() == [[True, True, False, False], [True, True, True, False], [True, False, False, False]]
    assert r.width == 3 and r.index.tolist() == [0, 1, 4, 5, 6, 8]
    assert r.inner.tolist() == [0, 1, 3, 4, 5, 6] and r.positions.tolist() == [0, 1, 0, 1, 2, 0]
    x = torch.arange(12.).view(3, 4)
    assert r.take(x).tolist() == [0., 1., 4., 5., 6., 8.]
    assert r.spread(r.take(x)).tolist() == [[0., 1., 0., 0.], [4., 5., 6., 0.], [8., 0., 0., 0.]]


@pytest.mark.parametrize("bad", [[0, 3], [5, 1], [[2, 3]], [2], [2, 3, 1]])
def test_lengths_out_of_range_or_count_are_refused(bad):
    model = scrambled().eval()
    with pytest.raises(ValueError, match="lengths must be 2 counts between 1 and 4"):
        model(torch.zeros(2, 4, dtype=torch.long), lengths=torch.tensor(bad))


def test_lengths_refuse_a_cache_or_mask():
    model = scrambled().eval()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths takes no cache"):
        model(ids, lengths=torch.tensor([4, 2]), attention_mask=torch.ones(2, 4))


def test_nearly_full_rows_run_padded_with_the_same_contract():
    """Under MIN_PAD_SHARE pads the pass runs padded (gathers would cost what the pads do, and
    keep more than the plan counts): the same logits, zeros at the pads, no loss there."""
    model = scrambled().eval()
    ids, _ = batch(6)
    lengths = torch.full((len(LENGTHS),), T)
    lengths[0] = T - 1                      # one pad in 65 positions
    real, layout = layout_of(ids, lengths)
    assert layout is None and (~real).sum() == 1 < MIN_PAD_SHARE * real.numel()
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        logits, loss = model(ids, targets, lengths=lengths)
        padded, _ = model(ids, targets)
        assert torch.equal(logits[real], padded[real]) and (logits[~real] == 0).all()
        keep = targets.masked_fill(~real, -100)
        assert torch.equal(loss, model(ids, keep)[1])      # the pad's target counts for nothing
        scores = ScalarModel.from_lm(model)(ids, lengths=lengths)
        assert scores[0, -1] == 0 and (scores[real] != 0).all()


def test_at_past_a_rows_length_is_refused():
    model = scrambled().eval()
    ids, real = batch(7)
    with pytest.raises(ValueError, match="at marks positions past a row's length"):
        model(ids, at=~real, lengths=LENGTHS)


def test_scores_at_ends_read_each_row_at_its_last_token():
    scalar = ScalarModel.from_lm(scrambled(n_kv_head=2)).eval()
    ids, _ = batch(8)
    last = LENGTHS - 1
    with torch.no_grad():
        want = scalar(ids)[torch.arange(len(LENGTHS)), last]
        torch.testing.assert_close(scores_at_ends(scalar, ids, last), want, atol=1e-5, rtol=1e-5)
