"""GGUF export (engine.gguf_export): tiny random models of each family written as f32/f16/q8_0
and read back with gguf's own reader: tensor names, shapes, types and values, the llama q/k
permutation (checked against ggml's rope, not only against itself), the hyperparameter and
tokenizer metadata, refusals, and the atomic write. No llama.cpp binary runs here."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
import tokenizers  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers  # noqa: E402

from engine.gguf_export import (LLAMA3_REGEX, QWEN2_REGEX, detect_pre, llama_permute,  # noqa: E402
                                llama_unpermute, read_gguf_fields, read_gguf_tensors, write_gguf)
from engine.model import ModelConfig, ScalarModel, Transformer, apply_rope, rope_cos_sin  # noqa: E402
from engine.tokenizer import train_from_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QT = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}   # with head_dim 16: all three bands are hit
CASES = {
    "llama-llama3-untied-padded": dict(family="llama", vocab=320, rope_scaling=LLAMA3),
    "llama-linear-tied": dict(family="llama", tied=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2-bias-tied": dict(family="qwen2", tied=True),
    "qwen3-qknorm-headsize": dict(family="qwen3"),
}
LAYER_NAMES = {  # HF name in a layer -> GGUF name in blk.N (written out here, not taken from gguf)
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(hf_key: str) -> str:
    if hf_key in TOP_NAMES:
        return TOP_NAMES[hf_key]
    _, _, i, rest = hf_key.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def make_model(family="llama", tied=False, vocab=300, rope_scaling=None, seed=0) -> Transformer:
    """d_ff 80: ffn_down's rows (80 wide) are no multiple of Q8_0's 32-wide blocks."""
    kw = dict(vocab_size=vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=80,
              max_seq_len=128, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=tied,
              rope_scaling=rope_scaling)
    kw.update({"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True, head_size=32)}.get(family, {}))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():   # every tensor distinct and random: norms and biases too
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def tok():
    texts = [f"the quick brown fox jumps over {i} lazy dogs, twice." for i in range(100)]
    return train_from_texts(texts, vocab_size=300)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """(case, ftype) -> (model, path), each written once."""
    root, done = tmp_path_factory.mktemp("gguf"), {}

    def get(case, ftype):
        if (case, ftype) not in done:
            spec = dict(CASES[case])
            model = make_model(**spec)
            path = root / f"{case}-{ftype}.gguf"
            write_gguf(path, model, tok.to_str(), bos_id=tok.bos_id, eos_id=tok.end_id,
                       pad_id=tok.pad_id, chat_template=TEMPLATE, ftype=ftype, name=case)
            done[case, ftype] = model, path
        return done[case, ftype]
    return get


def ours(model: Transformer) -> dict[str, np.ndarray]:
    """Our tensors under their GGUF names (a tied head is not written)."""
    return {gguf_name(k): v.float().numpy() for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_embeddings)}


def unpermuted(model, name: str, value: np.ndarray) -> np.ndarray:
    """A llama file's q/k rows back in HF's order; other tensors and families as stored."""
    cfg = model.config
    if family(model) == "llama" and name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
        return llama_unpermute(value, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
    return value


def family(model) -> str:
    return "qwen3" if model.config.qk_norm else "qwen2" if model.config.qkv_bias else "llama"


def expected_names(model) -> set[str]:
    cfg = model.config
    names = {"token_embd.weight", "output_norm.weight"}
    names |= set() if cfg.tie_embeddings else {"output.weight"}
    names |= {"rope_freqs.weight"} if (cfg.rope_scaling or {}).get("rope_type") == "llama3" else set()
    for i in range(cfg.n_layer):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
        if cfg.qkv_bias:
            names |= {f"blk.{i}.attn_{n}.bias" for n in "qkv"}
        if cfg.qk_norm:
            names |= {f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"}
    return names


# ---------------------------------------------------------------------------------------------
# Tensors


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ftype", ["f16", "q8_0"])
def test_every_tensor_present_with_its_gguf_name_shape_and_type(exported, case, ftype):
    model, path = exported(case, ftype)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == expected_names(model)
    for name, value in ours(model).items():
        t = stored[name]
        assert [int(d) for d in t.shape] == list(reversed(value.shape)), name   # GGUF: ne order
        if value.ndim == 1:                      # norms and biases stay F32 whatever the ftype
            want = QT.F32
        elif ftype == "q8_0":
            want = QT.Q8_0 if value.shape[-1] % 32 == 0 else QT.F16
        else:
            want = QT.F16
        assert t.tensor_type == want, name
    assert read_gguf_fields(path)["general.file_type"] == {"f16": 1, "q8_0": 7}[ftype]


@pytest.mark.parametrize("case", CASES)
def test_f16_values_equal_ours_after_undoing_the_llama_permutation(exported, case):
    model, path = exported(case, "f16")
    got = read_gguf_tensors(path)
    for name, value in ours(model).items():
        back = unpermuted(model, name, got[name])
        want = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
        assert back.shape == value.shape, name
        assert np.array_equal(back, want), name


@pytest.mark.parametrize("case", CASES)
def test_q8_0_values_within_the_quantisation_error(exported, case):
    model, path = exported(case, "q8_0")
    got = read_gguf_tensors(path)
    quantised = 0
    for name, value in ours(model).items():
        back = unpermuted(model, name, got[name])
        if value.ndim == 1:
            assert np.array_equal(back, value), name
        elif value.shape[-1] % 32:                                   # fell back to F16
            assert np.array_equal(back, value.astype(np.float16).astype(np.float32)), name
        else:
            # Q8_0: per 32 values one scale d = max|x| / 127 (fp16) and int8 q = round(x / d):
            # an error of half a step, plus the scale's own fp16 rounding over up to 127 steps.
            blocks = value.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(back.reshape(-1, 32) - blocks)
            assert (err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-9).all(), name
            quantised += bool(err.max() > 0)
    assert quantised > 0   # the check above saw real quantisation, not copies


def test_the_permutation_is_invertible_and_applied_for_llama_only(exported):
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    for heads in (1, 2, 4):
        assert not np.array_equal(llama_permute(w, heads), w)
        assert np.array_equal(llama_unpermute(llama_permute(w, heads), heads), w)
    # Per head: row j of the first half goes to 2j, of the second half to 2j + 1.
    assert llama_permute(np.arange(8.0), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    for case in CASES:
        model, path = exported(case, "f16")
        got, mine = read_gguf_tensors(path), ours(model)
        for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight"):
            heads = model.config.n_head if "attn_q" in name else model.config.n_kv_head
            as_f16 = mine[name].astype(np.float16).astype(np.float32)
            if family(model) == "llama":
                assert np.array_equal(got[name], llama_permute(as_f16, heads)), (case, name)
                assert not np.array_equal(got[name], as_f16), (case, name)
            else:   # qwen2/qwen3: ggml's neox rope is HF's layout
                assert np.array_equal(got[name], as_f16), (case, name)
        if family(model) == "llama":
            assert np.array_equal(got["blk.0.attn_v.weight"], mine["blk.0.attn_v.weight"].astype(np.float16))


def ggml_rope_norm(x: np.ndarray, pos: int, theta: float, freq_factors=None) -> np.ndarray:
    """ggml's "normal" rope (llama.cpp's llama arch): adjacent dims (2i, 2i+1) rotated by
    pos * theta^(-2i/d) / freq_factors[i]."""
    d = x.shape[-1]
    angle = pos * theta ** (-2.0 * np.arange(d // 2) / d) / (1.0 if freq_factors is None else freq_factors)
    c, s = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def test_llama_export_gives_our_attention_scores_under_ggml_rope(tmp_path, tok):
    """What llama.cpp computes with the exported q/k weights (and rope_freqs) under its own rope
    is what our model computes: every q.k score, at several positions, for each kv group."""
    model = make_model("llama", rope_scaling=LLAMA3, seed=3)
    cfg, path = model.config, tmp_path / "f32.gguf"
    write_gguf(path, model, tok.to_str(), bos_id=1, eos_id=2, pad_id=0, chat_template=None, ftype="f32")
    got = read_gguf_tensors(path)
    hd, rep = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    x = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(0))
    attn = model.model.layers[0].self_attn

    def ours_roped(proj, heads, pos):           # engine.model's rope, HF's layout
        v = proj(x).detach().view(1, heads, 1, hd)
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), hd, cfg.rope_theta, torch.float32, cfg.rope_scaling)
        return apply_rope(v, cos, sin)[0, :, 0].numpy().astype(np.float64)

    def llama_cpp_roped(name, heads, pos):      # the exported rows under ggml's rope
        v = (got[f"blk.0.{name}.weight"] @ x.numpy()).reshape(heads, hd)
        return ggml_rope_norm(v, pos, cfg.rope_theta, got["rope_freqs.weight"].astype(np.float64))

    for pq, pk in ((5, 5), (9, 2), (100, 37)):
        q, k = ours_roped(attn.q_proj, cfg.n_head, pq), ours_roped(attn.k_proj, cfg.n_kv_head, pk)
        q_cpp, k_cpp = llama_cpp_roped("attn_q", cfg.n_head, pq), llama_cpp_roped("attn_k", cfg.n_kv_head, pk)
        for h in range(cfg.n_head):
            want = np.dot(q[h], k[h // rep])
            assert np.dot(q_cpp[h], k_cpp[h // rep]) == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_rope_freqs_match_llama_cpps_formula(exported):
    """The converter's loop (LlamaModel.generate_extra_tensors), transcribed."""
    model, path = exported("llama-llama3-untied-padded", "f16")
    cfg, rs = model.config, LLAMA3
    factors = []
    for freq in 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < rs["original_max_position_embeddings"] / rs["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > rs["original_max_position_embeddings"] / rs["low_freq_factor"]:
            factors.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    got = read_gguf_tensors(path)["rope_freqs.weight"]
    assert got == pytest.approx(factors, rel=1e-5)
    assert len(set(np.round(got, 4))) >= 4   # 1, factor, and ramp values in between


# ---------------------------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize("case", CASES)
def test_architecture_metadata(exported, case):
    model, path = exported(case, "f16")
    cfg, f = model.config, read_gguf_fields(path)
    arch = family(model)
    assert f["general.architecture"] == arch
    assert f["general.name"] == case
    want = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 80,
            "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": cfg.vocab_size,
            "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
            "rope.dimension_count": cfg.head_dim}
    for key, value in want.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        assert f[f"{arch}.rope.scaling.type"] == "linear"
        assert f[f"{arch}.rope.scaling.factor"] == pytest.approx(2.0)
    else:
        assert f"{arch}.rope.scaling.type" not in f
    if arch == "qwen3":
        assert cfg.head_dim * cfg.n_head != cfg.d_model   # key_length is what makes it loadable


