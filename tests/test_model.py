"""engine.model: HF Llama compatibility, masking, KV cache, loss, init, presets, weights I/O."""
import math

import pytest
import torch

from engine.config import ConfigError
from engine.hf_model import hf_config
from engine.model import PRESETS, ModelConfig, Transformer, config_from_preset
from engine.weights import load_model, model_from_state_dict, read_config, save_model

V = 97


def tiny(**kw) -> ModelConfig:
    return config_from_preset("tiny", V, **kw)


def make(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


def scramble(model: Transformer, seed=1) -> None:
    """Random values in every parameter, norms included (init leaves them at 1, which would hide
    a norm weight applied wrongly), large enough that logits spread over several units."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def expected_hf_names(cfg: ModelConfig) -> dict[str, tuple]:
    d, hd = cfg.d_model, cfg.head_dim
    names = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        names |= {
            p + "self_attn.q_proj.weight": (cfg.n_head * hd, d),
            p + "self_attn.k_proj.weight": (cfg.n_kv_head * hd, d),
            p + "self_attn.v_proj.weight": (cfg.n_kv_head * hd, d),
            p + "self_attn.o_proj.weight": (d, cfg.n_head * hd),
            p + "mlp.gate_proj.weight": (cfg.d_ff, d),
            p + "mlp.up_proj.weight": (cfg.d_ff, d),
            p + "mlp.down_proj.weight": (d, cfg.d_ff),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    names |= {"model.norm.weight": (d,), "lm_head.weight": (cfg.vocab_size, d)}
    return names


def analytic_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in expected_hf_names(cfg).values()) - (
        cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", [4, 2])
def test_state_dict_names_and_shapes_are_hf_llama(kv):
    cfg = tiny(n_kv_head=kv)
    sd = Transformer(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_hf_names(cfg)
    assert list(sd)[0] == "model.embed_tokens.weight"


def test_tied_embeddings_share_one_parameter():
    m = make(tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(m.named_parameters())
    assert m.num_params() == analytic_params(m.config)


@pytest.mark.parametrize("bad, field", [
    (dict(d_model=66), "n_head"),          # 66 % 4
    (dict(n_kv_head=3), "n_kv_head"),      # 4 % 3
    (dict(d_model=12, n_head=4), "n_head"),  # head_dim 3 is odd
    (dict(n_layer=0), "n_layer"),
    (dict(d_ff=-1), "d_ff"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_validate_names_the_field(bad, field):
    cfg = dict(PRESETS["tiny"], vocab_size=V) | bad
    with pytest.raises(ConfigError) as e:
        ModelConfig(**cfg).validate()
    assert e.value.field == field
    with pytest.raises(ConfigError):
        Transformer(ModelConfig(**cfg))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        config_from_preset("huge", V)
    assert e.value.field == "preset"
    for name in PRESETS:
        assert name in e.value.message
    with pytest.raises(ConfigError) as e:
        config_from_preset("tiny", V, n_heads=3)  # a typo in an override is named, too
    assert e.value.field == "n_heads"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    vocab = 32000 if name == "base" else 4096
    cfg = config_from_preset(name, vocab)
    with torch.device("meta"):  # no memory, no init time, real shapes
        m = Transformer(cfg)
    n = m.num_params()
    assert n == analytic_params(cfg)
    lo, hi = {"tiny": (0, 1e6), "mini": (1e6, 3e6), "small": (5e6, 10e6), "medium": (25e6, 40e6), "base": (100e6, 150e6)}[name]
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M params"


def test_flops_per_token_is_6n_plus_attention():
    for tie in (False, True):
        m = make(tie_embeddings=tie)
        cfg = m.config
        # The lm_head matmul always counts; the input lookup table never does.
        n = analytic_params(cfg) - (0 if tie else cfg.vocab_size * cfg.d_model)
        assert m.num_params(exclude_embeddings=True) == n
        assert m.flops_per_token(64) == 6 * n + 12 * cfg.n_layer * cfg.d_model * 64


def test_hf_config_fields():
    cfg = tiny(n_kv_head=2, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=True)
    c = hf_config(cfg)
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, 192, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (4, 2)
    assert (c["rope_theta"], c["rms_norm_eps"], c["tie_word_embeddings"]) == (5e5, 1e-6, True)
    assert (c["vocab_size"], c["max_position_embeddings"]) == (V, 128)
    assert (c["hidden_act"], c["attention_bias"], c["mlp_bias"]) == ("silu", False, False)


# --- numerics against Hugging Face ---------------------------------------------------------------


def hf_twin(model: Transformer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.config))).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_hf_llama(kv):
    m = make(n_kv_head=kv, rope_theta=500.0)  # a small theta makes every rotary frequency matter
    scramble(m)
    hf = hf_twin(m)
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = m(idx), hf(idx).logits
        assert ours.std() > 0.5  # not a trivially flat output
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.hidden(idx), hf.model(idx).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_tied_model_loads_into_hf():
    m = make(tie_embeddings=True)
    scramble(m)
    hf = hf_twin(m)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def left_padded(rows, pad=0):
    T = max(len(r) for r in rows)
    idx = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return idx, mask


@pytest.mark.parametrize("kv", [4, 2])
def test_left_padding_matches_unpadded(kv):
    m = make(n_kv_head=kv)
    scramble(m)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, V, (n,), generator=g).tolist() for n in (12, 5, 9)]
    idx, mask = left_padded(rows)
    with torch.no_grad():
        padded = m(idx, attention_mask=mask)
        assert torch.isfinite(padded).all()  # pad queries must not turn into NaN
        # ...on any backend: some SDPA kernels give NaN for a query that sees no key at all.
        attn, _ = m._mask_and_positions(*idx.shape, 0, mask, None, idx.device)
        assert attn.any(-1).all()
        for b, r in enumerate(rows):
            alone = m(torch.tensor([r]))[0]
            torch.testing.assert_close(padded[b, -len(r):], alone, atol=1e-5, rtol=1e-5)
        # Positions count from each row's first real token. RoPE only sees position differences,
        # so the shift shows in rounding alone: exact equality is the check.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        assert torch.equal(m(idx, attention_mask=mask, position_ids=pos), padded)
        shifted = torch.arange(idx.shape[1]).expand_as(idx)
        assert not torch.equal(m(idx, attention_mask=mask, position_ids=shifted), padded)
        # HF, given the same positions, agrees on the real tokens.
        theirs = hf_twin(m)(idx, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        torch.testing.assert_close(padded[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_causal():
    m = make()
    scramble(m)
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(5))
    changed = idx.clone()
    changed[:, 20] = (idx[:, 20] + 1) % V
    with torch.no_grad():
        a, b = m(idx), m(changed)
        ones = torch.ones_like(idx)
        c = m(changed, attention_mask=ones)  # the explicit-mask path is causal too
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)


# --- KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", [4, 2])
def test_kv_cache_matches_full_sequence(kv):
    m = make(n_kv_head=kv)
    scramble(m)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = m(idx)
        cache = m.make_cache(2, 24)
        # a prefill, a multi-token block on top of a past (causal within, full to the past), then
        # single-token decoding
        parts = [m(idx[:, :10], cache=cache), m(idx[:, 10:15], cache=cache)]
        parts += [m(idx[:, t:t + 1], cache=cache) for t in range(15, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_left_padding():
    m = make(n_kv_head=2)
    scramble(m)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, V, (n,), generator=g).tolist() for n in (14, 8)]
    idx, mask = left_padded(rows)
    with torch.no_grad():
        full = m(idx, attention_mask=mask)
        cache = m.make_cache(2, idx.shape[1])
        parts = [m(idx[:, :6], cache=cache, attention_mask=mask[:, :6])]
        for t in range(6, idx.shape[1]):
            parts.append(m(idx[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]))
    inc = torch.cat(parts, dim=1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_and_length_limits():
    m = make()
    cache = m.make_cache(1, 8)
    with torch.no_grad():
        m(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            m(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            m(torch.zeros(1, m.config.max_seq_len + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="attention_mask"):
            m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


# --- loss, init, training -------------------------------------------------------------------------


def test_loss_ignores_masked_targets():
    m = make()
    scramble(m)
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, V, (2, 16), generator=g)
    targets = torch.randint(0, V, (2, 16), generator=g)
    targets[0, :5] = -100
    targets[1, 10:] = -100
    with torch.no_grad():
        logits, loss = m(idx, targets)
        keep = targets != -100
        manual = -torch.log_softmax(logits[keep], -1).gather(-1, targets[keep][:, None]).mean()
        torch.testing.assert_close(loss, manual)
        # The ignored positions did change something: the unmasked loss is a different number.
        full = torch.where(keep, targets, torch.randint(0, V, (2, 16), generator=g))
        assert abs(m(idx, full)[1].item() - loss.item()) > 1e-4
        assert m(idx).shape == (2, 16, V)  # no targets: logits only


def test_hidden_states_shape_and_norm():
    m = make(norm_eps=1e-10)  # eps would otherwise matter next to the small init activations
    idx = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        h = m.hidden(idx)
    assert h.shape == (3, 7, m.config.d_model)
    # the final RMSNorm has run: unit root-mean-square (its weight is still 1)
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(3, 7), atol=1e-3, rtol=1e-3)


def test_init_scales_residual_projections():
    cfg = tiny(n_layer=8, init_std=0.05)
    torch.manual_seed(0)
    m = Transformer(cfg)
    sd = m.state_dict()
    resid = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for name, p in sd.items():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() / resid - 1) < 0.1, name
        else:
            assert abs(p.std().item() / cfg.init_std - 1) < 0.1, name
        if p.dim() > 1:
            assert abs(p.mean().item()) < 0.1 * cfg.init_std, name


def test_tiny_model_overfits_a_batch():
    m = make()
    m.train()
    g = torch.Generator().manual_seed(9)
    data = torch.randint(0, V, (4, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(V)  # starts near uniform
    assert losses[-1] < losses[0] / 10, losses[::10]


# --- weights I/O ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    from safetensors import safe_open

    m = make(tie_embeddings=tie, n_kv_head=2, rope_theta=1234.0)
    scramble(m)
    path = tmp_path / "model.safetensors"
    save_model(m, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tie)
    assert read_config(path) == m.config
    loaded = load_model(path)
    assert loaded.config == m.config
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), m(idx))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary behind


def test_model_from_state_dict_reties_and_keeps_dtype():
    m = make(tie_embeddings=True)
    sd = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}  # lm_head.weight included
    m2 = model_from_state_dict(m.config, sd)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert m2.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in m2.parameters())


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no model config"):
        load_model(path)
