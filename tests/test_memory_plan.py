"""engine.memory_plan: the activation model against what autograd really saves, the optimizer
and LoRA arithmetic against counts made here, and the suggestions against re-planning.
No timing and no RSS here: those depend on the machine (bench/memory_plan.py measures them)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine import memory_plan as mp
from engine.model import ModelConfig, ScalarModel, Transformer

B, T = 3, 16


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layer=3, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def no_allocator_slack(monkeypatch):
    # The allocator term depends on the C library, not on the model: off unless a test asks.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: a second thread only spins against whatever else shares the CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved_bytes(model, *, autocast=False, lm_loss=True) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (+ loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    y = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(x, y)[1] if lm_loss else model(x).sum()
    out.backward()          # the graph is complete and usable: nothing was missed by the count
    return sum(seen.values())


def linear_weight_count(cfg) -> int:
    return sum(m.weight.numel() for m in Transformer(cfg).modules() if isinstance(m, nn.Linear))


# --- the activation model is what autograd keeps -------------------------------------------

# Plain multi-head, grouped-query, multi-query (repeat_kv is then a view), tied, Qwen-style options.
VARIANTS = [{}, {"n_kv_head": 4}, {"n_kv_head": 1}, {"tie_embeddings": True}, {"qk_norm": True},
            {"qkv_bias": True}, {"head_size": 16}]


def test_saved_tensors_of_a_training_forward_match_the_formula_exactly():
    for kw in VARIANTS:
        cfg = tiny(**kw)
        torch.manual_seed(0)
        assert saved_bytes(Transformer(cfg)) == mp.saved_activation_bytes(cfg, B, T), kw
        p = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T, device="cpu")
        assert p.detail["saved"] == mp.saved_activation_bytes(cfg, B, T)
        # The backward adds two fp32 copies of the logits (the loss's gradient, log_softmax's).
        assert p.detail["logit_grads"] == 2 * 4 * B * T * cfg.vocab_size
        assert p.phases["backward"]["activations"] == p.detail["peak"]


def test_autocast_saves_bf16_casts_and_weight_copies_as_the_cuda_formula_says():
    """CPU autocast follows the same rules for linear and SDPA as CUDA's: the plan's CUDA terms."""
    for kw in VARIANTS:
        cfg = tiny(**kw)
        torch.manual_seed(0)
        got = saved_bytes(Transformer(cfg), autocast=True)
        weights = 2 * linear_weight_count(cfg)            # one bf16 copy of every matmul weight
        assert got == mp.saved_activation_bytes(cfg, B, T, compute_bytes=2, autocast=True) + weights, kw
        p = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T, device="cuda", dtype="bfloat16")
        assert p.detail["saved"] + p.detail["autocast_weights"] == got


def test_reward_models_scalar_head_keeps_no_logits():
    cfg = tiny()
    torch.manual_seed(0)
    assert saved_bytes(ScalarModel(cfg), lm_loss=False) == mp.saved_activation_bytes(cfg, B, T, kind="scalar")


# --- LoRA ------------------------------------------------------------------------------------

class LoRA(nn.Module):
    """The standard unmerged adapter: y = W x + s B(A x), W frozen."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * 2.0


def lorafy(model, r, targets):
    model.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRA(getattr(parent, name), r))
    if isinstance(model, ScalarModel):
        model.score.weight.requires_grad_(True)       # the new head trains in full
    return model


TARGET_SETS = [mp.LINEARS, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ("o_proj",)]


def test_lora_saved_tensors_match_the_formula():
    for targets in TARGET_SETS:
        for kind in ("lm", "scalar"):
            cfg = tiny()
            torch.manual_seed(0)
            model = lorafy(Transformer(cfg) if kind == "lm" else ScalarModel(cfg), 4, targets)
            got = saved_bytes(model, lm_loss=kind == "lm")
            assert got == mp.saved_activation_bytes(cfg, B, T, kind=kind, lora_rank=4, lora_targets=targets), \
                (targets, kind)
            # Frozen weights save no inputs of their own; only the adapters' [N, r] are extra.
            full = mp.saved_activation_bytes(cfg, B, T, kind=kind)
            assert got < full + B * T * cfg.n_layer * mp._lora_saved(cfg, 4, 4, targets)
            if len(targets) < len(mp.LINEARS):
                assert got < full


