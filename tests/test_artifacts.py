
import pytest
import torch

from engine import checkpoint as ckpt
from engine.artifacts import load_artifact
from engine.config import ConfigError
from engine.model import Transformer, config_from_preset
from engine.weights import safetensors_state
from engine.tokenizer import train_from_texts

TEXT = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]


def save_run(root, tok, vocab=None):
    torch.manual_seed(0)
    model = Transformer(config_from_preset("tiny", vocab or tok.vocab_size, d_model=32, n_layer=1,
                                           n_head=2, n_kv_head=2, d_ff=64, max_seq_len=32))
    tok.save(root / "tok.json")
    weights, meta = safetensors_state(model)
    return ckpt.save_checkpoint(root / "checkpoints", 5, model=weights, model_metadata=meta,
                                state={"tokenizer_fingerprint": tok.fingerprint(), "val_loss": 1.0},
                                extra_files={"tokenizer.json": root / "tok.json"}), model


def test_loads_model_and_its_own_tokenizer_from_a_run_folder(tmp_path):
    tok = train_from_texts(TEXT, vocab_size=300)
    path, model = save_run(tmp_path, tok)
    loaded = load_artifact(tmp_path)
    assert loaded.checkpoint == path and loaded.tokenizer.fingerprint() == tok.fingerprint()
    x = torch.randint(0, tok.vocab_size, (1, 8))
    assert torch.equal(loaded.model(x), model(x))


def test_a_different_tokenizer_is_refused_by_name(tmp_path):
    tok = train_from_texts(TEXT, vocab_size=300)
    save_run(tmp_path, tok)
    other = train_from_texts(TEXT[:1], vocab_size=300)
    if other.vocab_size == tok.vocab_size:
        assert other.fingerprint() != tok.fingerprint()
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError) as e:
        load_artifact(tmp_path, tokenizer=tmp_path / "other.json")
    assert e.value.field == "tokenizer"
    # both files named: the tokenizer given and the checkpoint it does not belong to
    assert str(tmp_path / "other.json") in str(e.value) and "checkpoints" in str(e.value)
    bigger = train_from_texts(TEXT, vocab_size=320)
    bigger.save(tmp_path / "bigger.json")
    with pytest.raises(ConfigError, match=r"bigger\.json has \d+ tokens but the model in .*checkpoints"):
        load_artifact(tmp_path, tokenizer=tmp_path / "bigger.json")


def test_missing_checkpoint_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_artifact(tmp_path, field="init")
    assert e.value.field == "init"
