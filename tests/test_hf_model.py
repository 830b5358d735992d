"""engine.hf_model: HF folders of each family load into our Transformer with transformers' logits."""
import json

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.hf_model import (UnsupportedModel, config_from_hf, hf_config, load_hf_model, read_hf_config,
                             save_hf_weights)

transformers = pytest.importorskip("transformers")

V = 300
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama-untied-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-tied-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_theta=500.0, rope_scaling=LLAMA3_ROPE)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3-qknorm-headdim": ("qwen3", dict(num_key_value_heads=2, head_dim=32)),
    "qwen3-tied": ("qwen3", dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
}


def hf_classes(kind):
    return {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]


def build_hf(folder, kind, **kw):
    """A random model of `kind` saved by transformers: every weight, bias and norm scrambled."""
    cfg_cls, model_cls = hf_classes(kind)
    cfg = cfg_cls(**{**dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256), **kw})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_match_transformers(tmp_path, case):
    kind, kw = CASES[case]
    hf = build_hf(tmp_path, kind, **kw)
    ours = load_hf_model(tmp_path).eval()
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    assert a.std() > 0.1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ours.config.tie_embeddings == bool(kw.get("tie_word_embeddings"))
    if ours.config.tie_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_llama3_rope_scaling_is_applied(tmp_path):
    """The negative control: the same weights without the scaling give other logits."""
    kind, kw = CASES["llama3-rope"]
    build_hf(tmp_path, kind, **kw)
    scaled = load_hf_model(tmp_path).eval()
    plain = load_hf_model(tmp_path).eval()
    plain.config.rope_scaling = None
    idx = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (scaled(idx) - plain(idx)).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_written_config_and_weights_load_back_in_transformers(tmp_path, case):
    kind, kw = CASES[case]
    build_hf(tmp_path / "in", kind, **kw)
    ours = load_hf_model(tmp_path / "in").eval()
    save_hf_weights(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == hf_classes(kind)[1].__name__
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), back(idx).logits, atol=1e-4, rtol=1e-4)
    assert read_hf_config(tmp_path / "out") == ours.config


def test_sharded_weights_load(tmp_path):
    hf = build_hf(tmp_path, "qwen2", num_key_value_heads=2)
    for f in tmp_path.glob("model*.safetensors*"):
        f.unlink()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf_model(tmp_path).eval()
    idx = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, says", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2' (GPT2LMHeadModel) is not supported; supported: Llama"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "field 'num_key_value_heads': n_head (4) must be divisible"),
    ({"model_type": None, "architectures": ["LlamaForCausalLM"]}, "field 'model_type': missing"),
])
def test_unsupported_configs_are_refused_by_name(change, says):
    base = hf_config(config_from_hf(dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)))
    base.pop("rope_parameters")
    with pytest.raises(UnsupportedModel) as e:
        config_from_hf({**base, **change}, "m/config.json")
    assert str(e.value).startswith("m/config.json: ") and says in str(e.value)


def test_pickled_only_folder_is_refused(tmp_path):
    build_hf(tmp_path, "llama")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        load_hf_model(tmp_path)


def test_a_hugging_face_folder_given_as_a_checkpoint_says_to_import_it(tmp_path):
    from engine.checkpoint import resolve_checkpoint
    from engine.weights import load_model
    build_hf(tmp_path, "llama")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a Hugging Face model folder, not a run's "
                                              "checkpoint: import it first"):
        load_model(resolve_checkpoint(tmp_path) / "model.safetensors")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    build_hf(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_hf_model(tmp_path)
