"""Load what a run produced: a model with the tokenizer it was trained with.

Every checkpoint folder carries its tokenizer.json, so a checkpoint stands on its own. A
different tokenizer may be named explicitly; it must then agree with the model (same vocabulary
size, same special tokens, and the same fingerprint as recorded at training time), because a
model read through the wrong tokenizer trains and samples garbage without any error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint import CheckpointError, read_json, resolve_checkpoint
from engine.config import ConfigError
from engine.model import Transformer
from engine.weights import load_model
from engine.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_files


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: Path          # the checkpoint folder
    state: dict               # its state.json ({} for a bare model folder)
    tokenizer_path: Path

    @property
    def tokenizer_files(self) -> dict[str, Path]:
        """What a checkpoint made from this artifact copies to stand on its own."""
        return tokenizer_files(self.tokenizer_path)


def check_compatible(model: Transformer, tok: Tokenizer, state: dict, field: str = "tokenizer") -> None:
    vocab = model.config.vocab_size
    if isinstance(tok, Tokenizer):
        if tok.vocab_size != vocab:
            raise ConfigError(field, f"tokenizer has {tok.vocab_size} tokens but the checkpoint's model "
                                     f"has {vocab}: they were not trained together")
        for i, name in enumerate(SPECIAL_TOKENS):
            if tok.id_to_token(i) != name:
                raise ConfigError(field, f"special token {i} is {tok.id_to_token(i)!r}, expected {name!r}")
    elif tok.vocab_size > vocab:
        # An imported model's embedding often has spare rows past its tokenizer (Qwen's 151936
        # for 151665 tokens); fewer rows than tokens is a mismatch.
        raise ConfigError(field, f"tokenizer has {tok.vocab_size} tokens but the checkpoint's model "
                                 f"has only {vocab} embedding rows: they do not belong together")
    want = state.get("tokenizer_fingerprint")
    if want and want != tok.fingerprint():
        raise ConfigError(field, "tokenizer differs from the one the checkpoint was trained with "
                                 f"(fingerprint {tok.fingerprint()[:12]} vs {want[:12]})")


def load_artifact(path: str | os.PathLike, *, tokenizer: Optional[str | os.PathLike] = None,
                  device: str | torch.device = "cpu", prefer: str = "best",
                  field: str = "checkpoint") -> Loaded:
    """Model + tokenizer from a checkpoint folder or a run folder (its best, else newest).

    A missing or broken checkpoint is a ConfigError on `field`, naming the file and what is
    wrong, so every stage that starts from one refuses before any work.
    """
    try:
        ck = resolve_checkpoint(path, prefer=prefer)
        state_file = ck / "state.json"
        state = read_json(state_file) if state_file.exists() else {}
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_file}: expected a JSON object, got {type(state).__name__}")
        model = load_model(ck / "model.safetensors", device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(field, str(e)) from None
    tok_path = Path(tokenizer) if tokenizer else ck / TOKENIZER_FILE
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    tok_field = "tokenizer" if tokenizer else field
    try:
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise ConfigError(tok_field, f"cannot load a tokenizer from {tok_path}: {e}") from None
    check_compatible(model, tok, state, tok_field)
    return Loaded(model, tok, ck, state, tok_path)
