"""Hugging Face model folders in and out: Llama, Qwen2 and Qwen3 on our one Transformer.

Our parameter names are `LlamaForCausalLM`'s, and Qwen2 (q/k/v biases) and Qwen3 (q/k norms, a
head width of its own) add tensors under the same names in transformers, so a state_dict moves
either way with no renaming. What differs per family is `config.json`: `config_from_hf` maps it
onto `ModelConfig`, refusing by name anything our model would compute differently; `hf_config`
writes it back for the family the config implies.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint import CheckpointError, load_tensors, read_json
from engine.config import ConfigError, from_dict
from engine.model import ModelConfig
from engine.weights import check_weights, model_from_state_dict, MODEL_KINDS

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = "Llama (SmolLM, SmolLM2, TinyLlama, Llama 3.x), Qwen2/Qwen2.5, Qwen3"
# Our ModelConfig field -> the config.json key it comes from, to name the key in a message.
HF_NAMES = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layer": "num_hidden_layers",
            "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
            "d_ff": "intermediate_size", "max_seq_len": "max_position_embeddings",
            "norm_eps": "rms_norm_eps", "head_size": "head_dim", "rope_theta": "rope_theta",
            "init_std": "initializer_range", "rope_scaling": "rope_scaling"}
# Buffers some old checkpoints carry that our model computes instead.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedModel(CheckpointError):
    """A model folder of a family or with a feature our Transformer does not compute."""


def family_of(cfg: ModelConfig) -> str:
    """The transformers family whose modelling code computes exactly what `cfg` does."""
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.qkv_bias else "llama"


def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from either transformers 4's rope_theta/rope_scaling or 5's rope_parameters."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = dict(scaling) if scaling else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else {"rope_type": kind,
                                                   **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}
    return float(theta), scaling


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF `config.json`; UnsupportedModel naming what is not supported."""
    def refuse(what: str):
        raise UnsupportedModel(f"{source}: {what}; supported: {SUPPORTED}")

    kind = hf.get("model_type")
    if kind is None:
        # transformers writes it; a hand-made config may not: it is needed to know the family
        # (Qwen2 differs from Llama by its q/k/v biases, not by its class's name alone).
        raise UnsupportedModel(f"{source}: field 'model_type': missing (e.g. \"llama\", \"qwen2\", \"qwen3\")")
    if kind not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or "no architectures"
        refuse(f"model_type {kind!r} ({arch}) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias is true (MLP biases)")
    if hf.get("attention_bias") and kind != "qwen2":
        refuse("attention_bias is true (a bias on o_proj too)")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window is true (sliding-window attention)")
    theta, scaling = _rope(hf)
    d_model, n_head = hf.get("hidden_size"), hf.get("num_attention_heads")
    head_dim = hf.get("head_dim")
    values = dict(
        vocab_size=hf.get("vocab_size"), d_model=d_model, n_layer=hf.get("num_hidden_layers"),
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_ff=hf.get("intermediate_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        head_size=head_dim if head_dim and isinstance(d_model, int) and isinstance(n_head, int)
        and head_dim * n_head != d_model else 0,
        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", rope_scaling=scaling)
    if kind == "qwen2" and hf.get("attention_bias") is False:
        values["qkv_bias"] = False     # never in released Qwen2 models, but the config allows it
    try:
        cfg = from_dict(ModelConfig, values)
    except ConfigError as e:
        name = HF_NAMES.get(e.field, e.field)
        raise UnsupportedModel(f"{source}: field '{name}': {e.message}") from None
    if family_of(cfg) != kind:
        refuse(f"a {kind} config that computes as {family_of(cfg)} (no q/k/v biases)")
    return cfg


def hf_config(cfg: ModelConfig, **token_ids) -> dict:
    """The `config.json` of `cfg`'s family, loadable by AutoConfig with no custom code.

    rope_theta is written both the transformers-4 way (top level) and the 5 way (rope_parameters).
    `token_ids` (bos_token_id, eos_token_id, pad_token_id) come from the tokenizer.
    """
    kind = family_of(cfg)
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [FAMILIES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        **{k: v for k, v in token_ids.items() if v is not None},
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if kind == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False)
    if kind == "llama":
        out["mlp_bias"] = False
    return out


def read_hf_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config_from_hf(hf, str(path))


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names; a pickled-only folder is refused."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (folder / s).is_file():
                raise CheckpointError(f"{folder / s}: missing (the index names it)")
        return [folder / s for s in shards]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickled weights (.bin/.pt); they are not loaded, since "
                              "unpickling can run code: convert them to safetensors first")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_hf_weights(folder: Path, cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """Every tensor of the folder's weights, checked against `cfg` (names, shapes, finite)."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        for k, v in load_tensors(f).items():
            if not k.endswith(IGNORED_SUFFIXES):
                sd[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    with torch.device("meta"):
        check_weights(MODEL_KINDS["lm"](cfg), {k: v for k, v in sd.items() if v is not None},
                      folder, needs=f"its config.json ({family_of(cfg)})")
    return sd


def load_hf_model(folder: Path, dtype: Optional[torch.dtype] = torch.float32):
    """Our Transformer holding an HF folder's weights (converted to `dtype`)."""
    cfg = read_hf_config(folder)
    return model_from_state_dict(cfg, read_hf_weights(folder, cfg, dtype))


def save_hf_weights(model, out: Path, token_ids: Optional[dict] = None) -> None:
    """config.json and model.safetensors of `model` in `out`, as `save_pretrained` lays them out."""
    from safetensors.torch import save
    from engine.fsutil import atomic_write_bytes, atomic_write_text
    from engine.weights import safetensors_state

    Path(out).mkdir(parents=True, exist_ok=True)
    tensors, _ = safetensors_state(model)
    atomic_write_bytes(Path(out) / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_text(Path(out) / "config.json",
                      json.dumps(hf_config(model.config, **(token_ids or {})), indent=2) + "\n")
