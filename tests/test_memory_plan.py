"""engine.memory_plan: the activation model against what autograd really saves, the fused
loss's working set against the allocations it makes, the optimizer and LoRA arithmetic against
counts made here, and the suggestions against re-planning.
No timing and no RSS here: those depend on the machine (bench/memory_plan.py measures them)."""
from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from engine import memory_plan as mp
from engine import memory_tensors as mt
from engine.fused_loss import linear_cross_entropy
from engine.model import ModelConfig, ScalarModel, Transformer
from engine.ppo_core import AnswerStates, logprobs_of

B, T = 3, 16
A = 6                  # answer tokens per row in the `at=` tests


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


def answer_states(x) -> AnswerStates:
    """A rollout's layout: prompts of different lengths, then A answer tokens in every row."""
    mask = torch.zeros(x.shape)
    for row, start in enumerate((3, 7, 10)[:x.size(0)]):
        mask[row, start:start + A] = 1
    return AnswerStates.of(x, mask)


def saved_bytes(model, *, autocast=False, head="fused", prompt=0) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward and its loss,
    the way training runs it: head "fused" is pretraining's and SFT's `model(x, y,
    loss_only=True)` (the first `prompt` targets of each row -100), "at" PPO's, GRPO's and DPO's
    log-probs from `model(x, at=...)` at the answer states, "scalar" a ScalarModel's scores."""
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
    y[:, :prompt] = -100
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        if head == "fused":
            out = model(x, y, loss_only=True)
        elif head == "at":
            st = answer_states(x)
            out = logprobs_of(model(x, at=st.at), st.targets, 0.7).sum()
        elif head == "values":     # PPO's value model, read at the answer states
            out = model(x, at=answer_states(x).at).sum()
        else:
            out = model(x).sum()
    out.backward()          # the graph is complete and usable: nothing was missed by the count
    return sum(seen.values())


def linear_weight_count(cfg, head: bool) -> int:
    """Weights of the model's nn.Linear layers, lm_head's only if `head`."""
    model = Transformer(cfg)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
               and (head or m is not model.lm_head))