def test_engine_lora_saves_what_the_formula_says():
    """The engine's own adapters (peft's LoRA layers), where they exist."""
    pytest.importorskip("peft")
    lora = pytest.importorskip("engine.lora")
    for targets in TARGET_SETS[:2]:
        for cls in (Transformer, ScalarModel):
            cfg = tiny()
            torch.manual_seed(0)
            model = lora.add_adapters(cls(cfg), lora.LoRASettings(lora_rank=4, lora_targets=list(targets)), seed=0)
            kind = "lm" if cls is Transformer else "scalar"
            assert saved_bytes(model, lm_loss=kind == "lm") == mp.saved_activation_bytes(
                cfg, B, T, kind=kind, lora_rank=4, lora_targets=targets), (targets, kind)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            plan = mp.plan("ranking" if kind == "scalar" else "causal-lm", cfg, batch_size=2, seq_len=32, lora_rank=4,
                           lora_targets=targets)
            assert plan.optimizer == 2 * 4 * trained


@pytest.mark.parametrize("rank,targets", [(4, mp.LINEARS), (16, ("q_proj", "v_proj", "down_proj"))])
def test_lora_optimizer_state_is_two_fp32_moments_per_adapter_param(rank, targets):
    cfg = tiny(n_kv_head=1)
    model = Transformer(cfg)
    adapters = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    sft = mp.plan("causal-lm", cfg, batch_size=2, seq_len=32, lora_rank=rank, lora_targets=targets)
    assert sft.optimizer == 2 * 4 * adapters
    assert sft.phases["optimizer step"]["gradients"] == 4 * adapters
    # The reward model's new scalar head trains in full beside the adapters.
    rm = mp.plan("ranking", cfg, batch_size=2, seq_len=32, lora_rank=rank, lora_targets=targets)
    assert rm.optimizer == 2 * 4 * (adapters + cfg.d_model)
    full = mp.plan("causal-lm", cfg, batch_size=2, seq_len=32)
    assert full.optimizer == 2 * 4 * model.num_params()


def test_lora_has_no_separate_reference_model():
    cfg = tiny()
    full = mp.plan("preference", cfg, batch_size=2, seq_len=32)
    lora = mp.plan("preference", cfg, batch_size=2, seq_len=32, lora_rank=8)
    assert full.phases["backward"]["other_models"] == 4 * mp.param_count(cfg)
    assert lora.phases["backward"]["other_models"] == 0


# --- gradient checkpointing ---------------------------------------------------------------------

def test_checkpointing_keeps_each_blocks_input_and_recomputes_one_block():
    cfg = tiny(n_layer=4)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if hasattr(Transformer, "grad_checkpointing"):        # the engine's own, where it exists
        model.grad_checkpointing = True
    else:
        for block in model.model.layers:
            block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)
    got = saved_bytes(model)
    assert got == mp.saved_activation_bytes(cfg, B, T, checkpointing=True)

    plain = mp.plan("causal-lm", cfg, batch_size=8, seq_len=64)
    ckpt = mp.plan("causal-lm", cfg, batch_size=8, seq_len=64, grad_checkpointing=True)
    n = 8 * 64
    inputs = cfg.n_layer * 4 * n * cfg.d_model
    one_layer = (plain.detail["saved"] - mp.saved_activation_bytes(cfg, 8, 64, checkpointing=True)
                 + inputs) / cfg.n_layer          # roughly: the head's share is left in, spread thin
    assert ckpt.detail["recompute"] == pytest.approx(one_layer, rel=0.25)
    assert ckpt.detail["peak"] < plain.detail["peak"]
    head_and_inputs = mp.saved_activation_bytes(cfg, 8, 64, checkpointing=True)
    assert ckpt.detail["peak"] <= head_and_inputs + max(ckpt.detail["logit_grads"],
                                                        ckpt.detail["recompute"] + ckpt.detail["layer_grads"])


