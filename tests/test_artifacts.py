import json

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


def test_a_reward_model_where_a_language_model_goes_is_refused_by_name_before_any_work(
        tiny_lm_ckpt, rm_ckpt, tmp_path, capsys):
    """SFT's and DPO's init, sample's checkpoint and chat: one line naming the setting, exit 2."""
    from workbench.cli import main as workbench
    with pytest.raises(ConfigError, match="holds a reward \\(scalar\\) model, not a language model") as e:
        load_artifact(rm_ckpt, field="init", kind="lm")
    assert e.value.field == "init"
    assert load_artifact(tiny_lm_ckpt, kind="lm").model.kind == "lm"
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(json.dumps({"prompt": "p", "response": "a"}) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("p\n")
    for stage, config in [("sft", {"init": str(rm_ckpt), "data": [str(sft_data)]}),
                          ("dpo", {"init": str(rm_ckpt), "data": [str(prefs)]}),
                          ("sample", {"checkpoint": str(rm_ckpt), "prompts": [str(prompts)]})]:
        run = tmp_path / stage
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config))
        assert workbench(["run", stage, "--run-dir", str(run), "--log-format", "human"]) == 2, stage
        said = capsys.readouterr()
        assert "not a language model" in said.out + said.err and "Traceback" not in said.out + said.err
    assert workbench(["chat", "--checkpoint", str(rm_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "not a language model" in err