def allocated(fn) -> tuple[int, int]:
    """(bytes fn leaves allocated, its result alive, and the most it had allocated at once) on
    the CPU, from the allocator's own events as torch.profiler records them, in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    now = peak = 0
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            now += e.nbytes()
            peak = max(peak, now)
    del out             # the result and its graph were alive until the profile ended
    return now, peak


class OpOutputs(TorchDispatchMode):
    """Bytes of the storages the ops make (op outputs: no kernel's private scratch), alive now
    and at most; storages of `given` tensors are not counted."""

    def __init__(self, *given):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr() for t in given}
        self.now = self.peak = 0

    def _freed(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                s = t.untyped_storage()
                self.live.add(s.data_ptr())
                self.now += s.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(s, self._freed, s.data_ptr(), s.nbytes())
        return out


# --- the activation model is what autograd keeps -------------------------------------------

# Plain multi-head, grouped-query, multi-query (repeat_kv is then a view), tied, Qwen-style options.
VARIANTS = [{}, {"n_kv_head": 4}, {"n_kv_head": 1}, {"tie_embeddings": True}, {"qk_norm": True},
            {"qkv_bias": True}, {"head_size": 16}]


def test_saved_tensors_of_a_training_forward_match_the_formula_exactly():
    n = B * T
    for kw in VARIANTS:
        cfg = tiny(**kw)
        torch.manual_seed(0)
        got = saved_bytes(Transformer(cfg))
        assert got == mt.saved_activation_bytes(cfg, B, T), kw
        # SFT's prompt targets are left out of the loss, but grad_h is kept for every row.
        assert saved_bytes(Transformer(cfg), prompt=5) == got
        p = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T, device="cpu")
        assert p.detail["saved"] == got
        # The fused loss keeps grad_h and grad_W; no logits at all.
        kept = 4 * n * cfg.d_model + 4 * cfg.vocab_size * cfg.d_model
        assert p.detail["head_kept"] == kept
        assert got < mt.saved_activation_bytes(cfg, B, T, logits_at=T)        # the plain path's
        assert p.phases["backward"]["activations"] == p.detail["peak"]


def test_logits_at_the_answer_states_keep_what_the_formula_says():
    """PPO, GRPO and DPO: log-probs from `model(x, at=...)`, M = B x A answer states."""
    for kw in VARIANTS:
        cfg = tiny(**kw)
        torch.manual_seed(0)
        got = saved_bytes(Transformer(cfg), head="at")
        assert got == mt.saved_activation_bytes(cfg, B, T, logits_at=A), kw
        grpo = mp.plan("group-rl", cfg, batch_size=1, seq_len=T, ppo={
            "prompts_per_step": 1, "group_size": B, "minibatch_size": B, "max_new_tokens": A})
        assert grpo.detail["saved"] == got
        # The backward's two fp32 copies of the answer states' log-softmax, and no more.
        assert grpo.detail["head"] == 2 * 4 * B * A * cfg.vocab_size
        # DPO: the plan does not know the answers' share, so every position has logits.
        dpo = mp.plan("preference", cfg, batch_size=1, seq_len=T, answers=B)
        assert dpo.detail["saved"] == mt.saved_activation_bytes(cfg, B, T, logits_at=T) > got


def test_autocast_saves_bf16_casts_and_weight_copies_as_the_cuda_formula_says():
    """CPU autocast follows the same rules for linear and SDPA as CUDA's: the plan's CUDA terms.
    The fused loss casts lm_head's weight for its forward only; `at=` goes through lm_head."""
    for kw in VARIANTS:
        cfg = tiny(**kw)
        torch.manual_seed(0)
        got = saved_bytes(Transformer(cfg), autocast=True)
        weights = 2 * linear_weight_count(cfg, head=False)     # one bf16 copy of every layer's weight
        assert got == mt.saved_activation_bytes(cfg, B, T, compute_bytes=2, autocast=True) + weights, kw
        p = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T, device="cuda", dtype="bfloat16")
        assert p.detail["saved"] + p.detail["autocast_weights"] == got

        got = saved_bytes(Transformer(cfg), autocast=True, head="at")
        weights = 2 * linear_weight_count(cfg, head=True)
        assert got == mt.saved_activation_bytes(cfg, B, T, compute_bytes=2, autocast=True, logits_at=A) + weights, kw
        p = mp.plan("group-rl", cfg, batch_size=1, seq_len=T, device="cuda", dtype="bfloat16", ppo={
            "prompts_per_step": 1, "group_size": B, "minibatch_size": B, "max_new_tokens": A})
        assert p.detail["saved"] + p.detail["autocast_weights"] == got


def test_reward_and_value_models_scalar_heads_keep_no_logits():
    cfg = tiny()
    torch.manual_seed(0)
    assert saved_bytes(ScalarModel(cfg), head="scalar") == mt.saved_activation_bytes(cfg, B, T, kind="scalar")
    values = saved_bytes(ScalarModel(cfg), head="values")
    assert values == mt.saved_activation_bytes(cfg, B, T, kind="scalar", logits_at=A)
    ppo = mp.plan("actor-critic", cfg, batch_size=1, seq_len=T, ppo={
        "rollout_batch_size": B, "minibatch_size": B, "max_new_tokens": A})
    assert ppo.detail["saved"] == values + saved_bytes(Transformer(cfg), head="at")


# --- the fused loss's working set: what it allocates, not only what it keeps ------------------

def loss_inputs(n, d, v, n_valid, dtype=torch.float32, head_trained=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_(head_trained)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n - n_valid]] = -100
    return h, w, t


# (rows, d, vocab, valid rows, chunk rows, head trained): one chunk or several, a short last
# chunk, every target valid or some ignored (SFT), a frozen head (LoRA), the default chunk size.
LOSS_CASES = [(300, 32, 97, 300, 128, True), (300, 32, 97, 299, 128, True), (300, 32, 97, 200, 64, True),
              (300, 32, 97, 300, None, True), (300, 32, 97, 250, 100, False), (300, 512, 50, 299, 128, True),
              (300, 8, 1000, 290, 100, True), (300, 8, 1000, 0, 100, True)]