# --- sizes ------------------------------------------------------------------------------------

def test_param_count_matches_the_models():
    for kw in VARIANTS + [{"qk_norm": True, "qkv_bias": True, "tie_embeddings": True}]:
        cfg = tiny(**kw)
        assert mp.param_count(cfg, "lm") == Transformer(cfg).num_params(), kw
        assert mp.param_count(cfg, "scalar") == ScalarModel(cfg).num_params(), kw


def test_kv_cache_matches_the_models_cache():
    cfg = tiny(n_kv_head=1)
    cache = Transformer(cfg).make_cache(5, 40)
    assert mp.kv_cache_bytes(cfg, 5, 40, 4) == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    p = mp.plan("generation", cfg, batch_size=5, seq_len=40, ppo={"max_new_tokens": 30})
    assert p.kv_cache == mp.kv_cache_bytes(cfg, 5, 40, 4)
    assert p.gradients == p.optimizer == p.activations == 0


def test_stages_hold_the_models_they_load():
    cfg = tiny()
    lm, sc = 4 * mp.param_count(cfg, "lm"), 4 * mp.param_count(cfg, "scalar")
    ppo = mp.plan("actor-critic", cfg, batch_size=1, seq_len=48, ppo={"rollout_batch_size": 8, "minibatch_size": 4,
                                                              "max_new_tokens": 16})
    assert ppo.phases["generation"]["other_models"] == lm + 2 * sc          # reference, value, reward
    assert ppo.optimizer == 2 * (lm + sc)                              # policy and value model
    assert set(ppo.phases) == {"generation", "scoring", "backward", "optimizer step"}
    grpo = mp.plan("group-rl", cfg, batch_size=1, seq_len=48, ppo={"rm_weight": 1.0, "max_new_tokens": 16})
    assert grpo.phases["backward"]["other_models"] == lm + sc
    reward = mp.plan("ranking", cfg, batch_size=2, seq_len=32, answers=4)
    assert reward.detail["saved"] == mp.saved_activation_bytes(cfg, 8, 32, kind="scalar")


def test_the_total_is_the_largest_phase_and_its_parts_add_up():
    cfg = tiny()
    for stage in mp.SHAPES:
        p = mp.plan(stage, cfg, batch_size=4, seq_len=48, ppo={"max_new_tokens": 16}
                    if stage in ("actor-critic", "group-rl", "generation") else None)
        sums = {name: sum(parts.values()) for name, parts in p.phases.items()}
        assert p.total == max(sums.values()) == sums[p.phase]
        assert p.total == sum(getattr(p, k) for k in mp.PARTS)
        assert p.overhead > 0


def test_grad_accum_keeps_every_gradient_alive_through_the_next_backward():
    cfg = tiny()
    one = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48)
    four = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48, grad_accum=4)
    assert four.phases["backward"]["gradients"] == 4 * mp.param_count(cfg)
    assert four.total > one.total


def test_allocator_slack_on_linux_cpu_follows_the_environment(monkeypatch):
    cfg = tiny()
    off = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(mp.sys, "platform", "linux")
    on = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48)
    assert off.allocator == 0
    assert on.allocator == int(mp.GLIBC_HEAP_SLACK * on.detail["peak"])
    assert on.total == off.total + on.allocator
    assert mp.plan("causal-lm", cfg, batch_size=4, seq_len=48, device="cuda").allocator == 0


# --- the form's text and suggestions ---------------------------------------------------------------

def big_plan(**kw):
    """Activations dominate: a small model, a long batch, a large vocabulary."""
    cfg = ModelConfig(vocab_size=8192, d_model=256, n_layer=8, n_head=8, n_kv_head=8, d_ff=704, max_seq_len=512)
    return mp.plan("causal-lm", cfg, batch_size=32, seq_len=512, **kw)