@pytest.mark.parametrize("case", ["llama-llama3-untied-padded", "qwen2-bias-tied"])
def test_tokenizer_metadata(exported, tok, case):
    model, path = exported(case, "q8_0")
    f, tj = read_gguf_fields(path), json.loads(tok.to_str())
    hf = tokenizers.Tokenizer.from_str(tok.to_str())
    n = model.config.vocab_size
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(types) == n
    assert tokens[:tok.vocab_size] == [hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert types[:6] == [gguf.TokenType.CONTROL] * 6                         # <|pad|> .. <|assistant|>
    assert set(types[6:tok.vocab_size]) == {gguf.TokenType.NORMAL}
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, n)]
    assert set(types[tok.vocab_size:]) <= {gguf.TokenType.UNUSED}
    merges = f["tokenizer.ggml.merges"]
    assert len(merges) == len(tj["model"]["merges"]) > 0
    assert merges[0] == " ".join(tj["model"]["merges"][0])
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.end_id, tok.pad_id)
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == TEMPLATE


def test_no_bos_and_no_template(tok, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, make_model("qwen3"), tok.to_str(), bos_id=None, eos_id=2, pad_id=None,
               chat_template=None)
    f = read_gguf_fields(path)
    assert f["tokenizer.ggml.add_bos_token"] is False
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert key not in f