@pytest.mark.parametrize("n,d,v,valid,rows,trained", LOSS_CASES)
def test_fused_loss_allocates_what_the_formula_says(n, d, v, valid, rows, trained):
    """fp32, as on CPU: every byte the allocator hands out during the loss's forward."""
    h, w, t = loss_inputs(n, d, v, valid, head_trained=trained)
    end, peak = allocated(lambda: linear_cross_entropy(h, w, t, chunk_rows=rows))
    kept, planned = mt.fused_loss_bytes(n, d, v, n_valid=valid, head_trained=trained, rows=rows)
    assert end == kept + 4                    # + the loss
    assert peak == planned
    # n_valid unknown (the plan's case): the worst any share of valid rows can do.
    assert mt.fused_loss_bytes(n, d, v, head_trained=trained, rows=rows)[1] >= planned


@pytest.mark.parametrize("n,d,v,valid,rows,autocast,weights", [
    (300, 32, 97, 300, 128, True, torch.float32), (300, 32, 97, 250, 128, True, torch.float32),
    (300, 8, 1000, 290, 100, True, torch.float32), (300, 512, 50, 299, 128, True, torch.float32),
    (10, 256, 3000, 10, 4, True, torch.float32), (300, 32, 97, 250, 128, False, torch.bfloat16),
    (10, 256, 3000, 9, 128, False, torch.bfloat16)])
def test_fused_loss_in_bf16_makes_what_the_formula_says(n, d, v, valid, rows, autocast, weights):
    """bf16 matmuls (autocast, or half weights) with the softmax in fp32, counted as op outputs:
    CPU bf16 kernels allocate scratch of their own that CUDA's do not (see fused_loss_bytes)."""
    h, w, t = loss_inputs(n, d, v, valid, weights)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx, OpOutputs(h, w, t) as made:
        loss = linear_cross_entropy(h, w, t, chunk_rows=rows)
    wb = w.element_size()
    kept, planned = mt.fused_loss_bytes(n, d, v, n_valid=valid, compute_bytes=2, hidden_bytes=wb, weight_bytes=wb,
                                        rows=rows)
    assert made.now == kept + 4 and loss.dtype == torch.float32
    assert made.peak == planned


def test_the_plans_head_term_is_the_fused_loss_in_the_model():
    """The model's own call, SFT-like (some targets -100), against the plan's head term."""
    cfg = tiny(vocab_size=1000)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))
    y[0, 0] = -100
    h = model.hidden(x).detach().requires_grad_()
    end, peak = allocated(lambda: model.head_loss(h, y))
    n = B * T
    kept, planned = mt.fused_loss_bytes(n, cfg.d_model, cfg.vocab_size, n_valid=n - 1)
    assert (end, peak) == (kept + 4, planned)
    p = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T)
    assert p.detail["head_kept"] == kept
    # Its forward's working set beyond what it keeps (the plan takes the worst share of valid
    # targets), or its backward's scaled copy of grad_h.
    assert p.detail["head"] >= peak - kept
    assert p.detail["head"] == max(mt.fused_loss_bytes(n, cfg.d_model, cfg.vocab_size)[1] - kept, 4 * n * cfg.d_model)
    lora = mp.plan("causal-lm", cfg, batch_size=B, seq_len=T, lora_rank=4)
    assert lora.detail["head_kept"] == 4 * n * cfg.d_model          # a frozen head: no grad_W


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


TARGET_SETS = [mt.LINEARS, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ("o_proj",)]


HEADS = {"fused": dict(kind="lm"), "at": dict(kind="lm", logits_at=A), "scalar": dict(kind="scalar")}


def test_lora_saved_tensors_match_the_formula():
    for targets in TARGET_SETS:
        for head, kw in HEADS.items():
            cfg = tiny()
            torch.manual_seed(0)
            model = lorafy(ScalarModel(cfg) if head == "scalar" else Transformer(cfg), 4, targets)
            got = saved_bytes(model, head=head)
            assert got == mt.saved_activation_bytes(cfg, B, T, lora_rank=4, lora_targets=targets, **kw), \
                (targets, head)
            # Frozen weights save no inputs of their own; only the adapters' [N, r] are extra.
            full = mt.saved_activation_bytes(cfg, B, T, **kw)
            assert got < full + B * T * cfg.n_layer * mt._lora_saved(cfg, 4, 4, targets)
            if len(targets) < len(mt.LINEARS):
                assert got < full


