"""A model's weights on disk: safetensors with the ModelConfig JSON (and the model's kind) in the
file's metadata, never pickle. Written atomically; read back checked tensor by tensor, so a
broken or foreign file is one error naming it rather than a traceback or a model that diverges.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from engine.config import from_dict
from engine.model import ModelConfig, ScalarModel, Transformer

MODEL_KINDS = {"lm": Transformer, "scalar": ScalarModel}


def safetensors_state(model: Transformer) -> tuple[dict, dict]:
    """(tensors, metadata) ready for `safetensors.torch.save_file`; checkpoints reuse it.

    A tied head is left out: safetensors refuses tensors that share memory, and HF omits it too.
    """
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    return tensors, {"format": "pt", "config": json.dumps(dataclasses.asdict(model.config)),
                     "kind": model.kind}


def save_model(model: Transformer, path) -> None:
    """Write `path` (model.safetensors) atomically, with the ModelConfig JSON as metadata."""
    from safetensors.torch import save
    from engine.fsutil import atomic_write_bytes

    tensors, meta = safetensors_state(model)
    atomic_write_bytes(os.fspath(path), save(tensors, metadata=meta))


def read_config(path) -> ModelConfig:
    """The ModelConfig stored in a model.safetensors file, without loading any weights."""
    return read_header(path)[0]


def read_header(path) -> tuple[ModelConfig, str]:
    """(config, kind) from a model.safetensors file's metadata; kind is "lm" or "scalar".
    Any problem is a CheckpointError naming the file."""
    from engine.checkpoint import CheckpointError, read_metadata

    meta = read_metadata(path)
    if "config" not in meta:
        if (Path(path).parent / "config.json").is_file():
            raise CheckpointError(f"{Path(path).parent} is a Hugging Face model folder, not a run's "
                                  "checkpoint: import it first (workbench import-model, or File ▸ "
                                  "Import Model… in the app) and use that run")
        raise CheckpointError(f"{path}: no model config in the safetensors metadata "
                              "(not written by engine.weights.save_model)")
    kind = meta.get("kind", "lm")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r} in its metadata")
    try:
        return from_dict(ModelConfig, json.loads(meta["config"])), kind
    except (ValueError, TypeError, AttributeError) as e:     # ConfigError is a ValueError
        raise CheckpointError(f"{path}: the model config in its metadata is invalid ({e})") from None


def with_tied_head(cfg: ModelConfig, sd: dict) -> dict:
    """Put back the lm_head that `safetensors_state` leaves out of a tied model's file."""
    if (cfg.tie_embeddings and "lm_head.weight" not in sd and "score.weight" not in sd
            and "model.embed_tokens.weight" in sd):
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    return sd


def model_from_state_dict(cfg: ModelConfig, sd: dict, kind: str = "lm") -> Transformer:
    """A Transformer holding exactly the tensors of `sd` (on their device, in their dtype).

    Built on the meta device, so no time goes into a random init that is overwritten at once.
    For a tied config, lm_head.weight may be absent (as safetensors_state writes it).
    """
    sd = with_tied_head(cfg, sd)
    with torch.device("meta"):
        model = MODEL_KINDS[kind](cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()  # assign=True gave the two names separate Parameters; share again
    return model


def check_weights(model: nn.Module, sd: dict, path, needs: str = "the model config in its metadata") -> None:
    """CheckpointError naming `path` unless `sd` is exactly the tensors `model` is made of
    (names, shapes, one floating dtype, finite values): load_state_dict says less, in many lines,
    and a NaN weight would only show up later as a non-finite loss."""
    from engine.checkpoint import CheckpointError

    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        what = "; ".join(part for part in (
            f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])})" if missing else "",
            f"{len(extra)} unexpected tensor(s) ({', '.join(extra[:3])})" if extra else "") if part)
        raise CheckpointError(f"{path}: does not match {needs}: {what}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{path}: tensor '{k}' has shape {list(v.shape)}, but {needs} "
                                  f"needs {list(want[k].shape)}")
    dtypes = {}
    for k, v in sd.items():
        if v.is_floating_point():
            dtypes.setdefault(v.dtype, k)
    if len(dtypes) > 1:
        (a, ka), (b, kb) = list(dtypes.items())[:2]
        raise CheckpointError(f"{path}: mixed dtypes: '{ka}' is {a} but '{kb}' is {b}")
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor '{k}' holds NaN or infinite values: the model had "
                                  "diverged when it was saved, or the file was altered since")


def load_model(path, device="cpu") -> Transformer:
    """The model in a model.safetensors file; CheckpointError naming the file if it is broken."""
    from engine.checkpoint import load_tensors

    cfg, kind = read_header(path)
    sd = with_tied_head(cfg, load_tensors(path, device=device))
    with torch.device("meta"):
        check_weights(MODEL_KINDS[kind](cfg), sd, path)
    return model_from_state_dict(cfg, sd, kind)