def with_pre_tokenizer(tok, pre) -> dict:
    tk = tokenizers.Tokenizer.from_str(tok.to_str())
    tk.pre_tokenizer = pre
    return json.loads(tk.to_str())


def test_pre_tokenizer_detection(tok):
    def split_then_bytes(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert detect_pre(json.loads(tok.to_str())) == "gpt-2"
    assert detect_pre(with_pre_tokenizer(tok, split_then_bytes(LLAMA3_REGEX))) == "llama-bpe"
    assert detect_pre(with_pre_tokenizer(tok, split_then_bytes(QWEN2_REGEX))) == "qwen2"
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert detect_pre(with_pre_tokenizer(tok, smollm)) == "smollm"
    assert detect_pre(with_pre_tokenizer(tok, split_then_bytes(r"\s+"))) is None
    assert detect_pre(with_pre_tokenizer(tok, pre_tokenizers.ByteLevel(add_prefix_space=True))) is None


def test_an_unknown_pre_tokenizer_is_refused_unless_named(tok, tmp_path):
    odd = with_pre_tokenizer(tok, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]))
    model = make_model()
    with pytest.raises(ValueError, match="pre="):
        write_gguf(tmp_path / "a.gguf", model, json.dumps(odd), bos_id=1, eos_id=2, pad_id=0,
                   chat_template=None)
    write_gguf(tmp_path / "b.gguf", model, json.dumps(odd), bos_id=1, eos_id=2, pad_id=0,
               chat_template=None, pre="default")
    assert read_gguf_fields(tmp_path / "b.gguf")["tokenizer.ggml.pre"] == "default"