def test_engine_lora_saves_what_the_formula_says():
    """The engine's own adapters (peft's LoRA layers), where they exist."""
    pytest.importorskip("peft")
    lora = pytest.importorskip("engine.lora")
    for targets in TARGET_SETS[:2]:
        for head, kw in HEADS.items():
            cfg = tiny()
            torch.manual_seed(0)
            cls = ScalarModel if head == "scalar" else Transformer
            model = lora.add_adapters(cls(cfg), lora.LoRASettings(lora_rank=4, lora_targets=list(targets)), seed=0)
            kind = kw["kind"]
            assert saved_bytes(model, head=head) == mt.saved_activation_bytes(
                cfg, B, T, lora_rank=4, lora_targets=targets, **kw), (targets, head)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            plan = mp.plan("ranking" if kind == "scalar" else "causal-lm", cfg, batch_size=2, seq_len=32, lora_rank=4,
                           lora_targets=targets)
            assert plan.optimizer == 2 * 4 * trained


@pytest.mark.parametrize("rank,targets", [(4, mt.LINEARS), (16, ("q_proj", "v_proj", "down_proj"))])
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
    assert full.phases["backward"]["other_models"] == 4 * mt.param_count(cfg)
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
    assert got == mt.saved_activation_bytes(cfg, B, T, checkpointing=True)

    plain = mp.plan("causal-lm", cfg, batch_size=8, seq_len=64)
    ckpt = mp.plan("causal-lm", cfg, batch_size=8, seq_len=64, grad_checkpointing=True)
    n = 8 * 64
    inputs = cfg.n_layer * 4 * n * cfg.d_model
    one_layer = (plain.detail["saved"] - mt.saved_activation_bytes(cfg, 8, 64, checkpointing=True)
                 + inputs) / cfg.n_layer          # roughly: the head's share is left in, spread thin
    assert ckpt.detail["recompute"] == pytest.approx(one_layer, rel=0.25)
    assert ckpt.detail["peak"] < plain.detail["peak"]
    head_and_inputs = mt.saved_activation_bytes(cfg, 8, 64, checkpointing=True)
    assert ckpt.detail["peak"] <= head_and_inputs + max(ckpt.detail["head"],
                                                        ckpt.detail["recompute"] + ckpt.detail["layer_grads"])


# --- sizes ------------------------------------------------------------------------------------

def test_param_count_matches_the_models():
    for kw in VARIANTS + [{"qk_norm": True, "qkv_bias": True, "tie_embeddings": True}]:
        cfg = tiny(**kw)
        assert mt.param_count(cfg, "lm") == Transformer(cfg).num_params(), kw
        assert mt.param_count(cfg, "scalar") == ScalarModel(cfg).num_params(), kw


def test_kv_cache_matches_the_models_cache():
    cfg = tiny(n_kv_head=1)
    cache = Transformer(cfg).make_cache(5, 40)
    assert mt.kv_cache_bytes(cfg, 5, 40, 4) == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    p = mp.plan("generation", cfg, batch_size=5, seq_len=40, ppo={"max_new_tokens": 30})
    assert p.kv_cache == mt.kv_cache_bytes(cfg, 5, 40, 4)
    assert p.gradients == p.optimizer == p.activations == 0


def test_generation_workspace_covers_the_cache_copies_generate_makes():
    # engine.generate copies up to half the KV cache (a shared prompt's prefill spread over its
    # rows; the rows left when half have finished): with a short prompt and a long answer that
    # is more than the prompt's forward, and the plan must hold it.
    cfg = tiny(n_kv_head=1)
    p = mp.plan("generation", cfg, batch_size=8, seq_len=64, ppo={"max_new_tokens": 60})
    half = Transformer(cfg).make_cache(8, 64).rows(torch.arange(4))
    copy = sum(t.numel() * t.element_size() for t in half.k + half.v)
    assert copy > mt.prefill_bytes(cfg, 8, 4, 4)
    assert p.phases["generation"]["workspace"] >= copy


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("shape", [{}, dict(n_kv_head=1, qkv_bias=True)])
def test_the_decoding_steps_tables_and_fused_weights_are_counted_exactly(shape, fuse, monkeypatch):
    from engine import decode
    monkeypatch.setattr(decode, "FUSE_UP_TO_PARAMS", 10**12 if fuse else 0)
    monkeypatch.setattr(mt, "FUSE_UP_TO_PARAMS", decode.FUSE_UP_TO_PARAMS)
    monkeypatch.setattr(decode, "_compiled", lambda plain: held.append(plain) or plain)
    cfg, held = tiny(**shape), []
    model = Transformer(cfg)
    decode.make_step(model, 40)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tensors = [t for name in decode._Decoder.__annotations__ for t in _flat(getattr(held[0], name))]
    own = sum(t.untyped_storage().nbytes() for t in tensors if t.untyped_storage().data_ptr() not in params)
    consts = sum(t.untyped_storage().nbytes() for t in held[0].by_model + held[0].by_head)
    assert own - consts == mt.decode_step_bytes(cfg, 40, 4)