def wide_plan(**kw):
    """Weights dominate: a 135M model at a short batch, where the optimizer state is the peak."""
    cfg = ModelConfig(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
                      max_seq_len=2048, tie_embeddings=True)
    return mp.plan("causal-lm", cfg, batch_size=2, seq_len=128, **kw)


def check_options(p, free):
    options = p.options(free)
    assert options and not p.fits(free)
    for o in options:
        again = mp.plan(**{**p.inputs, **o.changes})
        assert again.fits(free), o.text
        assert again.total == o.plan.total
    assert [o.plan.total for o in options] == sorted(o.plan.total for o in options)   # most room first
    return [o.text for o in options]


def test_suggestions_each_make_the_plan_fit_and_come_best_first():
    p = big_plan()
    texts = check_options(p, int(p.total * 0.7))
    assert texts[0].startswith("gradient checkpointing cuts activations from")
    assert not any(t.startswith("LoRA") for t in texts)     # it would not make this run fit
    batch = [t for t in texts if t.startswith("batch ")]
    assert batch and "grad_accum 2" in batch[0] and "32 examples per step" in batch[0]

    wide = wide_plan()
    texts = check_options(wide, int(wide.total * 0.8))
    assert texts[0].startswith("LoRA rank 16 cuts the optimizer state from 1.08 GB to 0.04 GB")


def test_rl_suggestions_shrink_the_minibatch():
    cfg = tiny(vocab_size=4096, max_seq_len=512)
    p = mp.plan("actor-critic", cfg, batch_size=1, seq_len=512, ppo={"rollout_batch_size": 64, "minibatch_size": 32,
                                                            "max_new_tokens": 64})
    texts = check_options(p, int(p.total * 0.6))
    assert any(t.startswith("minibatch_size 16 instead of 32") or t.startswith("minibatch_size 8 instead of 32")
               for t in texts)


def test_when_no_single_change_fits_the_suggestion_combines_them():
    p = wide_plan()
    free = int(p.total * 0.5)
    (only,) = p.options(free)
    assert only.text.startswith("together: LoRA rank 16 + ")
    assert mp.plan(**{**p.inputs, **only.changes}).fits(free)


def test_nothing_fits_says_so_and_a_fitting_plan_has_no_suggestions():
    p = big_plan()
    assert p.suggestions(p.total) == []
    (only,) = p.options(1)
    assert only.changes is None and only.text.startswith("does not fit even with")


def test_describe_is_one_line_for_the_form():
    p = big_plan()
    line = p.describe(p.total * 2)
    assert "\n" not in line and line.startswith("≈ ") and "GB peak" in line and "free" in line
    assert "optimizer" in p.describe() and "does not fit" in p.describe(1)


def test_free_memory_on_cpu_is_positive():
    assert 0 < mp.free_memory("cpu")


# --- bad input ----------------------------------------------------------------------------------

BAD = [
    (dict(stage="rlhf"), "unknown run shape"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=65), "max_seq_len"),
    (dict(dtype="fp8"), "dtype"),
    (dict(device="tpu"), "unknown device"),
    (dict(stage="causal-lm", lora_rank=8, can_lora=False), "LoRA applies"),
    (dict(lora_rank=8, lora_targets=("qkv",)), "lora_targets"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(stage="actor-critic", seq_len=64, ppo={"rollout": 4}), "unknown: rollout"),
    (dict(stage="actor-critic", seq_len=64, ppo={"max_new_tokens": 64}), "max_new_tokens"),
    (dict(stage="group-rl", ppo={"group_size": 0}), "group_size"),
    (dict(stage="preference", answers=1), "answers"),
]


def test_bad_settings_are_a_clear_value_error():
    for kw, match in BAD:
        args = {"stage": "causal-lm", "batch_size": 2, "seq_len": 32, **kw}
        with pytest.raises(ValueError, match=match):
            mp.plan(args.pop("stage"), tiny(), **args)
    with pytest.raises(ValueError, match="invalid model config"):
        mp.plan("causal-lm", tiny(n_head=5), batch_size=2, seq_len=32)