# ---------------------------------------------------------------------------------------------
# Refusals


def test_an_unsupported_tokenizer_model_is_refused_by_name(tmp_path):
    word_level = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="tokenizer model 'WordLevel' is not supported.*byte-level BPE"):
        write_gguf(tmp_path / "m.gguf", make_model(), word_level.to_str(), bos_id=None, eos_id=0,
                   pad_id=None, chat_template=None)
    sentencepiece_style = tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    sentencepiece_style.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece_style.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match="not byte-level"):
        write_gguf(tmp_path / "m.gguf", make_model(), sentencepiece_style.to_str(), bos_id=None,
                   eos_id=0, pad_id=None, chat_template=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(ftype="q4_0"), "ftype 'q4_0' is not supported"),
    (dict(eos_id=300), "eos_id 300 is outside the vocabulary"),
    (dict(tokenizer_json="{not json"), "not valid JSON"),
])
def test_bad_arguments_are_refused(tok, tmp_path, kwargs, message):
    args = {**dict(tokenizer_json=tok.to_str(), bos_id=1, eos_id=2, pad_id=0, chat_template=None), **kwargs}
    with pytest.raises(ValueError, match=message):
        write_gguf(tmp_path / "m.gguf", make_model(), args.pop("tokenizer_json"), **args)


def test_models_llama_cpp_could_not_run_are_refused(tok, tmp_path):
    def export(model):
        write_gguf(tmp_path / "m.gguf", model, tok.to_str(), bos_id=1, eos_id=2, pad_id=0, chat_template=None)
    with pytest.raises(ValueError, match="token id 299 but the model only 280 embedding rows"):
        export(make_model(vocab=280))
    with pytest.raises(ValueError, match="not a 'scalar' model"):
        export(ScalarModel(make_model().config))
    with pytest.raises(ValueError, match="llama3 rope scaling on a qwen2 model"):
        export(make_model("qwen2", rope_scaling=LLAMA3))
    both = make_model("qwen3")
    both.config.qkv_bias = True
    with pytest.raises(ValueError, match="qwen3 graph has no biases"):
        export(both)
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Atomic write


def test_a_failed_export_leaves_the_previous_file_untouched(tok, tmp_path, monkeypatch):
    import engine.gguf_export as ge
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous")
    real, calls = ge._encode, []

    def failing(p):
        calls.append(p.name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(p)
    monkeypatch.setattr(ge, "_encode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        write_gguf(path, make_model(), tok.to_str(), bos_id=1, eos_id=2, pad_id=0, chat_template=None)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]   # no temporary left


def test_a_killed_export_leaves_no_file_under_the_final_name(tok, tmp_path):
    (tmp_path / "tok.json").write_text(tok.to_str(), encoding="utf-8")
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.test_gguf_export import make_model
        from engine.gguf_export import write_gguf
        out = Path({str(tmp_path)!r})
        write_gguf(out / "m.gguf", make_model(), (out / "tok.json").read_text(encoding="utf-8"),
                   bos_id=1, eos_id=2, pad_id=0, chat_template=None)
    """)
    env = {**os.environ, "WORKBENCH_FAULT": "gguf_tensor@5"}   # SIGKILL after the 5th tensor
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not (tmp_path / "m.gguf").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.tmp-")]
    assert len(leftovers) == 1   # the partial file only ever had a temporary name