def _flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _flat(v)] if isinstance(value, list) else []


def test_stages_hold_the_models_they_load():
    cfg = tiny()
    lm, sc = 4 * mt.param_count(cfg, "lm"), 4 * mt.param_count(cfg, "scalar")
    ppo = mp.plan("actor-critic", cfg, batch_size=1, seq_len=48, ppo={"rollout_batch_size": 8, "minibatch_size": 4,
                                                              "max_new_tokens": 16})
    assert ppo.phases["generation"]["other_models"] == lm + 2 * sc          # reference, value, reward
    assert ppo.optimizer == 2 * (lm + sc)                              # policy and value model
    assert set(ppo.phases) == {"generation", "scoring", "backward", "optimizer step"}
    # PPO (and GRPO) score the rest of a rollout holding the first minibatch's graphs for its update
    assert ppo.phases["scoring"]["activations"] == ppo.detail["saved"] > 0
    grpo = mp.plan("group-rl", cfg, batch_size=1, seq_len=48, ppo={"rm_weight": 1.0, "max_new_tokens": 16})
    assert grpo.phases["backward"]["other_models"] == lm + sc
    assert grpo.phases["scoring"]["activations"] == grpo.detail["saved"] > 0
    reward = mp.plan("ranking", cfg, batch_size=2, seq_len=32, answers=4)
    assert reward.detail["saved"] == mt.saved_activation_bytes(cfg, 8, 32, kind="scalar")


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
    for tied in (False, True):
        cfg = tiny(tie_embeddings=tied)
        one = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48)
        four = mp.plan("causal-lm", cfg, batch_size=4, seq_len=48, grad_accum=4)
        # The head's fresh gradient, tied or not (a tied one waits in autograd's buffer for the
        # embedding's), beside every accumulated one.
        head = 4 * cfg.vocab_size * cfg.d_model
        assert one.phases["backward"]["gradients"] == head
        assert four.phases["backward"]["gradients"] == 4 * mt.param_count(cfg) + head
        assert four.total > one.total


def test_a_tied_heads_gradient_waits_for_the_embeddings_at_the_end_of_the_backward():
    """A whole training step, measured: with few tokens and wide layers its peak is the moment
    the embedding's gradient meets the tied head's, every other gradient written."""
    for tied in (False, True):
        cfg = tiny(vocab_size=2000, d_model=64, d_ff=512, n_layer=4, tie_embeddings=tied)
        torch.manual_seed(0)
        model = Transformer(cfg)
        x, y = (torch.randint(0, cfg.vocab_size, (1, 8)) for _ in range(2))
        end, peak = allocated(lambda: model(x, y, loss_only=True).backward())
        grads, head = 4 * mt.param_count(cfg), 4 * cfg.vocab_size * cfg.d_model
        assert end == grads
        p = mp.plan("causal-lm", cfg, batch_size=1, seq_len=8)
        if tied:
            assert head <= peak - end < head + 4096
            assert p.phases["end of backward"]["gradients"] == grads + head
        else:
            assert peak - end < 4096
            assert "end of backward" not in p.phases


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
    # Long answers: the minibatch's logits at its answer states set the peak (short ones leave it
    # to generation's prefill of the whole rollout).
    cfg = tiny(vocab_size=4096, max_seq_len=512)
    p = mp.plan("actor-critic", cfg, batch_size=1, seq_len=512, ppo={"rollout_batch_size": 64, "minibatch_size": 32,
                                                            "max_new_tokens": 448})
    assert p.phase == "scoring"
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
