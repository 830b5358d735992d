"""The scalar-head model behind the reward and value models."""
import pytest
import torch

from engine.model import ScalarModel, Transformer, config_from_preset
from engine.weights import load_model, save_model


def tiny_cfg(**kw):
    return config_from_preset("tiny", 97, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                              max_seq_len=32, **kw)


def test_from_lm_keeps_the_backbone_and_drops_the_unembedding():
    torch.manual_seed(0)
    lm = Transformer(tiny_cfg())
    rm = ScalarModel.from_lm(lm)
    names = set(rm.state_dict())
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(rm.hidden(x), lm.hidden(x))
    scores = rm(x)
    assert scores.shape == (2, 9) and scores.dtype == torch.float32
    # Causal: a score at position t does not depend on later tokens.
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 97
    assert torch.equal(rm(y)[:, :-1], scores[:, :-1])


@pytest.mark.parametrize("tied", [False, True])
def test_scalar_model_round_trips_through_safetensors(tmp_path, tied):
    torch.manual_seed(1)
    rm = ScalarModel.from_lm(Transformer(tiny_cfg(tie_embeddings=tied)))
    save_model(rm, tmp_path / "model.safetensors")
    back = load_model(tmp_path / "model.safetensors")
    assert isinstance(back, ScalarModel)
    x = torch.randint(0, 97, (1, 7))
    assert torch.equal(back(x), rm(x))


def test_matches_hf_sequence_classification_head():
    transformers = pytest.importorskip("transformers")
    from engine.hf_model import hf_config
    torch.manual_seed(2)
    rm = ScalarModel.from_lm(Transformer(tiny_cfg()))
    hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**hf_config(rm.config), num_labels=1))
    hf.load_state_dict(rm.state_dict(), strict=True)
    hf.eval()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = rm(x)
        theirs = hf.score(hf.model(input_ids=x).last_hidden_state).squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
